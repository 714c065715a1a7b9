/**
 * qledger resize against qemu-img resize: the same command on copies of the
 * same image gives the same exit code, the same output (the program's name
 * aside), the same virtual size and the same guest content; qledger's
 * results pass qemu-img check, and a refused resize leaves the file
 * untouched. qcow2 (v3 and v2, with and without internal snapshots) and raw.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { copyFileSync, readFileSync, statSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';

const { dir, cleanup } = tempDir('qledger-resize-');
afterAll(cleanup);

const d = qemuAvailable ? describe : describe.skip;

/** qemu-img resize and qledger resize with the same arguments on two copies of `src`. */
async function both(src: string, args: (file: string) => string[], tag: string) {
  const q = join(dir, `${tag}-q`);
  const l = join(dir, `${tag}-l`);
  copyFileSync(src, q);
  copyFileSync(src, l);
  const before = readFileSync(l);
  const qr = spawnSync('qemu-img', ['resize', ...args(q)], { encoding: 'utf8' });
  const lr = await runCli('resize', ...args(l));
  return { q, l, before, qr: { code: qr.status, out: qr.stdout, err: qr.stderr.replaceAll('qemu-img', 'qledger').replaceAll(q, l) }, lr };
}

const virtualSize = (f: string, fmt = 'qcow2') => JSON.parse(qemuImg(['info', '-f', fmt, '--output=json', f]))['virtual-size'] as number;
const checkClean = (f: string) => expect(spawnSync('qemu-img', ['check', f]).status).toBe(0);
const sameContent = (a: string, b: string, fmt = 'qcow2') => expect(spawnSync('qemu-img', ['compare', '-f', fmt, '-F', fmt, a, b]).status).toBe(0);

d('resize: qcow2, as qemu-img', () => {
  const base = join(dir, 'base.qcow2');
  qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', base, '4M']);
  qemuIo(base, ['write -P 1 0 64k', 'write -P 2 1M 512k', 'write -P 3 3M 1M']);

  const same = [
    ['grow by a relative size', (f: string) => [f, '+1M']],
    ['grow to an absolute size', (f: string) => ['-q', f, '1G']],
    ['shrink with --shrink: what lies past the end is gone', (f: string) => ['--shrink', f, '2M']],
    ['shrink by a negative relative size (taken off the end before the options)', (f: string) => ['--shrink', f, '-1M']],
    ['preallocation=metadata', (f: string) => ['--preallocation=metadata', f, '+1M']],
    ['preallocation=falloc', (f: string) => ['--preallocation=falloc', f, '8M']],
    ['preallocation=full', (f: string) => ['--preallocation=full', f, '6M']],
    ['an image named as json:', (f: string) => [`json:{"driver":"qcow2","file":{"driver":"file","filename":"${f}"}}`, '5M']],
  ] as const;
  for (const [name, args] of same) {
    it(name, async () => {
      const r = await both(base, args, name.replace(/\W+/g, '-'));
      expect(r.lr).toEqual(r.qr);
      expect(r.lr.code).toBe(0);
      expect(virtualSize(r.l)).toBe(virtualSize(r.q));
      checkClean(r.l);
      sameContent(r.l, r.q);
    });
  }

  const refused = [
    ['a shrink without --shrink', (f: string) => [f, '1M']],
    ['a size of 0', (f: string) => [f, '0']],
    ['a relative size below 0', (f: string) => ['--', f, '-5M']],
    ['a size that is not a multiple of 512', (f: string) => [f, '+513']],
    ['preallocation for a shrink', (f: string) => ['--shrink', '--preallocation=full', f, '1M']],
    ['preallocation for a shrink without --shrink (the preallocation check comes first)', (f: string) => ['--preallocation=full', f, '1M']],
    ['an unknown preallocation mode', (f: string) => ['--preallocation=bogus', f, '8M']],
    ['a size that is not a size', (f: string) => [f, 'abc']],
    ['no size', (f: string) => [f]],
    ['two sizes', (f: string) => [f, '3M', '4M']],
  ] as const;
  for (const [name, args] of refused) {
    it(`refused, untouched: ${name}`, async () => {
      const r = await both(base, args, name.replace(/\W+/g, '-'));
      expect(r.lr).toEqual(r.qr);
      expect(r.lr.code).toBe(1);
      expect(readFileSync(r.l).equals(r.before)).toBe(true);
    });
  }

  it('v3 with an internal snapshot: shrink and grow as qemu-img, the snapshot intact', async () => {
    const s = join(dir, 'snap.qcow2');
    copyFileSync(base, s);
    qemuImg(['snapshot', '-c', 'before', s]);
    qemuIo(s, ['write -P 9 3M 64k']);
    for (const [tag, args] of [
      ['shrink', (f: string) => ['--shrink', f, '2M']],
      ['grow', (f: string) => [f, '16M']],
    ] as const) {
      const r = await both(s, args, `snap-${tag}`);
      expect(r.lr).toEqual(r.qr);
      checkClean(r.l);
      sameContent(r.l, r.q);
      // the snapshot reads as before
      const a = join(dir, `snap-${tag}-q.raw`);
      const b = join(dir, `snap-${tag}-l.raw`);
      qemuImg(['convert', '-O', 'raw', '-l', 'before', r.q, a]);
      qemuImg(['convert', '-O', 'raw', '-l', 'before', r.l, b]);
      expect(readFileSync(a).equals(readFileSync(b))).toBe(true);
    }
  });

  it('v2 with an internal snapshot: refused as qemu-img refuses it', async () => {
    const v2 = join(dir, 'v2.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '4M']);
    qemuImg(['snapshot', '-c', 's', v2]);
    const r = await both(v2, (f) => [f, '8M'], 'v2');
    expect(r.lr).toEqual(r.qr);
    expect(r.lr.err).toContain("Can't resize a v2 image which has snapshots");
    expect(readFileSync(r.l).equals(r.before)).toBe(true);
  });
});

d('resize: raw, as qemu-img', () => {
  const raw = join(dir, 'base.raw');
  qemuImg(['create', '-q', '-f', 'raw', raw, '1M']);
  qemuIo(raw, ['write -P 5 0 1M'], ['-f', 'raw']);
  const cases = [
    ['grow', (f: string) => ['-f', 'raw', f, '2M'], 0],
    ['a size that is not a multiple of 512 (raw takes any)', (f: string) => ['-f', 'raw', f, '+12345'], 0],
    ['shrink with --shrink', (f: string) => ['-f', 'raw', '--shrink', f, '1000'], 0],
    ['shrink without --shrink', (f: string) => ['-f', 'raw', f, '1000'], 1],
    ['preallocation=falloc', (f: string) => ['-f', 'raw', '--preallocation=falloc', f, '3M'], 0],
    ['preallocation=full', (f: string) => ['-f', 'raw', '--preallocation=full', f, '3M'], 0],
    ['preallocation=metadata is not for raw', (f: string) => ['-f', 'raw', '--preallocation=metadata', f, '3M'], 1],
    ['-f qcow2 on a raw file', (f: string) => ['-f', 'qcow2', f, '3M'], 1],
  ] as const;
  for (const [name, args, code] of cases) {
    it(name, async () => {
      const r = await both(raw, args, `raw-${name.replace(/\W+/g, '-')}`);
      expect(r.lr).toEqual(r.qr);
      expect(r.lr.code).toBe(code);
      expect(statSync(r.l).size).toBe(statSync(r.q).size);
      expect(readFileSync(r.l).equals(readFileSync(r.q))).toBe(true);
      if (code) expect(readFileSync(r.l).equals(r.before)).toBe(true);
    });
  }
});
