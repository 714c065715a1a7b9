/**
 * The overlap index (issue 17), in one run:
 *   cost    the random-write case (20,000 4 KiB writes into new clusters of
 *           a 100 GiB image) and 1 GiB of sequential 1 MiB writes, in
 *           process, files on /dev/shm (tmpfs: the disk's variance between
 *           runs would hide 2%), with --overlap-check=all against none, in
 *           pairs with the order alternating, BENCH_RUNS pairs (default 8);
 *           the two result files must be
 *           byte-identical and pass qemu-img check before anything counts.
 *           Also the cost of one check, measured on the index the run built.
 *   memory  the index of metadata-preallocated images of 1 TiB and 16 TiB
 *           at 64 KiB clusters (sparse files; 16 TiB on /dev/shm, which
 *           ext4's file size limit leaves no room for), without and with ten
 *           internal snapshots made by qemu-img: the V8 heap the index holds
 *           (measured with gc), against Reitz's 170 kB per TB.
 *   open    an image with 100 internal snapshots opened read-write with
 *           `all` against `cached`: the whole open, and the part that reads
 *           the snapshots' L1 tables for the inactive L2 tables.
 * BENCH_OVERLAP=cost|memory|open runs one part; BENCH_BIG=0 skips the 16 TiB
 * images (they take about ten minutes to build).
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Image } from '../src/engine/image.ts';
import { loadQcow2 } from '../src/engine/qcow2-layer.ts';
import { readJournal } from '../src/engine/journal/locate.ts';
import { OverlapIndex, type OverlapMode } from '../src/engine/write/overlap.ts';
import { buildOverlapIndex } from '../src/engine/write/overlap-build.ts';
import { FileDevice } from '../src/io/file-device.ts';
import { readAt } from '../src/io/device.ts';
import { median, randomWriteCommands } from './common.ts';

const runs = Number(process.env['BENCH_RUNS'] ?? 8);
const part = process.env['BENCH_OVERLAP'];
const big = process.env['BENCH_BIG'] !== '0';
const dir = mkdtempSync(join(tmpdir(), 'qledger-obench-'));
// the cost part writes to /dev/shm where it exists: a disk's own variance (tens of percent between runs
// here) would hide a 2% difference; tmpfs leaves the CPU work, which is what the index adds
const fast = existsSync('/dev/shm') ? mkdtempSync('/dev/shm/qledger-obench-') : dir;
const gc = (globalThis as { gc?: () => void }).gc;

const qimg = (...args: string[]) => execFileSync('qemu-img', args, { stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 1 << 26 });
const sha = (f: string) => createHash('sha256').update(readFileSync(f)).digest('hex');

/** The file's bytes, hashed, with the journal area's header sector (its random generation) left out. */
async function shaWithoutGeneration(f: string): Promise<string> {
  const b = readFileSync(f);
  const j = await readJournal(f);
  if (j.area) b.fill(0, j.area.offset, j.area.offset + 512);
  return createHash('sha256').update(b).digest('hex');
}

async function writeAll(path: string, mode: OverlapMode, writes: ReadonlyArray<readonly [number, number]>): Promise<{ seconds: number; checks: number }> {
  const data = new Uint8Array(1 << 20).fill(7);
  const t0 = process.hrtime.bigint();
  const img = await Image.open(path, { write: true, overlapCheck: mode });
  for (const [off, len] of writes) await img.write(off, data.subarray(0, len));
  const checks = img.writer!.overlap.checks;
  await img.close();
  return { seconds: Number(process.hrtime.bigint() - t0) / 1e9, checks };
}

async function cost(): Promise<void> {
  const random = randomWriteCommands().map((c) => {
    const m = / (\d+) 4k$/.exec(c)!;
    return [Number(m[1]), 4096] as const;
  });
  const seq = Array.from({ length: 1024 }, (_, i) => [i * 2 ** 20, 2 ** 20] as const);
  console.log(`overlap check cost: in process, files on ${fast}, ${runs} runs each mode, alternating, median (writeback, flushed at close, journal on)`);
  console.log('| case | overlap-check=none (median) | overlap-check=all (median) | overhead (geometric mean of the paired ratios) | device writes checked |');
  console.log('|---|---|---|---|---|');
  const checked: Record<string, number> = {};
  for (const [name, size, writes] of [
    ['20,000 random 4 KiB writes into new clusters, 100 GiB image', '100G', random],
    ['sequential 1 GiB in 1 MiB writes', '1G', seq],
  ] as const) {
    if (process.env['BENCH_CASE'] && !name.includes(process.env['BENCH_CASE'])) continue;
    const t: Record<'none' | 'all', number[]> = { none: [], all: [] };
    for (let i = 0; i < runs; i++) {
      const order: Array<'none' | 'all'> = i % 2 ? ['all', 'none'] : ['none', 'all'];
      const files: Record<string, string> = {};
      for (const mode of order) {
        const f = join(fast, `${mode}.qcow2`);
        qimg('create', '-q', '-f', 'qcow2', f, size);
        spawnSync('sync');
        const r = await writeAll(f, mode, writes);
        t[mode].push(r.seconds);
        checked[name] = r.checks;
        files[mode] = f;
      }
      // the index changes no byte: both files equal, both check clean
      if ((await shaWithoutGeneration(files['all']!)) !== (await shaWithoutGeneration(files['none']!))) throw new Error(`${name}: the images differ between modes`);
      for (const f of Object.values(files)) {
        const r = spawnSync('qemu-img', ['check', f]);
        if (r.status !== 0) throw new Error(`${name}: qemu-img check failed`);
        rmSync(f);
      }
    }
    const a = median(t.all);
    const n = median(t.none);
    // the runs come in pairs, each mode first in half of them: the geometric mean of the pairs'
    // ratios cancels what the position in a pair costs (the first of a pair runs slower here)
    const logs = t.all.map((x, i) => Math.log(x / t.none[i]!));
    const paired = Math.exp(logs.reduce((p, q) => p + q, 0) / logs.length);
    console.log(`| ${name} | ${n.toFixed(3)} s | ${a.toFixed(3)} s | ${((paired - 1) * 100).toFixed(2)}% (medians: ${((a / n - 1) * 100).toFixed(2)}%) | ${checked[name]} (before close) |`);
    if (process.env['BENCH_VERBOSE']) console.log(`  none: ${t.none.map((x) => x.toFixed(3)).join(' ')}\n  all:  ${t.all.map((x) => x.toFixed(3)).join(' ')}`);
  }
  // one check, on the index of an image after the random case
  const f = join(dir, 'probe.qcow2');
  qimg('create', '-q', '-f', 'qcow2', f, '100G');
  await writeAll(f, 'all', random);
  const img = await Image.open(f, { write: true, overlapCheck: 'all' });
  const index = img.writer!.overlap.index;
  const hosts = random.map((_, i) => (i * 7919 * 65536) % (24000 * 65536));
  const N = 2_000_000;
  let hits = 0;
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < N; i++) if (index.conflict(hosts[i % hosts.length]!, 4096, 0)) hits++;
  const ns = Number(process.hrtime.bigint() - t0) / N;
  await img.close();
  rmSync(f);
  console.log(`\none check (index of ${index.fragments} fragments, after the random case): ${ns.toFixed(0)} ns (${hits} of ${N} probes hit metadata)`);
  for (const [name, n] of Object.entries(checked)) console.log(`  ${name}: ${n} checks x ${ns.toFixed(0)} ns = ${((n * ns) / 1e6).toFixed(1)} ms`);
}

/** The V8 heap an index built from `path` holds, measured around the build with gc. */
async function indexMemory(path: string): Promise<{ bytes: number; estimate: number; fragments: number; size: number; snapshots: number }> {
  const dev = await FileDevice.open(path, { readOnly: true });
  try {
    const { parsed, snapshots, snapshotTableBytes } = await loadQcow2(dev);
    const h = parsed.header;
    const cs = 2 ** h.clusterBits;
    const l1 = await readAt(dev, h.l1TableOffset, h.l1Size * 8);
    const reftable = await readAt(dev, h.refcountTableOffset, h.refcountTableClusters * cs);
    const build = async () => {
      const index = new OverlapIndex({ clusterSize: cs }, 'all');
      await buildOverlapIndex(index, { dev, parsed, l1, reftable, snapshots, snapshotTableBytes });
      return index;
    };
    // once first, so that compiled code and feedback are not counted as the index's; then
    // ten kept alive at once, so that the heap's own noise (tens of kB) is divided by ten
    await build();
    gc!();
    gc!();
    const before = process.memoryUsage().heapUsed;
    const kept: OverlapIndex[] = [];
    for (let i = 0; i < 10; i++) kept.push(await build());
    gc!();
    gc!();
    const after = process.memoryUsage().heapUsed;
    const index = kept[0]!;
    return { bytes: (after - before) / 10, estimate: index.bytes(), fragments: index.fragments, size: h.size, snapshots: snapshots.length };
  } finally {
    await dev.close();
  }
}

async function memory(): Promise<void> {
  if (!gc) throw new Error('bench/overlap.ts memory needs node --expose-gc (npm run bench passes it)');
  const images: Array<[string, string, string]> = [['1 TiB', dir, '1T']];
  if (big) {
    const shm = '/dev/shm/qledger-obench';
    mkdirSync(shm, { recursive: true });
    images.push(['16 TiB', shm, '16T']);
  }
  console.log('\nindex memory: metadata-preallocated images, 64 KiB clusters, V8 heap held by the index (gc before and after its build)');
  console.log('| image | snapshots | fragments | heap | per TB (10^12 bytes) | against 170 kB/TB |');
  console.log('|---|---|---|---|---|---|');
  for (const [name, where, size] of images) {
    const f = join(where, `prealloc-${size}.qcow2`);
    if (!existsSync(f)) qimg('create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', f, size);
    for (const snaps of [0, 10]) {
      if (snaps) for (let i = 1; i <= 10; i++) qimg('snapshot', '-c', `s${i}`, f);
      const m = await indexMemory(f);
      const perTB = m.bytes / (m.size / 1e12);
      console.log(`| ${name} | ${m.snapshots} | ${m.fragments} | ${(m.bytes / 1024).toFixed(1)} KiB (estimate ${(m.estimate / 1024).toFixed(1)} KiB) | ${(perTB / 1000).toFixed(1)} kB | ${((perTB / 170_000) * 100).toFixed(0)}% |`);
    }
    rmSync(f);
  }
}

async function open(): Promise<void> {
  // 1 TiB virtual, one cluster written in each of 256 L2 ranges, then 100 snapshots with
  // three ranges rewritten after each (so the snapshots' trees differ)
  const f = join(dir, 'snaps.qcow2');
  qimg('create', '-q', '-f', 'qcow2', f, '1T');
  const span = 2 ** 29;
  execFileSync('qemu-io', [...Array.from({ length: 256 }, (_, i) => ['-c', `write -q -P 1 ${i * 8 * span} 64k`]).flat(), f]);
  for (let s = 1; s <= 100; s++) {
    qimg('snapshot', '-c', `s${s}`, f);
    execFileSync('qemu-io', [...[0, 1, 2].flatMap((k) => ['-c', `write -q -P ${s % 250} ${((s * 3 + k) % 256) * 8 * span} 4k`]), f]);
  }
  console.log('\nopen with 100 internal snapshots (1 TiB virtual, 256 L2 tables active): read-write open and close, median of runs, alternating');
  console.log('| mode | whole open (and close) | snapshot L1 reads and their runs | index build from the runs |');
  console.log('|---|---|---|---|');
  const t: Record<'cached' | 'all', number[]> = { cached: [], all: [] };
  const part: number[] = [];
  const loads: Record<'cached' | 'all', number[]> = { cached: [], all: [] };
  const before = sha(f);
  for (let i = 0; i < runs; i++) {
    for (const mode of i % 2 ? (['all', 'cached'] as const) : (['cached', 'all'] as const)) {
      const t0 = process.hrtime.bigint();
      const img = await Image.open(f, { write: true, overlapCheck: mode });
      t[mode].push(Number(process.hrtime.bigint() - t0) / 1e6);
      await img.close();
    }
    // the build alone, as the writer runs it
    const dev = await FileDevice.open(f, { readOnly: true });
    const { parsed, snapshots, snapshotTableBytes } = await loadQcow2(dev);
    const h = parsed.header;
    const l1 = await readAt(dev, h.l1TableOffset, h.l1Size * 8);
    const reftable = await readAt(dev, h.refcountTableOffset, h.refcountTableClusters * 2 ** h.clusterBits);
    const r = await buildOverlapIndex(new OverlapIndex({ clusterSize: 2 ** h.clusterBits }, 'all'), { dev, parsed, l1, reftable, snapshots, snapshotTableBytes });
    part.push(r.inactiveL2Ms);
    loads.all.push(r.loadMs);
    loads.cached.push((await buildOverlapIndex(new OverlapIndex({ clusterSize: 2 ** h.clusterBits }, 'cached'), { dev, parsed, l1, reftable, snapshots, snapshotTableBytes })).loadMs);
    await dev.close();
  }
  if (sha(f) !== before) throw new Error('an open that writes nothing changed the image');
  console.log(`| cached | ${median(t.cached).toFixed(1)} ms | not read | ${median(loads.cached).toFixed(1)} ms |`);
  console.log(`| all | ${median(t.all).toFixed(1)} ms | ${median(part).toFixed(1)} ms | ${median(loads.all).toFixed(1)} ms |`);
  rmSync(f);
}

try {
  if (spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status !== 0) throw new Error('bench: qemu-img not found (apt-get install qemu-utils)');
  if (!part || part === 'cost') await cost();
  if (!part || part === 'memory') await memory();
  if (!part || part === 'open') await open();
} finally {
  rmSync(dir, { recursive: true, force: true });
  rmSync(fast, { recursive: true, force: true });
}
