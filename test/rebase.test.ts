/**
 * qledger rebase against qemu-img rebase on copies of the same chain: the
 * image reads as before (safe mode), maps as qemu-img's result maps
 * (offsets aside), names the same backing file and format, passes qemu-img
 * check; unsafe mode, removing the backing file, a raw backing file, v2
 * images; qemu-img's refusals. And the header change itself: valid after
 * every write of its plan.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { planBackingChange } from '../src/format/backing-change.ts';
import { decodeHeader } from '../src/format/header.ts';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';

const { dir, cleanup } = tempDir('qledger-rebase-');
afterAll(cleanup);
const f = (n: string) => join(dir, n);
const d = qemuAvailable ? describe : describe.skip;
const mapOf = (p: string) => qemuImg(['map', '--output=json', p]).replace(/, "offset": \d+/g, '');
const backingOf = (p: string) => {
  const j = JSON.parse(qemuImg(['info', '--output=json', p]));
  return { file: j['backing-filename'], format: j['backing-filename-format'] };
};

d('rebase, as qemu-img', () => {
  qemuImg(['create', '-q', '-f', 'qcow2', f('old.qcow2'), '4M']);
  qemuIo(f('old.qcow2'), ['write -P 1 0 4M']);
  qemuImg(['create', '-q', '-f', 'qcow2', f('new.qcow2'), '3M']);
  qemuIo(f('new.qcow2'), ['write -P 1 0 1M', 'write -P 9 1M 1M', 'write -P 1 2M 1000']);
  qemuImg(['create', '-q', '-f', 'raw', f('new.raw'), '4M']);
  qemuIo(f('new.raw'), ['write -P 1 0 2M'], ['-f', 'raw']);
  for (const v of ['1.1', '0.10']) {
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', `compat=${v},cluster_size=4096`, '-b', 'old.qcow2', '-F', 'qcow2', f(`top-${v}.qcow2`)]);
    qemuIo(f(`top-${v}.qcow2`), ['write -P 2 3M 64k', 'write -z 1500k 8k']);
  }

  const cases: Array<[string, string[], string]> = [
    ['safe, onto another qcow2 backing file', ['-b', 'new.qcow2', '-F', 'qcow2'], '1.1'],
    ['safe, a v2 image', ['-b', 'new.qcow2', '-F', 'qcow2'], '0.10'],
    ['safe, onto a raw backing file', ['-b', 'new.raw', '-F', 'raw'], '1.1'],
    ['safe, removing the backing file', ['-b', ''], '1.1'],
    ['unsafe: the header only', ['-u', '-b', 'new.qcow2', '-F', 'qcow2'], '1.1'],
    ['unsafe, removing the backing file', ['-u', '-b', ''], '0.10'],
  ];
  for (const [name, args, v] of cases) {
    it(name, async () => {
      const tag = name.replace(/\W+/g, '-');
      const q = f(`${tag}-q.qcow2`);
      const l = f(`${tag}-l.qcow2`);
      copyFileSync(f(`top-${v}.qcow2`), q);
      copyFileSync(f(`top-${v}.qcow2`), l);
      const before = f(`${tag}-before.raw`);
      qemuImg(['convert', '-O', 'raw', l, before]);
      const qr = spawnSync('qemu-img', ['rebase', ...args, q], { encoding: 'utf8' });
      const lr = await runCli('rebase', ...args, l);
      expect(lr).toEqual({ code: qr.status, out: qr.stdout, err: qr.stderr });
      expect(lr.code).toBe(0);
      expect(spawnSync('qemu-img', ['check', l]).status).toBe(0);
      expect(backingOf(l)).toEqual(backingOf(q));
      expect(mapOf(l)).toBe(mapOf(q));
      if (!args.includes('-u')) expect(spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', before, l]).status).toBe(0);
    });
  }

  it('refused: no -b without -u, a new backing file without -F (before anything is written)', async () => {
    const l = f('refused.qcow2');
    copyFileSync(f('top-1.1.qcow2'), l);
    const bytes = readFileSync(l);
    const a = await runCli('rebase', l);
    const qa = spawnSync('qemu-img', ['rebase', l], { encoding: 'utf8' });
    expect({ code: a.code, err: a.err.replace(/^qledger:/gm, 'qemu-img:').replace("'qledger --help'", "'qemu-img --help'") }).toEqual({ code: qa.status, err: qa.stderr });
    const b = await runCli('rebase', '-b', 'new.qcow2', l);
    expect(b.code).toBe(1);
    expect(b.err).toBe("qledger: Could not change the backing file to 'new.qcow2': backing format must be specified\n");
    expect(readFileSync(l).equals(bytes)).toBe(true);
  });
});

describe('the backing change plan', () => {
  it('leaves a valid header after every write, and names the new file and format at the end', async () => {
    const { createOnDevice } = await import('../src/engine/writable.ts');
    const { MemoryDevice } = await import('../src/io/memory-device.ts');
    for (const [cs, from, to, fmt] of [
      [2048, undefined, 'b.raw', 'raw'],
      [65536, 'a.qcow2', 'a-much-longer-backing-file-name.qcow2', 'qcow2'],
      [4096, 'a.qcow2', 'b.raw', 'qcow2'],
      [4096, 'a.qcow2', undefined, undefined],
    ] as const) {
      const dev = new MemoryDevice('x.qcow2');
      const backing = from === undefined ? undefined : new Uint8Array(1 << 20);
      await createOnDevice(dev, 'x.qcow2', { size: 1 << 20, clusterSize: cs, ...(from ? { backingFile: from, backingFormat: 'raw' as const } : {}) }, backing);
      const img = dev.snapshot();
      const head = img.slice(0, cs);
      const plan = planBackingChange(head, to, fmt);
      expect(plan).toBeDefined();
      const cur = img.slice();
      const start = decodeHeader(cur.subarray(0, cs * 4), cur.length);
      for (const w of plan!) {
        cur.set(w.bytes, w.offset);
        const h = decodeHeader(cur.subarray(0, cs * 4), cur.length);
        // never one file named with the other's format
        const pair = [h.backingFile, h.backingFormat];
        const allowed = [JSON.stringify([start.backingFile, start.backingFormat]), JSON.stringify([to, fmt]), JSON.stringify([to, undefined])];
        if (to === undefined) allowed.push(JSON.stringify([undefined, start.backingFormat]));
        expect(allowed).toContain(JSON.stringify(pair));
      }
      const h = decodeHeader(cur.subarray(0, cs * 4), cur.length);
      expect(h.backingFile).toBe(to);
      if (to !== undefined) expect(h.backingFormat).toBe(fmt);
    }
  });
});
