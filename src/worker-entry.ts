/**
 * How qledger starts a worker thread on its own code (the fuzzer's and
 * crash-test's workers, the compression pool), in each of the
 * three ways qledger runs: the bundled CLI (the thread runs the bundle
 * itself, which checks its workerData before it runs as a program:
 * cli/bin.ts), the compiled library (the entry module beside the caller),
 * or the sources through tsx (its loader registered in the thread first).
 */

import { createRequire } from 'node:module';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { existsSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';

/** `callerUrl`: the caller's import.meta.url; `entry`: the path (no extension) of the entry module, relative to the caller. */
export function workerEntry(callerUrl: string, entry: string): { file: string; eval: boolean } {
  if (callerUrl.endsWith('.cjs')) {
    // the bundle: through its launcher where it sits beside it, so the thread compiles the bundle
    // from V8's code cache too (a compression worker answered in 37-40 ms instead of 51-90 ms)
    const bundle = fileURLToPath(callerUrl);
    const launcher = join(dirname(bundle), 'qledger.cjs');
    return { file: basename(bundle) === 'cli.cjs' && existsSync(launcher) ? launcher : bundle, eval: false };
  }
  if (!callerUrl.endsWith('.ts')) return { file: fileURLToPath(new URL(`${entry}.js`, callerUrl)), eval: false };
  const api = new URL('./api/index.mjs', pathToFileURL(createRequire(callerUrl).resolve('tsx/esm'))).href;
  const main = new URL(`${entry}.ts`, callerUrl).href;
  return { file: `import(${JSON.stringify(api)}).then((m) => { m.register(); return import(${JSON.stringify(main)}); });`, eval: true };
}
