/**
 * convert -S (sparse detection), --target-is-zero, -m and -W against
 * qemu-img convert on the same input: a raw file whose data holds zero runs
 * of many lengths and alignments, some across qemu-img's 2 MiB buffers.
 * The outputs must map as qemu-img's outputs map (qcow2: data and zero
 * ranges; raw: the file's holes) and read as the input. The rule itself
 * (engine/sparse.ts) is checked by a property: it never leaves out a
 * nonzero byte and never writes a long aligned zero run.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { qemuAvailable, qemuImg, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';
import { sparseRule, sparseRuns } from '../src/engine/sparse.ts';

const { dir, cleanup } = tempDir('qledger-sparse-');
afterAll(cleanup);
const f = (n: string) => join(dir, n);
const d = qemuAvailable ? describe : describe.skip;
const RUNS = Number(process.env['QLEDGER_PROPERTY_RUNS'] ?? 200);

/** 8 MiB of data with zero gaps: [offset, length] of each gap */
const GAPS: Array<[number, number]> = [
  [4096, 512],
  [10 * 1024 + 512, 1024],
  [20 * 1024, 3584],
  [32 * 1024, 4096],
  [41 * 1024 + 512, 4608],
  [64 * 1024, 8192],
  [100 * 1024 + 1536, 12 * 1024],
  [256 * 1024, 64 * 1024],
  [400 * 1024 + 512, 100 * 1024],
  [1024 * 1024, 1024 * 1024 + 4096],
  [(2 << 20) - 6144, 12 * 1024],
  [(4 << 20) - 512, 1536],
  [5 << 20, 1536 * 1024],
  [(8 << 20) - 9000, 9000],
];

function input(): Buffer {
  const b = Buffer.alloc(8 << 20);
  for (let i = 0; i < b.length; i++) b[i] = (i % 251) + 1;
  for (const [at, n] of GAPS) b.fill(0, at, at + n);
  return b;
}

/** map --output=json as [start, length, data, zero] with neighbours of equal flags merged */
function mapOf(p: string, fmt: string): Array<[number, number, boolean, boolean]> {
  const out: Array<[number, number, boolean, boolean]> = [];
  for (const e of JSON.parse(qemuImg(['map', '-f', fmt, '--output=json', p])) as Array<{ start: number; length: number; data: boolean; zero: boolean }>) {
    const last = out[out.length - 1];
    if (last && last[2] === e.data && last[3] === e.zero) last[1] += e.length;
    else out.push([e.start, e.length, e.data, e.zero]);
  }
  return out;
}

d('convert -S, --target-is-zero, -m and -W, as qemu-img', () => {
  writeFileSync(f('in.raw'), input());
  const sizes = [undefined, '0', '512', '1536', '8k', '64k', '1M'];
  const targets: Array<[string, string[]]> = [
    ['qcow2, 512-byte clusters', ['-O', 'qcow2', '-o', 'cluster_size=512']],
    ['qcow2, 64 KiB clusters', ['-O', 'qcow2']],
    ['raw', ['-O', 'raw']],
  ];
  for (const [name, out] of targets) {
    it(`${name}: the same map as qemu-img's output for -S ${sizes.map((s) => s ?? 'default').join(', ')}`, async () => {
      const fmt = out[1]!;
      for (const s of sizes) {
        const opts = [...(s === undefined ? [] : ['-S', s]), ...out];
        const q = f(`q-${fmt}-${s}.img`);
        const l = f(`l-${fmt}-${s}.img`);
        qemuImg(['convert', '-f', 'raw', ...opts, f('in.raw'), q]);
        const r = await runCli('convert', '-f', 'raw', ...opts, f('in.raw'), l);
        expect(r, `-S ${s}`).toEqual({ code: 0, out: '', err: '' });
        expect(mapOf(l, fmt), `${name}, -S ${s}`).toEqual(mapOf(q, fmt));
        expect(spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', fmt, f('in.raw'), l]).status).toBe(0);
      }
    });
  }

  it('-c -S 0: every cluster compressed, the zero ones too, as qemu-img', async () => {
    const checkOf = (p: string) => (JSON.parse(spawnSync('qemu-img', ['check', '--output=json', p], { encoding: 'utf8' }).stdout) as Record<string, unknown>)['compressed-clusters'];
    qemuImg(['convert', '-f', 'raw', '-c', '-S', '0', '-O', 'qcow2', f('in.raw'), f('qc.qcow2')]);
    expect((await runCli('convert', '-f', 'raw', '-c', '-S', '0', '-O', 'qcow2', f('in.raw'), f('lc.qcow2'))).code).toBe(0);
    expect(checkOf(f('lc.qcow2'))).toBe(checkOf(f('qc.qcow2')));
    expect(checkOf(f('lc.qcow2'))).toBe(128);
  });

  it('--target-is-zero -n: zero runs are not written into the existing target; -m 1 -W copy the same bytes', async () => {
    for (const t of ['q', 'l']) qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', f(`tz-${t}.qcow2`), '8M']);
    qemuImg(['convert', '-f', 'raw', '-n', '--target-is-zero', '-O', 'qcow2', f('in.raw'), f('tz-q.qcow2')]);
    const r = await runCli('convert', '-f', 'raw', '-n', '--target-is-zero', '-m', '1', '-W', '-O', 'qcow2', f('in.raw'), f('tz-l.qcow2'));
    expect(r.code, r.err).toBe(0);
    expect(mapOf(f('tz-l.qcow2'), 'qcow2')).toEqual(mapOf(f('tz-q.qcow2'), 'qcow2'));
    expect(spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', f('in.raw'), f('tz-l.qcow2')]).status).toBe(0);
    // raw: into a sparse file of the right length, eight requests in flight
    for (const t of ['q', 'l']) qemuImg(['create', '-q', '-f', 'raw', f(`tz-${t}.raw`), '8M']);
    qemuImg(['convert', '-f', 'raw', '-n', '--target-is-zero', '-O', 'raw', f('in.raw'), f('tz-q.raw')]);
    expect((await runCli('convert', '-f', 'raw', '-n', '--target-is-zero', '-m', '8', '-O', 'raw', f('in.raw'), f('tz-l.raw'))).code).toBe(0);
    expect(mapOf(f('tz-l.raw'), 'raw')).toEqual(mapOf(f('tz-q.raw'), 'raw'));
    expect(spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', f('in.raw'), f('tz-l.raw')]).status).toBe(0);
  });
});

describe('the -S rule (sparse.ts)', () => {
  it('covers the buffer with alternating runs, leaves out no nonzero byte, and writes no zero run of -S aligned sectors between zero runs', () => {
    const sector = fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 255 }));
    fc.assert(
      fc.property(
        fc.array(fc.tuple(sector, fc.integer({ min: 1, max: 40 })), { minLength: 1, maxLength: 30 }),
        fc.constantFrom(0, 512, 1024, 1536, 4096, 8192, 65536),
        fc.integer({ min: 0, max: 64 }),
        (pieces, bytes, startSector) => {
          const b = new Uint8Array(pieces.reduce((n, [, k]) => n + k * 512, 0));
          let at = 0;
          for (const [v, k] of pieces) {
            // a nonzero sector holds one nonzero byte somewhere in it
            for (let s = 0; s < k; s++, at += 512) if (v) b[at + ((v * 37 + s) % 512)] = v;
          }
          const runs = sparseRuns(b, startSector * 512, sparseRule(bytes));
          expect(runs[0]!.from).toBe(0);
          expect(runs[runs.length - 1]!.to).toBe(b.length);
          for (let i = 1; i < runs.length; i++) {
            expect(runs[i]!.from).toBe(runs[i - 1]!.to);
            expect(runs[i]!.data).not.toBe(runs[i - 1]!.data);
          }
          for (const r of runs) if (!r.data) expect(b.subarray(r.from, r.to).every((x) => x === 0)).toBe(true);
          if (bytes === 0) expect(runs).toEqual([{ from: 0, to: b.length, data: true }]);
        },
      ),
      { numRuns: RUNS },
    );
  });
});
