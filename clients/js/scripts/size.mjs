// The core's size as a browser app ships it: dist/index.js bundled and minified by esbuild, then
// gzip -9. Prints the figure; fails above the budget (5 KB). The AG-UI entry (dist/agui.js) is not counted.
import { buildSync } from "esbuild";
import { gzipSync } from "node:zlib";

const BUDGET = 5120;
const { outputFiles } = buildSync({
  entryPoints: ["dist/index.js"],
  bundle: true,
  minify: true,
  format: "esm",
  platform: "browser",
  write: false,
});
const minified = outputFiles[0].contents;
const gzipped = gzipSync(minified, { level: 9 }).length;
console.log(`@agentwire/client core: ${minified.length} bytes minified, ${gzipped} bytes gzipped (budget ${BUDGET})`);
if (gzipped > BUDGET) {
  console.error(`size: ${gzipped} bytes gzipped is over the ${BUDGET}-byte budget`);
  process.exit(1);
}
