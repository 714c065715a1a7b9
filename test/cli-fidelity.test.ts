/**
 * qemu-img's command-line conventions where scripts depend on them, each
 * against the real tool: help per subcommand, the version, an unknown
 * command, check on an image format without checks, and output into a
 * pipe whose reader went away.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runCli } from './helpers/cli.ts';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { VERSION } from '../src/version.ts';

const t = tempDir();
afterAll(() => t.cleanup());
const root = new URL('..', import.meta.url).pathname;

function qemu(args: string[]): number | null {
  return spawnSync('qemu-img', args, { encoding: 'utf8' }).status;
}

describe('qemu-img conventions', () => {
  it('-h and --help of each subcommand print its usage and exit 0, as qemu-img does', async () => {
    for (const cmd of ['check', 'info', 'map', 'convert', 'create', 'compare', 'snapshot', 'io']) {
      for (const flag of ['-h', '--help']) {
        const r = await runCli(cmd, flag);
        expect(r.code, `${cmd} ${flag}`).toBe(0);
        expect(r.out).toMatch(new RegExp(`^usage: qledger ${cmd}\\b`));
      }
    }
    if (qemuAvailable) expect(qemu(['check', '--help'])).toBe(0);
  });

  it('--version and -V print the version and exit 0; it is package.json\'s', async () => {
    for (const flag of ['--version', '-V']) {
      const r = await runCli(flag);
      expect(r.code).toBe(0);
      expect(r.out).toBe(`qledger version ${VERSION}\n`);
    }
    expect(JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).version).toBe(VERSION);
  });

  it("an unknown command says so in qemu-img's words, suggests the nearest, exit 1", async () => {
    const r = await runCli('chek', 'x.qcow2');
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/^qledger: Command not found: chek\nTry 'qledger --help' for more information\n/);
    expect(r.err).toMatch(/did you mean 'check'\?/);
    if (qemuAvailable) expect(qemu(['chek', 'x.qcow2'])).toBe(1);
  });

  it('check of a raw image: "does not support checks", exit 63, probed or with -f raw', async () => {
    const raw = join(t.dir, 'plain.raw');
    writeFileSync(raw, new Uint8Array(1 << 20).fill(9));
    for (const args of [[raw], ['-f', 'raw', raw]]) {
      const r = await runCli('check', ...args);
      expect(r.code).toBe(63);
      expect(r.err).toBe('qledger: This image format does not support checks\n');
      if (qemuAvailable) expect(qemu(['check', ...args])).toBe(63);
    }
  });

  it.skipIf(!qemuAvailable)('output into a pipe whose reader went away ends quietly with exit 0, as qemu-io', () => {
    const img = join(t.dir, 'pipe.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
    qemuIo(img, ['write -P 1 0 1M']);
    for (const tool of [`${join(root, 'tools/qledger')} io`, 'qemu-io']) {
      const r = spawnSync('bash', ['-c', `${tool} -c 'read -v 0 1M' ${img} | head -1; echo "status \${PIPESTATUS[0]}"`], { encoding: 'utf8' });
      expect(r.stdout, tool).toMatch(/^00000000: {2}01 01 01 01/);
      expect(r.stdout, tool).toMatch(/status 0\n$/);
      expect(r.stderr, tool).toBe('');
    }
  });
});

describe.skipIf(!qemuAvailable)('convert and compare options as qemu-img takes them', () => {
  const q = (args: string[]) => spawnSync('qemu-img', args, { encoding: 'utf8' });
  const same = (ours: { code: number; out: string; err: string }, theirs: ReturnType<typeof q>) => {
    expect({ code: ours.code, out: ours.out, err: ours.err.replace(/^qledger: /gm, '') }).toEqual({ code: theirs.status, out: theirs.stdout, err: theirs.stderr.replace(/^qemu-img: /gm, '') });
  };
  const img = (name: string, cmds: string[]) => {
    const f = join(t.dir, name);
    qemuImg(['create', '-q', '-f', 'qcow2', f, '4M']);
    if (cmds.length) qemuIo(f, cmds);
    return f;
  };

  it('-W takes no argument; -c with raw output is refused; -n writes into an existing file, never creating or resizing it', async () => {
    const a = img('conv-a.qcow2', ['write -P 1 0 1M', 'write -z 2M 64k']);
    const ow = join(t.dir, 'w-ours.raw');
    const qw = join(t.dir, 'w-theirs.raw');
    same(await runCli('convert', '-W', '-O', 'raw', a, ow), q(['convert', '-W', '-O', 'raw', a, qw]));
    expect(readFileSync(ow).equals(readFileSync(qw))).toBe(true);
    same(await runCli('convert', '-c', '-O', 'raw', a, join(t.dir, 'c-ours.raw')), q(['convert', '-c', '-O', 'raw', a, join(t.dir, 'c-theirs.raw')]));
    same(await runCli('convert', '-n', '-O', 'raw', a, join(t.dir, 'missing-ours.raw')), q(['convert', '-n', '-O', 'raw', a, join(t.dir, 'missing-ours.raw')]));
    for (const [name, size] of [['small', 1 << 20], ['big', 8 << 20]] as const) {
      const junk = Buffer.alloc(size, 0x77);
      const o = join(t.dir, `n-${name}-ours.raw`);
      const th = join(t.dir, `n-${name}-theirs.raw`);
      writeFileSync(o, junk);
      writeFileSync(th, junk);
      same(await runCli('convert', '-n', '-O', 'raw', a, o), q(['convert', '-n', '-O', 'raw', a, th]));
      expect(readFileSync(o).equals(readFileSync(th)), name).toBe(true); // zeros written over the old bytes, size kept
    }
  });

  it('compare -s reports a block status mismatch where qemu-img does', async () => {
    const a = img('s-a.qcow2', ['write -P 1 0 1M', 'write -z 2M 64k']);
    const b = img('s-b.qcow2', ['write -P 1 0 1M', 'write -P 0 2M 64k']);
    const c = img('s-c.qcow2', ['write -P 1 0 1M']);
    const d = img('s-d.qcow2', ['write -P 1 0 1M', 'write -z 2M 64k']);
    for (const [x, y] of [[a, b], [a, c], [a, d], [b, c]] as const) {
      same(await runCli('compare', '-s', x, y), q(['compare', '-s', x, y]));
      same(await runCli('compare', x, y), q(['compare', x, y]));
    }
  });

  it('convert -p shows progress in steps of about one percent, from 0.00 to 100.00', async () => {
    const f = join(t.dir, 'progress.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '128M']);
    qemuIo(f, ['write -P 3 0 128M']);
    const r = await runCli('convert', '-p', '-O', 'raw', f, join(t.dir, 'progress.raw'));
    expect(r.code).toBe(0);
    const shown = r.out.split('\r').filter((x) => x.trim()).map((x) => Number(/\(([\d.]+)\/100%\)/.exec(x)![1]));
    expect(shown[0]).toBe(0);
    expect(shown.at(-1)).toBe(100);
    expect(shown.length).toBeGreaterThan(50);
    expect(shown.length).toBeLessThan(110);
    // each update at least a percent after the one before, but the last (100.00 is always shown)
    for (let i = 1; i < shown.length - 1; i++) expect(shown[i]! - shown[i - 1]!).toBeGreaterThanOrEqual(1);
    expect(r.out.endsWith('\n')).toBe(true);
  });
});

describe.skipIf(!qemuAvailable)('images named as QEMU names them', () => {
  it('json: pseudo-filenames and --image-opts strings for qcow2, raw and file; other drivers and options refused by name', async () => {
    const f = join(t.dir, 'spec.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '4M']);
    qemuIo(f, ['write -P 1 0 64k']);
    const plain = await runCli('info', '--output=json', f);
    const specs: string[][] = [
      ['--image-opts', `driver=qcow2,file.filename=${f}`],
      ['--image-opts', `file.filename=${f}`],
      [`json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: f } })}`],
      [`json:${JSON.stringify({ file: { driver: 'file', filename: f } })}`],
    ];
    for (const s of specs) {
      const r = await runCli('info', '--output=json', ...s);
      expect(r.code, r.err).toBe(0);
      expect(JSON.parse(r.out)).toEqual(JSON.parse(plain.out));
      expect(spawnSync('qemu-img', ['info', ...s]).status).toBe(0);
    }
    const raw = await runCli('io', '--image-opts', '-c', 'read -q -P 0x51 0 1', `driver=file,filename=${f}`); // 'Q', the first byte of the qcow2 magic
    expect(raw.code, raw.err + raw.out).toBe(0);
    for (const bad of [`driver=qcow2,file.filename=${f},bogus=1`, `driver=qcow2,file.filename=${f},file.bogus=1`]) {
      const r = await runCli('info', '--image-opts', bad);
      const q = spawnSync('qemu-img', ['info', '--image-opts', bad], { encoding: 'utf8' });
      expect(r.code).toBe(q.status);
      expect(r.err.replace(/^qledger: /, '')).toBe(q.stderr.replace(/^qemu-img: /, ''));
    }
    const other = await runCli('info', '--image-opts', `driver=vmdk,file.filename=${f}`);
    expect(other.code).toBe(1);
    expect(other.err).toMatch(/^qledger: Could not open 'driver=vmdk,[^']*': Unknown driver 'vmdk'/);
  });
});
