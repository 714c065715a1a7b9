/**
 * The API reference: API.md is what tools/api-reference.mjs generates from
 * declarations freshly emitted from the sources (so a changed comment or
 * signature without a regenerated API.md fails), and every example in it
 * runs: each as a module of its own, `qledger` resolving to the sources,
 * with the output its comments promise.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { tempDir } from './helpers/qemu.ts';
// @ts-expect-error a JavaScript tool without declarations
import { generate } from '../tools/api-reference.mjs';

const root = new URL('..', import.meta.url).pathname;
const t = tempDir('qledger-api-');
afterAll(() => t.cleanup());

function examples(md: string): Array<{ name: string; code: string }> {
  const out: Array<{ name: string; code: string }> = [];
  let name = '';
  const lines = md.split('\n');
  for (let i = 0; i < lines.length; i++) {
    if (lines[i]!.startsWith('## ')) name = lines[i]!.slice(3);
    if (lines[i] === 'Example:' && lines[i + 2] === '```js') {
      const end = lines.indexOf('```', i + 3);
      out.push({ name, code: lines.slice(i + 3, end).join('\n') });
    }
  }
  return out;
}

describe('API reference', () => {
  const md = readFileSync(join(root, 'API.md'), 'utf8');

  it('API.md is current: regenerated from freshly emitted declarations it is the same', () => {
    const decl = join(t.dir, 'decl');
    const r = spawnSync(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-p', join(root, 'tsconfig.build.json'), '--emitDeclarationOnly', '--declarationMap', 'false', '--outDir', decl], { encoding: 'utf8' });
    expect(r.status, r.stdout + r.stderr).toBe(0);
    expect((generate as (dir: string) => string)(decl), 'run `npm run build && node tools/api-reference.mjs`').toBe(md);
  });

  const all = examples(md);
  it('has an example for each entry point', () => {
    expect(all.map((e) => e.name).sort()).toEqual(['Image', 'ImageBitmaps', 'ImageSnapshots', 'MemoryDevice', 'QledgerError', 'checkImage', 'compareImages', 'convertToQcow2', 'convertToRaw', 'crashTest', 'measure', 'readJournal', 'serveNbd'].sort());
  });

  for (const { name, code } of all) {
    it(`the example of ${name} runs and prints what its comments say`, () => {
      const file = join(t.dir, `example-${name}.mts`);
      writeFileSync(file, code.replaceAll("from 'qledger'", `from ${JSON.stringify(join(root, 'src/index.ts'))}`));
      const r = spawnSync(process.execPath, ['--import', pathToFileURL(join(root, 'node_modules/tsx/dist/esm/index.mjs')).href, file], { encoding: 'utf8', cwd: t.dir, timeout: 120_000 });
      expect(r.status, r.stderr).toBe(0);
      // every "// expected" comment on a console.log line is a line of the output (a trailing "..." matches the rest)
      const want = code
        .split('\n')
        .filter((l) => l.includes('console.log(') && / \/\/ .+$/.test(l))
        .map((l) => l.replace(/^.* \/\/ /, ''));
      const got = r.stdout.split('\n');
      for (const w of want) {
        const prefix = w.endsWith('...') ? w.slice(0, -3) : undefined;
        expect(got.some((g) => (prefix !== undefined ? g.replace(/\s+/g, ' ').startsWith(prefix.replace(/\s+/g, ' ')) : g === w)), `${name}: "${w}" in\n${r.stdout}`).toBe(true);
      }
    });
  }
});
