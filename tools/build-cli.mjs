// Build the qledger program into dist/ (run by `npm run build`, after tsc has
// built the library):
//   dist/cli.cjs      the CLI and what it imports, one CommonJS file (esbuild);
//   dist/qledger.cjs  the package's bin: compiles cli.cjs with V8's code cache
//                     (dist/cli.cjs.v8cache), written at the first run and
//                     again whenever V8 rejects it (another Node version);
//                     where dist/ is not writable it runs without one.
// Why: start-up is most of a short command's time. Node loads ES modules one
// at a time and its ESM loader costs more than require(); one CommonJS file
// whose compiled code comes from a cache starts fastest (BENCHMARKS.md,
// "Start-up"). Subcommands import what only they use lazily, so `info` never
// initializes the write engine.

import { build } from 'esbuild';
import { chmodSync, mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));

await build({
  entryPoints: [`${root}src/cli/bin.ts`],
  outfile: `${root}dist/cli.cjs`,
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  logLevel: 'warning',
  // import.meta.url (native helper lookup, lazy requires) as the bundle's own URL
  define: { 'import.meta.url': '__qledger_url' },
  banner: { js: "const __qledger_url = require('node:url').pathToFileURL(__filename).href;" },
});

// The launcher runs the bundle in a vm.Script, which has no dynamic import(): a lazy load
// of a module the bundle does not contain (a Node built-in, say) must be a require().
{
  const { readFileSync } = await import('node:fs');
  const bundled = readFileSync(`${root}dist/cli.cjs`, 'utf8');
  const dynamic = bundled.match(/\bimport\((["'][^"']+["'])\)/g);
  if (dynamic) throw new Error(`dist/cli.cjs has a dynamic import() the launcher cannot run: ${dynamic.join(', ')} (use createRequire)`);
}

const launcher = `#!/usr/bin/env node
'use strict';
// qledger: run dist/cli.cjs, compiled with V8's code cache when there is a usable one.
const fs = require('node:fs');
const path = require('node:path');
const vm = require('node:vm');
const Module = require('node:module');
const file = path.join(__dirname, 'cli.cjs');
const cacheFile = file + '.v8cache';
let cachedData;
try {
  cachedData = fs.readFileSync(cacheFile);
} catch {}
const script = new vm.Script(Module.wrap(fs.readFileSync(file, 'utf8')), { filename: file, cachedData });
if (cachedData === undefined || script.cachedDataRejected) {
  // after the run, so that the functions the run compiled are in the cache too
  process.once('exit', () => {
    try {
      fs.writeFileSync(cacheFile, script.createCachedData());
    } catch {}
  });
}
const m = new Module(file, module);
m.filename = file;
m.paths = Module._nodeModulePaths(__dirname);
script.runInThisContext().call(m.exports, m.exports, (id) => m.require(id), m, file, __dirname);
`;
writeFileSync(`${root}dist/qledger.cjs`, launcher);
chmodSync(`${root}dist/qledger.cjs`, 0o755);
rmSync(`${root}dist/cli.cjs.v8cache`, { force: true });
// The first run writes the cache, with the functions it compiled: make it
// the typical short command, `info` of a small image (created without the cache).
const tmp = mkdtempSync(join(tmpdir(), 'qledger-build-'));
try {
  const img = join(tmp, 'warm.qcow2');
  execFileSync(process.execPath, [`${root}dist/cli.cjs`, 'create', '-q', '-f', 'qcow2', img, '1M'], { stdio: 'ignore' });
  execFileSync(process.execPath, [`${root}dist/qledger.cjs`, 'info', img], { stdio: 'ignore' });
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
