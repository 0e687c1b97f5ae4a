'use strict';
// Run against a live stack: node test/e2e.js HOST:PORT MODEL
// Checks: ListModels, a streamed generation (events in order, a PNG result, settings echoed), and the
// statuses of bad input (NOT_FOUND naming the served models, INVALID_ARGUMENT naming the field).
const assert = require('assert');
const grpc = require('@grpc/grpc-js');
const { ChituClient } = require('..');

async function main() {
  const [address, model] = process.argv.slice(2);
  const client = new ChituClient(address);
  const { models } = await client.listModels();
  assert.ok(models.some((m) => m.name === model && m.serving), `model ${model} not served: ${JSON.stringify(models)}`);

  const kinds = [];
  let result = null;
  for await (const ev of client.generate('a red circle on the left', model,
    { width: 32, height: 32, steps: 3, seed: 9, requestId: 'node-e2e', timeoutSeconds: 60 })) {
    kinds.push(ev.event);
    assert.strictEqual(ev.request_id, 'node-e2e');
    if (ev.event === 'result') result = ev.result;
  }
  assert.strictEqual(kinds[0], 'queued');
  assert.strictEqual(kinds[kinds.length - 1], 'result');
  assert.strictEqual(kinds.filter((k) => k === 'step').length, 3);
  assert.ok(result.artifacts[0].data.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])));
  assert.strictEqual(result.seed, '9');
  assert.strictEqual(result.width, 32);

  await assert.rejects(client.generateResult('x', 'no-such-model'), (err) => {
    assert.strictEqual(err.code, grpc.status.NOT_FOUND);
    assert.ok(err.details.includes(model), err.details);
    return true;
  });
  await assert.rejects(client.generateResult('x', model, { width: 33 }), (err) => {
    assert.strictEqual(err.code, grpc.status.INVALID_ARGUMENT);
    assert.ok(err.details.includes('width=33'), err.details);
    return true;
  });
  client.close();
  console.log(JSON.stringify({ ok: true, events: kinds.length, bytes: result.artifacts[0].data.length }));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
