// UpscalerJS ESRGAN-thick x4 on the CPU: the browser peer the shipped model is judged against
// (issue 18). The model is the one @upscalerjs/esrgan-thick ships (model.json + weight shards,
// read from node_modules by path) with the package's own model definition (its custom layers,
// input range [0, 1], output range [0, 1]), run by tfjs on the wasm backend (SIMD binary, loaded
// from node_modules by path: nothing is downloaded). Each LQ .png is upscaled in one piece, as
// UpscalerJS does without a patch size (RGB scaled to [0, 1]; output clipped to [0, 1], times 255,
// rounded to 8 bits) into OUT_DIR/NAME.png; the wall time per image and in all is printed.
//
// One thread: tfjs-backend-wasm 4.11 reports no thread support under node (tfjs issue 3830) and
// its threaded binary starts its workers from blob: URLs, which node's worker_threads refuse.
//
// Usage (tools/eval-shipped.sh runs it after `pinned_node tools/esrgan-thick`):
//     node tools/esrgan-thick/upscale.mjs LQ_DIR OUT_DIR
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

function fail(message) {
  console.error(`esrgan-thick: ${message}`);
  process.exit(1);
}

function readImage(file) {
  let png;
  try {
    png = PNG.sync.read(fs.readFileSync(file));
  } catch (e) {
    fail(`${file}: not a readable PNG (${e.message})`);
  }
  // pngjs decodes every PNG to 8-bit RGBA; the alpha channel is dropped, as PIL's convert("RGB").
  const { width, height, data } = png;
  const rgb = new Float32Array(width * height * 3);
  for (let i = 0; i < width * height; i++) {
    for (let c = 0; c < 3; c++) rgb[3 * i + c] = data[4 * i + c];
  }
  return tf.tensor4d(rgb, [1, height, width, 3]);
}

function writeImage(file, pixels, height, width) {
  const png = new PNG({ width, height, colorType: 2, inputColorType: 2, inputHasAlpha: false });
  png.data = Buffer.from(pixels);
  const tmp = `${file}.tmp-${process.pid}`;
  try {
    fs.writeFileSync(tmp, PNG.sync.write(png, { colorType: 2, inputColorType: 2, inputHasAlpha: false }));
    fs.renameSync(tmp, file);
  } catch (e) {
    fail(`${file}: cannot write (${e.code ?? e.message})`);
  }
}

// A tfjs IO handler over the package's model.json and its shards in the order of its manifest.
function fileHandler(modelJson) {
  const dir = path.dirname(modelJson);
  return {
    load: async () => {
      const json = JSON.parse(fs.readFileSync(modelJson, 'utf8'));
      return tf.io.getModelArtifactsForJSON(json, async (manifest) => {
        const specs = manifest.flatMap((group) => group.weights);
        const shards = manifest.flatMap((group) =>
          group.paths.map((p) => {
            const b = fs.readFileSync(path.join(dir, p));
            return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
          }),
        );
        return [specs, tf.io.concatenateArrayBuffers(shards)];
      });
    },
  };
}

const [lqDir, outDir, ...extra] = process.argv.slice(2);
if (!lqDir || !outDir || extra.length) fail('usage: node tools/esrgan-thick/upscale.mjs LQ_DIR OUT_DIR');
if (!fs.existsSync(path.join(HERE, 'node_modules'))) {
  fail(`${HERE}/node_modules missing: run \`source tools/pinned-node.sh; pinned_node tools/esrgan-thick\``);
}
let names;
try {
  names = fs.readdirSync(lqDir).filter((n) => n.toLowerCase().endsWith('.png')).sort();
} catch (e) {
  fail(`${lqDir}: cannot list (${e.code ?? e.message})`);
}
if (!names.length) fail(`${lqDir}: no .png images`);
try {
  fs.mkdirSync(outDir, { recursive: true });
} catch (e) {
  fail(`${outDir}: cannot create (${e.code ?? e.message})`);
}

const tf = require('@tensorflow/tfjs');
const { setWasmPaths } = require('@tensorflow/tfjs-backend-wasm');
const { PNG } = require('pngjs');
const model4x = require('@upscalerjs/esrgan-thick/4x');

setWasmPaths(path.dirname(require.resolve('@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm-simd.wasm')) + '/');
if (!(await tf.setBackend('wasm'))) fail('the tfjs wasm backend did not start');
model4x.setup(tf);
const modelJson = path.join(HERE, 'node_modules', model4x._internals.name, model4x._internals.path);
const model = await tf.loadLayersModel(fileHandler(modelJson));
const [inLo, inHi] = model4x.inputRange;
const [outLo, outHi] = model4x.outputRange;
if (inLo !== 0 || outLo !== 0) fail(`unexpected model ranges ${model4x.inputRange} -> ${model4x.outputRange}`);

const start = performance.now();
for (const name of names) {
  const t0 = performance.now();
  const lq = readImage(path.join(lqDir, name));
  const [, h, w] = lq.shape;
  const sr = tf.tidy(() =>
    model.predict(lq.mul(inHi / 255)).clipByValue(0, outHi).mul(255 / outHi).round().cast('int32'),
  );
  const [, sh, sw] = sr.shape;
  if (sh !== model4x.scale * h || sw !== model4x.scale * w) fail(`${name}: model gave ${sw}x${sh} from ${w}x${h}`);
  writeImage(path.join(outDir, `${path.parse(name).name}.png`), Uint8Array.from(sr.dataSync()), sh, sw);
  tf.dispose([lq, sr]);
  console.log(`${name}: ${w}x${h} -> ${sw}x${sh} in ${((performance.now() - t0) / 1000).toFixed(2)} s`);
}
const total = (performance.now() - start) / 1000;
console.log(
  `esrgan-thick x4: ${names.length} images in ${total.toFixed(2)} s, ${(total / names.length).toFixed(3)} s per image (tfjs ${tf.version.tfjs} wasm SIMD, 1 thread)`,
);
