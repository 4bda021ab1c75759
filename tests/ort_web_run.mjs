// node ort_web_run.mjs NODE_PROJECT MODEL INPUT_NAME RAW_UINT8_FILE DIMS
// Runs MODEL in onnxruntime-web (its WebAssembly backend, the one browsers use) as installed under
// NODE_PROJECT/node_modules, on one uint8 tensor; prints the first output's values as JSON.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { join } from "node:path";

const [project, model, name, raw, dims] = process.argv.slice(2);
const ort = createRequire(join(project, "package.json"))("onnxruntime-web");
ort.env.wasm.numThreads = 1;
const session = await ort.InferenceSession.create(readFileSync(model));
const input = new ort.Tensor("uint8", new Uint8Array(readFileSync(raw)), dims.split(",").map(Number));
const out = await session.run({ [name]: input });
console.log(JSON.stringify(Array.from(out[session.outputNames[0]].data)));
