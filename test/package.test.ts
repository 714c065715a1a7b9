/**
 * The package as a user gets it: `npm pack`, the tarball installed into an
 * empty project with no network (its dependencies packed from this
 * checkout's node_modules), then (a) the README's library example as a
 * plain .mjs, (b) a TypeScript consumer type-checked with `tsc --strict
 * --module nodenext` and nothing else, (c) `npx qledger` from that project.
 */

import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, readFileSync, readdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, tempDir } from './helpers/qemu.ts';

const root = new URL('..', import.meta.url).pathname;
const t = tempDir();
const packs = join(t.dir, 'packs');
const project = join(t.dir, 'consumer');

function run(cmd: string, args: string[], cwd: string, env: Record<string, string> = {}): { code: number | null; out: string; err: string } {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', env: { ...process.env, npm_config_audit: 'false', npm_config_fund: 'false', npm_config_update_notifier: 'false', ...env } });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

function must(cmd: string, args: string[], cwd: string): string {
  const r = run(cmd, args, cwd);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} (in ${cwd}): exit ${r.code}\n${r.out}\n${r.err}`);
  return r.out;
}

/** The README's library example, as written there. */
function readmeExample(): string {
  const readme = readFileSync(join(root, 'README.md'), 'utf8');
  const at = readme.indexOf('## Library');
  const m = /```ts\n([\s\S]*?)```/.exec(readme.slice(at));
  if (!m) throw new Error('README.md has no library example');
  return m[1]!;
}

beforeAll(() => {
  mkdirSync(packs);
  mkdirSync(project);
  // `npm pack` runs the build (prepare), so the tarball holds what this checkout's sources make.
  // It runs in a copy: rebuilding this checkout's dist/ would pull it from under tests that run tools/qledger.
  const stage = join(t.dir, 'stage');
  mkdirSync(stage);
  for (const f of ['package.json', 'tsconfig.json', 'tsconfig.build.json', 'README.md', 'API.md', 'LICENSE', 'journal-format.md', 'binding.gyp']) cpSync(join(root, f), join(stage, f));
  for (const d of ['src', 'native']) cpSync(join(root, d), join(stage, d), { recursive: true });
  mkdirSync(join(stage, 'tools'));
  cpSync(join(root, 'tools/build-cli.mjs'), join(stage, 'tools/build-cli.mjs'));
  symlinkSync(join(root, 'node_modules'), join(stage, 'node_modules'));
  must('npm', ['pack', '--silent', '--pack-destination', packs], stage);
  for (const dep of ['immer', 'fzstd', '@bokuweb/zstd-wasm', '@types/node', 'undici-types']) must('npm', ['pack', '--silent', '--ignore-scripts', '--pack-destination', packs, join(root, 'node_modules', dep)], root);
  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module' }));
  const tarballs = readdirSync(packs).map((f) => join(packs, f));
  must('npm', ['install', '--offline', '--no-save', ...tarballs], project);
}, 240_000);

afterAll(() => t.cleanup());

describe('the packed package in a fresh project', () => {
  it('ships the build, types, bin and licence, and no tests, benchmarks or CI', () => {
    const files = must('tar', ['-tzf', join(packs, readdirSync(packs).find((f) => f.startsWith('qledger-'))!)], root).split('\n');
    for (const want of ['package/dist/index.js', 'package/dist/index.d.ts', 'package/dist/qledger.cjs', 'package/dist/cli.cjs', 'package/LICENSE', 'package/README.md', 'package/native/qledger-native.c', 'package/binding.gyp']) {
      expect(files, want).toContain(want);
    }
    expect(files.filter((f) => /^package\/(test|bench|\.ci|tools)\//.test(f))).toEqual([]);
    const pkg = JSON.parse(readFileSync(join(project, 'node_modules/qledger/package.json'), 'utf8')) as Record<string, Record<string, unknown>>;
    expect(Object.keys(pkg['dependencies'] ?? {})).not.toContain('tsx');
  }, 60_000);

  it("runs the README's library example as a plain .mjs", async () => {
    writeFileSync(join(project, 'example.mjs'), readmeExample());
    const r = run('node', ['example.mjs'], project);
    expect(r.err).toBe('');
    expect(r.code).toBe(0);
    // the example prints the map: the 8 KiB written at 4 KiB shows as data
    expect(r.out).toMatch(/^4096 8192 true false$/m);
    // qemu-img check exits non-zero (and qemuImg throws) unless the image is clean
    if (qemuAvailable) expect(qemuImg(['check', join(project, 'disk.qcow2')])).toMatch(/No errors were found/);
  }, 60_000);

  it('type-checks a TypeScript consumer with tsc --strict --module nodenext', () => {
    writeFileSync(
      join(project, 'consumer.ts'),
      [
        "import { Image, QledgerError, checkImage, type ImageInfo, type MapEntry, type CheckReport } from 'qledger';",
        "const img: Image = await Image.open('disk.qcow2');",
        'const info: ImageInfo = await img.info();',
        'const entries: MapEntry[] = [];',
        'for await (const e of img.map()) entries.push(e);',
        "const report: CheckReport = await checkImage('disk.qcow2');",
        "const code: string = new QledgerError('E_USAGE', 'x').code;",
        'console.log(info.format, entries.length, report.corruptions, code);',
        'await img.close();',
        '',
      ].join('\n'),
    );
    const r = run(join(root, 'node_modules/.bin/tsc'), ['--strict', '--module', 'nodenext', '--noEmit', 'consumer.ts'], project);
    expect(r.out + r.err).toBe('');
    expect(r.code).toBe(0);
  }, 60_000);

  it('npx qledger works from the project', () => {
    const r = run('npx', ['--no-install', 'qledger', 'info', '--output=json', 'disk.qcow2'], project);
    expect(r.code, r.err).toBe(0);
    expect(JSON.parse(r.out)).toMatchObject({ format: 'qcow2', 'virtual-size': 1 << 30 });
  }, 60_000);

  it('the installed bin reads qemu-io commands from standard input (a lazy load inside the bundle)', () => {
    const r = spawnSync('npx', ['--no-install', 'qledger', 'io', 'disk.qcow2'], { cwd: project, input: 'write -P 5 0 512\nread -P 5 0 512\n', encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('wrote 512/512 bytes at offset 0');
    expect(r.stdout).toContain('read 512/512 bytes at offset 0');
  }, 60_000);

  it('zstd compressed writes from the installed bin and library (the native helper where it was built; the WebAssembly compressor loads from the package)', () => {
    const bin = (...a: string[]) => run('npx', ['--no-install', 'qledger', ...a], project);
    expect(bin('create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', 'z.qcow2', '1M').code).toBe(0);
    const w = bin('io', '-c', 'write -c -P 3 0 64k', 'z.qcow2');
    expect(w.code, w.err).toBe(0);
    writeFileSync(
      join(project, 'zstd.mjs'),
      [
        "import { Image } from 'qledger';",
        "const img = await Image.open('z.qcow2', { write: true });",
        'await img.writeCompressed(65536, new Uint8Array(65536).fill(4));',
        'await img.close();',
        '',
      ].join('\n'),
    );
    // without the native helper: the WebAssembly build of libzstd, read from the installed package
    const l = run('node', ['zstd.mjs'], project, { QLEDGER_NO_NATIVE: '1' });
    expect(l.err).toBe('');
    expect(l.code).toBe(0);
    const r = bin('io', '-c', 'read -P 3 0 64k', '-c', 'read -P 4 64k 64k', 'z.qcow2');
    expect(r.out).not.toContain('verification failed');
    if (qemuAvailable) expect(JSON.parse(qemuImg(['check', '--output=json', join(project, 'z.qcow2')]))['compressed-clusters']).toBe(2);
  }, 60_000);
});
