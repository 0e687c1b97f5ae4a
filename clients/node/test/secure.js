'use strict';
// Run against a stack with mutual TLS and a token:
//   node test/secure.js HOST:PORT MODEL CA_FILE CERT_FILE KEY_FILE TOKEN_FILE
// Checks: with the CA, a client certificate and the token, ListModels and a generation work; without the token the
// call is UNAUTHENTICATED; a token without TLS is refused before any call.
const assert = require('assert');
const fs = require('fs');
const grpc = require('@grpc/grpc-js');
const { ChituClient } = require('..');

async function main() {
  const [address, model, caFile, certFile, keyFile, tokenFile] = process.argv.slice(2);
  const token = fs.readFileSync(tokenFile, 'utf8').split('\n').map((l) => l.trim()).find((l) => l && !l.startsWith('#'));
  const client = new ChituClient(address, { caFile, certFile, keyFile, token });
  const { models } = await client.listModels();
  assert.ok(models.some((m) => m.name === model), JSON.stringify(models));
  const result = await client.generateResult('a red circle', model, { width: 32, height: 32, steps: 2, seed: 1,
    timeoutSeconds: 60 });
  assert.ok(result.artifacts[0].data.subarray(0, 4).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47])));
  client.close();

  const anonymous = new ChituClient(address, { caFile, certFile, keyFile });
  await assert.rejects(anonymous.listModels(), (err) => {
    assert.strictEqual(err.code, grpc.status.UNAUTHENTICATED);
    assert.ok(err.details.includes('bearer token'), err.details);
    return true;
  });
  anonymous.close();
  assert.throws(() => new ChituClient(address, { token }), /never travels in plaintext/);
  console.log(JSON.stringify({ ok: true }));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
