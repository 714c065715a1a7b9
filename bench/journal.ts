/**
 * Journal benchmarks (issue 6), median of BENCH_RUNS (default 3):
 *
 * (a) recovery after a crash on an image with 1,048,576 allocated clusters
 *     (qemu-img create -o preallocation=metadata,cluster_size=4k, 4 GiB,
 *     grown to 5 GiB): a qledger session's last write-back stops after its
 *     first in-place phase, as a power cut would (refcount increments
 *     durable, L2 entries not: leaks). Two such write-backs:
 *       compact    2,000 new clusters written in order and 20 freed: it
 *                  names a handful of tables
 *       scattered  2,000 clusters freed and 2,000 allocated at random:
 *                  it names about 4,000 tables (the worst case for replay)
 *     Copies of that image are then repaired by
 *     `qemu-img check -r leaks` (whole process) and recovered by qledger's
 *     journal replay: in-process (the recovery step of a read-write open,
 *     which is what the ratio uses) and as a whole `qledger io -c flush`
 *     process (Node's start-up included). Both results must check clean.
 *
 * (b) the journal's cost on the write engine's three benchmarks, counted
 *     exactly: bytes written and flushes issued by an in-process run with
 *     and without the journal. (The wall-clock cost is in the write
 *     benchmark's last column, from the same kind of runs.)
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crashedImage, median } from './common.ts';
import { Image } from '../src/engine/image.ts';
import { FileDevice } from '../src/io/file-device.ts';
import { loadQcow2 } from '../src/engine/qcow2-layer.ts';
import { recoverJournal } from '../src/engine/journal/replay.ts';
import type { TraceEvent } from '../src/engine/writer.ts';

const runs = Number(process.env['BENCH_RUNS'] ?? 3);
const root = new URL('..', import.meta.url).pathname;
const qledger = join(root, 'tools/qledger');
const dir = mkdtempSync(join(tmpdir(), 'qledger-jbench-'));

function timed(cmd: string, args: string[]): number {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 26 });
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.status}\n${r.stdout}${r.stderr}`);
  return s;
}

function qemuCheck(img: string): { status: number | null; out: string } {
  const r = spawnSync('qemu-img', ['check', img], { encoding: 'utf8' });
  return { status: r.status, out: r.stdout };
}

async function recoverInProcess(path: string): Promise<{ s: number; action: string; records: number }> {
  const t0 = process.hrtime.bigint();
  const dev = await FileDevice.open(path, { readOnly: false });
  const { parsed, fileSize } = await loadQcow2(dev);
  const r = await recoverJournal(dev, path, parsed, fileSize);
  await dev.close();
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  return { s, action: r.action, records: r.records ?? 0 };
}

async function counted(make: (p: string) => void, work: (img: Image) => Promise<void>, journal: boolean): Promise<{ bytes: number; flushes: number; journalBytes: number }> {
  const p = join(dir, 'cost.qcow2');
  make(p);
  const trace: TraceEvent[] = [];
  const img = await Image.open(p, { write: true, trace, journal });
  await work(img);
  await img.close();
  rmSync(p);
  let bytes = 0;
  let flushes = 0;
  let journalBytes = 0;
  for (const e of trace) {
    if (e.type === 'write' && !e.what.startsWith('hole')) {
      bytes += e.length;
      if (/\[(journal|checkpoint|journal set-up)\]$/.test(e.what)) journalBytes += e.length;
    } else if (e.type === 'flush') flushes++;
  }
  return { bytes, flushes, journalBytes };
}

try {
  // ---- (a)
  console.log('(a) recovery after a crash, 1,048,576 allocated 4 KiB clusters');
  console.log('| last write-back | leaks qemu-img check finds | qemu-img check -r leaks (whole process) | qledger recovery, in-process | ratio | qledger io -c flush (whole process) | ratio |');
  console.log('|---|---|---|---|---|---|---|');
  for (const scattered of [false, true]) {
    const base = join(dir, 'crashed.qcow2');
    await crashedImage(base, scattered);
    const before = qemuCheck(base);
    const leaks = /(\d+) leaked clusters were found/.exec(before.out)?.[1] ?? '0';
    if (before.status !== 3) throw new Error(`the crashed image should have leaks only: qemu-img check exit ${before.status}`);
    const q: number[] = [];
    const ours: number[] = [];
    const proc: number[] = [];
    let records = 0;
    for (let i = 0; i < runs; i++) {
      const a = join(dir, 'a.qcow2');
      const b = join(dir, 'b.qcow2');
      const c = join(dir, 'c.qcow2');
      for (const f of [a, b, c]) execFileSync('cp', ['--sparse=always', base, f]);
      spawnSync('sync');
      const t0 = process.hrtime.bigint();
      const r = spawnSync('qemu-img', ['check', '-r', 'leaks', a], { encoding: 'utf8' });
      q.push(Number(process.hrtime.bigint() - t0) / 1e9);
      if (r.status !== 0) throw new Error(`qemu-img check -r leaks: exit ${r.status}\n${r.stdout}`);
      const rec = await recoverInProcess(b);
      if (rec.action !== 'replayed') throw new Error(`recovery did ${rec.action}`);
      ours.push(rec.s);
      records = rec.records;
      proc.push(timed(qledger, ['io', '-c', 'flush', c]));
      for (const f of [a, b, c]) {
        const k = qemuCheck(f);
        if (k.status !== 0) throw new Error(`${f} after recovery: qemu-img check exit ${k.status}\n${k.out}`);
      }
      for (const f of [a, b, c]) rmSync(f);
    }
    rmSync(base);
    const tq = median(q);
    const to = median(ours);
    const tp = median(proc);
    const ms = (t: number) => `${(t * 1000).toFixed(1)} ms`;
    console.log(`| ${scattered ? 'scattered' : 'compact'} (${records} records) | ${leaks} | ${ms(tq)} | ${ms(to)} | **${(tq / to).toFixed(0)}x** | ${ms(tp)} | ${(tq / tp).toFixed(1)}x |`);
  }
  console.log('Every image, repaired by QEMU or recovered by qledger, then passes qemu-img check with exit 0.');

  // ---- (b)
  console.log('\n(b) journal cost, counted in-process (bytes written to the image file and flushes, journal on vs off)');
  console.log('| case | bytes written, off | bytes written, on | of which journal | flushes, off | flushes, on |');
  console.log('|---|---|---|---|---|---|');
  const create = (size: string) => (p: string) => void execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', p, size]);
  const rnd = (() => {
    let x = 42;
    return () => ((x = (x * 48271) % 2147483647), x / 2147483647);
  })();
  const clusters = new Set<number>();
  while (clusters.size < 20000) clusters.add(Math.floor(rnd() * ((100 * 2 ** 30) / 65536)));
  const randomOffsets = [...clusters].map((c) => c * 65536 + Math.floor(rnd() * 16) * 4096);
  const MiB = new Uint8Array(1 << 20).fill(1);
  const four = new Uint8Array(4096).fill(7);
  const cases: Array<[string, (p: string) => void, (img: Image) => Promise<void>]> = [
    ['sequential 1 GiB in 1 MiB writes', create('1G'), async (img) => { for (let i = 0; i < 1024; i++) await img.write(i * 2 ** 20, MiB); }],
    ['20,000 random 4 KiB writes, 100 GiB image', create('100G'), async (img) => { for (const o of randomOffsets) await img.write(o, four); }],
    ['1 GiB zero write, empty image', create('1G'), (img) => img.writeZeroes(0, 2 ** 30)],
    [
      '1 GiB zero write over written data',
      (p) => {
        create('1G')(p);
        execFileSync('qemu-io', ['-c', 'write -q -P 3 0 1G', p]);
      },
      (img) => img.writeZeroes(0, 2 ** 30),
    ],
  ];
  const mb = (n: number) => `${(n / 2 ** 20).toFixed(2)} MiB`;
  for (const [name, make, work] of cases) {
    const off = await counted(make, work, false);
    const on = await counted(make, work, true);
    const pct = off.bytes ? ` (+${(((on.bytes - off.bytes) / off.bytes) * 100).toFixed(2)}%)` : '';
    console.log(`| ${name} | ${mb(off.bytes)} | ${mb(on.bytes)}${pct} | ${mb(on.journalBytes)} | ${off.flushes} | ${on.flushes} |`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
