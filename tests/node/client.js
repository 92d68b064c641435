// A Node.js client of openlora built from protos/ alone (@grpc/grpc-js + @grpc/proto-loader), as a
// team using another language would: health Watch, Generate, GenerateStream and error codes with
// their google.rpc.Status details. Prints one JSON object; tests/test_node_client.py checks it.
//   node client.js ROUTER_ADDRESS ADAPTER_ID
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, adapterId] = process.argv.slice(2);
const PROTOS = path.resolve(__dirname, "../../protos");
const options = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };
const api = grpc.loadPackageDefinition(protoLoader.loadSync(
  ["openlora/v1/router.proto", "openlora/v1/registry.proto"], { ...options, includeDirs: [PROTOS] }));
const healthApi = grpc.loadPackageDefinition(protoLoader.loadSync(
  path.join(__dirname, "health.proto"), options));

// Client-side health checking on (grpc-js watches grpc.health.v1.Health/Watch for the channel).
const channelOptions = {
  "grpc.service_config": JSON.stringify({
    loadBalancingConfig: [{ round_robin: {} }],
    healthCheckConfig: { serviceName: "" },
  }),
};
const router = new api.openlora.v1.Router(address, grpc.credentials.createInsecure(), channelOptions);
const health = new healthApi.grpc.health.v1.Health(address, grpc.credentials.createInsecure());

function unary(client, method, request) {
  return new Promise((resolve) => {
    client[method](request, { deadline: Date.now() + 120000 }, (err, reply) => {
      if (err) {
        const details = err.metadata ? err.metadata.get("grpc-status-details-bin") : [];
        resolve({ code: err.code, message: err.details, has_status_details: details.length > 0 });
      } else {
        resolve({ code: 0, reply });
      }
    });
  });
}

function firstWatch() {
  return new Promise((resolve, reject) => {
    const call = health.Watch({ service: "openlora.v1.Router" });
    call.on("data", (msg) => { resolve(msg.status); call.cancel(); });
    call.on("error", (err) => { if (err.code !== grpc.status.CANCELLED) reject(err); });
  });
}

function stream(request) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    const call = router.GenerateStream(request);
    call.on("data", (chunk) => chunks.push(chunk));
    call.on("error", reject);
    call.on("end", () => resolve(chunks));
  });
}

async function main() {
  const out = {};
  out.watch = await firstWatch();
  const request = { adapter_id: adapterId, prompt: "Hello from Node",
                    sampling: { max_new_tokens: 8, ignore_eos: true } };
  const unaryResult = await unary(router, "Generate", request);
  out.generate = { code: unaryResult.code, text: unaryResult.reply && unaryResult.reply.text,
                   tokens: unaryResult.reply && unaryResult.reply.token_ids.length,
                   finish_reason: unaryResult.reply && unaryResult.reply.finish_reason };
  const chunks = await stream(request);
  out.stream = { chunks: chunks.length, text: chunks.map((c) => c.text).join(""),
                 finish_reason: chunks[chunks.length - 1].finish_reason };
  out.not_found = await unary(router, "Generate", { ...request, adapter_id: "nobody/nothing" });
  out.invalid = await unary(router, "Generate", { adapter_id: adapterId, prompt: "" });
  console.log(JSON.stringify(out));
  router.close();
  health.close();
}

main().catch((err) => { console.error(err); process.exit(1); });
