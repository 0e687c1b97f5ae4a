'use strict';
// Node.js client of chitu's public API: chitu.v1.GenerationService (Generate streams events, ListModels).
// The .proto files are loaded at run time from the repository's proto/ folder (or `protoRoot`).
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEFAULT_PROTO_ROOT = path.join(__dirname, '..', '..', 'proto');

function loadApi(protoRoot = DEFAULT_PROTO_ROOT) {
  const def = protoLoader.loadSync('chitu/v1/generation.proto', {
    includeDirs: [protoRoot],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(def).chitu.v1;
}

function credentials(options) {
  if (!options.caFile) {
    if (options.token || options.certFile) throw new Error('token and certFile need caFile (TLS): a bearer token never travels in plaintext');
    return grpc.credentials.createInsecure();
  }
  if (Boolean(options.certFile) !== Boolean(options.keyFile)) throw new Error('certFile and keyFile are set together');
  const read = (f) => (f ? fs.readFileSync(f) : null);
  let creds = grpc.credentials.createSsl(read(options.caFile), read(options.keyFile), read(options.certFile));
  if (options.token) {
    const bearer = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
      const md = new grpc.Metadata();
      md.set('authorization', `Bearer ${options.token}`);
      callback(null, md);
    });
    creds = grpc.credentials.combineChannelCredentials(creds, bearer);
  }
  return creds;
}

class ChituClient {
  /**
   * @param {string} address host:port of the orchestrator
   * @param {{protoRoot?: string, maxMessageMb?: number, caFile?: string, certFile?: string, keyFile?: string,
   *          serverName?: string, token?: string}} [options] caFile: TLS against that CA; certFile/keyFile: a client
   *          certificate for mutual TLS; token: bearer token sent on every call (needs TLS); serverName: the name to
   *          check in the server's certificate when the address's host is not in it.
   */
  constructor(address = '127.0.0.1:50051', options = {}) {
    const api = loadApi(options.protoRoot);
    const size = (options.maxMessageMb || 256) * 1024 * 1024;
    const channelOptions = { 'grpc.max_receive_message_length': size, 'grpc.max_send_message_length': size };
    if (options.serverName) channelOptions['grpc.ssl_target_name_override'] = options.serverName;
    this.stub = new api.GenerationService(address, credentials(options), channelOptions);
  }

  /** ListModels: resolves to {models: [...]}. */
  listModels(timeoutSeconds = 10) {
    return new Promise((resolve, reject) => {
      this.stub.ListModels({}, { deadline: Date.now() + timeoutSeconds * 1000 }, (err, resp) =>
        err ? reject(err) : resolve(resp));
    });
  }

  /**
   * Generate: an async iterator of GenerateResponse events ({request_id, elapsed_seconds, event, queued|...|result}).
   * Unset options take the model's defaults. Errors reject with a grpc status error (err.code, err.details).
   * @param {string} prompt
   * @param {string} model
   * @param {{negativePrompt?: string, width?: number, height?: number, frames?: number, steps?: number,
   *          guidanceScale?: number, seed?: number, requestId?: string, timeoutSeconds?: number}} [opts]
   */
  generate(prompt, model, opts = {}) {
    const req = { prompt, model, negative_prompt: opts.negativePrompt || '', request_id: opts.requestId || '' };
    const optional = { width: opts.width, height: opts.height, frames: opts.frames, steps: opts.steps,
      guidance_scale: opts.guidanceScale, seed: opts.seed };
    for (const [k, v] of Object.entries(optional)) if (v !== undefined && v !== null) req[k] = v;
    const callOptions = opts.timeoutSeconds ? { deadline: Date.now() + opts.timeoutSeconds * 1000 } : {};
    const metadata = new grpc.Metadata();
    if (req.request_id) metadata.set('x-request-id', req.request_id);
    return this.stub.Generate(req, metadata, callOptions);  // a Readable stream: `for await (const ev of ...)`
  }

  /** Run one generation and resolve to its GenerationResult (artifacts[].data are Buffers). */
  async generateResult(prompt, model, opts = {}) {
    for await (const event of this.generate(prompt, model, opts)) {
      if (event.event === 'result') return event.result;
    }
    throw new Error('the stream ended without a result');
  }

  close() {
    this.stub.close();
  }
}

module.exports = { ChituClient, loadApi };
