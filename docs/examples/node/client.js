// nnserve from Node.js: KServe v2 ModelInfer, the task API's Classify and a streamed Generate.
//
//   npm install @grpc/grpc-js @grpc/proto-loader
//   node client.js HOST:PORT PROTOS_DIR
//
// PROTOS_DIR is the repository's protos/ folder: the include root (grpc_predict_v2.proto imports
// "kserve/v2/model_config.proto" from it). Prints one JSON object; tests/e2e/test_other_languages.py
// runs it against a real server and compares with the Python SDK.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [target, protos] = process.argv.slice(2);
const options = { includeDirs: [protos], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
const kserve = grpc.loadPackageDefinition(loader.loadSync("kserve/v2/grpc_predict_v2.proto", options)).inference;
const tasks = grpc.loadPackageDefinition(loader.loadSync("nnserve/v1/tasks.proto", options)).nnserve.v1;
const inference = new kserve.GRPCInferenceService(target, grpc.credentials.createInsecure());
const taskApi = new tasks.Tasks(target, grpc.credentials.createInsecure());

const call = (client, method, request) =>
  new Promise((resolve, reject) => client[method](request, (error, answer) => (error ? reject(error) : resolve(answer))));

// Raw tensors are row-major, little-endian bytes. A protobuf `bytes` field arrives as a Buffer that may
// sit at any offset of a larger one, so copy it out before viewing it as floats.
function floats(buffer) {
  const copy = new Uint8Array(buffer);
  return Array.from(new Float32Array(copy.buffer, 0, copy.byteLength / 4));
}

async function main() {
  const out = {};
  // KServe v2: the digits FNN takes [n, 64] FP32 pixels scaled to 0..1 (its network tensor).
  const pixels = new Float32Array(64).map((_, i) => (i % 16) / 16);
  const infer = await call(inference, "ModelInfer", {
    model_name: "digits-fnn",
    inputs: [{ name: "input", datatype: "FP32", shape: [1, 64] }],
    raw_input_contents: [Buffer.from(pixels.buffer)],
  });
  out.infer = { shape: infer.outputs[0].shape.map(Number), logits: floats(infer.raw_output_contents[0]) };

  // The task API: the same pixels in the model's natural units (0..16), as typed values.
  const classified = await call(taskApi, "Classify", {
    model_name: "digits-fnn",
    tensor: { datatype: "FP32", shape: [1, 64], float_values: Array.from(pixels, (v) => v * 16) },
    top_k: 3,
  });
  out.classify = classified.items[0].top.map((s) => ({ label: s.label, probability: s.probability }));

  // A streamed Generate: text piece by piece, then a `done` message. `seed` makes it repeatable.
  out.text = await new Promise((resolve, reject) => {
    let text = "";
    const stream = taskApi.Generate({ model_name: "chars-lstm", prompt: "ab", max_tokens: 12, seed: 5 });
    stream.on("data", (message) => {
      if (message.event === "text") text += message.text;
    });
    stream.on("error", reject);
    stream.on("end", () => resolve(text));
  });
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((error) => {
  process.stderr.write(`${error.code ?? ""} ${error.details ?? error.message}\n`);
  process.exit(1);
});
