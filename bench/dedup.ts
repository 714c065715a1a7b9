/**
 * Dedup benchmark (BENCH_ONLY=dedup): qledger with dedup off against
 * dedup on, in the same run, on the same inputs, at the same durability
 * (every timed session ends with the image's close: a flush of data and
 * metadata). There is no QEMU counterpart (QEMU has no dedup), so the
 * comparison is the engine against itself. Results are checked before
 * anything counts: the two images of a pair must read the same (qemu-img
 * compare) and check clean.
 *
 *   realistic  two ext4 images made with mke2fs -d from overlapping trees
 *              (BENCH_DEDUP_A, default /usr/lib; BENCH_DEDUP_B, default
 *              /usr/lib and /usr/share) written one after the other into
 *              one image: stored bytes with dedup off, online, and offline
 *              (qledger dedup of the dedup-off image), at 4 KiB and 64 KiB
 *              clusters
 *   unique     1 GiB of random data (BENCH_DEDUP_MIB) written in 1 MiB writes
 *   duplicate  the same 1 GiB written again, at another offset, by a new
 *              session (dedup on loads the index the first one persisted;
 *              BENCH_DEDUP_REBUILD=1 makes it rebuild the index from the
 *              image instead), and a third time by a session whose index
 *              is in memory already
 *   memory     the index's bytes per unique cluster at 1,000,000 unique
 *              clusters (512-byte clusters), and the heap the build adds
 *   offline    peak RSS of qledger dedup on a 10 GiB image (BENCH_DEDUP_OFFLINE_GIB)
 *
 * Timings: median of BENCH_RUNS (default 3) rounds, the two variants
 * alternating which goes first.
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, openSync, readSync, closeSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Image } from '../src/engine/image.ts';
import { isZero } from '../src/format/bytes.ts';
import { alternate, median } from './common.ts';

const runs = Number(process.env['BENCH_RUNS'] ?? 3);
const mib = Number(process.env['BENCH_DEDUP_MIB'] ?? 1024);
const offlineGiB = Number(process.env['BENCH_DEDUP_OFFLINE_GIB'] ?? 10);
const treeA = (process.env['BENCH_DEDUP_A'] ?? '/usr/lib').split(':');
const treeB = (process.env['BENCH_DEDUP_B'] ?? '/usr/lib:/usr/share').split(':');
const root = new URL('..', import.meta.url).pathname;
const qledger = join(root, 'tools/qledger');
const dir = mkdtempSync(join(tmpdir(), 'qledger-bench-dedup-'));
const MiB = 1 << 20;

const allocated = (p: string) => statSync(p).blocks * 512;
const gib = (n: number) => `${(n / 2 ** 30).toFixed(2)} GiB`;

function checkPair(a: string, b: string, what: string): void {
  for (const f of [a, b]) {
    const ck = spawnSync('qemu-img', ['check', f], { encoding: 'utf8' });
    if (ck.status !== 0) throw new Error(`${what}: qemu-img check ${f}: ${ck.stdout}${ck.stderr}`);
  }
  if (spawnSync('qemu-img', ['compare', '-q', a, b]).status !== 0) throw new Error(`${what}: the two images read differently`);
}

/** Copy a raw file's non-zero MiB chunks into the image at `at`. */
async function copyRaw(img: Image, raw: string, at: number): Promise<void> {
  const fd = openSync(raw, 'r');
  const buf = new Uint8Array(MiB);
  try {
    for (let off = 0; ; off += MiB) {
      const n = readSync(fd, buf, 0, MiB, off);
      if (n <= 0) break;
      const piece = buf.subarray(0, n);
      if (!isZero(piece)) await img.write(at + off, piece);
    }
  } finally {
    closeSync(fd);
  }
}

/** An ext4 image of the trees (mke2fs -d copies one directory: the trees go under one staging directory of hard links). */
function ext4Of(trees: string[], name: string): string {
  const stage = join(dir, `stage-${name}`);
  execFileSync('mkdir', ['-p', stage]);
  for (const t of trees) execFileSync('cp', ['-al', t, join(stage, t.replace(/\//g, '_'))]);
  const bytes = Number(execFileSync('du', ['-sb', stage], { encoding: 'utf8' }).split('\t')[0]);
  const img = join(dir, `${name}.ext4`);
  const size = Math.ceil((bytes * 1.3 + 256 * MiB) / MiB) * MiB;
  execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-d', stage, img, `${size / 1024}k`]);
  rmSync(stage, { recursive: true, force: true });
  return img;
}

async function timed(fn: () => Promise<void>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

try {
  if (spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status !== 0) throw new Error('bench: qemu-img not found (apt-get install qemu-utils): the result checks need it');
  console.log(`dedup benchmark, ${new Date().toISOString().slice(0, 10)}; qledger dedup off against dedup on, same inputs, every session closed (flushed)`);

  // ---- realistic data set ----
  if (spawnSync('mke2fs', ['-V'], { stdio: 'ignore' }).status === 0 && process.env['BENCH_DEDUP_SKIP_REAL'] === undefined) {
    const a = ext4Of(treeA, 'a');
    const b = ext4Of(treeB, 'b');
    const sa = statSync(a).size;
    const sb = statSync(b).size;
    console.log(`realistic: ext4 A from ${treeA.join(' + ')} (${gib(sa)}), ext4 B from ${treeB.join(' + ')} (${gib(sb)}), written one after the other into one image`);
    for (const cs of [4096, 65536]) {
      const res: Record<string, { stored: number; alloc: number; seconds: number; ratio: number }> = {};
      for (const mode of ['off', 'online'] as const) {
        const p = join(dir, `real-${cs}-${mode}.qcow2`);
        await Image.create(p, { size: sa + sb, clusterSize: cs });
        const seconds = await timed(async () => {
          const img = await Image.open(p, { write: true, dedup: mode === 'online' });
          await copyRaw(img, a, 0);
          await copyRaw(img, b, sa);
          await img.close();
        });
        const r = await Image.open(p);
        const st = await r.dedupState();
        await r.close();
        res[mode] = { stored: st.storedClusters * cs, alloc: allocated(p), seconds, ratio: st.ratio };
      }
      checkPair(join(dir, `real-${cs}-off.qcow2`), join(dir, `real-${cs}-online.qcow2`), `realistic ${cs}`);
      const off = join(dir, `real-${cs}-off.qcow2`);
      const t0 = process.hrtime.bigint();
      execFileSync(qledger, ['dedup', '-q', off]);
      const offSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
      const r = await Image.open(off);
      const st = await r.dedupState();
      await r.close();
      res['offline'] = { stored: st.storedClusters * cs, alloc: allocated(off), seconds: offSeconds, ratio: st.ratio };
      if (spawnSync('qemu-img', ['check', off]).status !== 0) throw new Error('offline dedup: check failed');
      if (spawnSync('qemu-img', ['compare', '-q', off, join(dir, `real-${cs}-online.qcow2`)]).status !== 0) throw new Error('offline dedup changed the content');
      for (const [mode, x] of Object.entries(res)) {
        console.log(`  ${cs / 1024} KiB clusters, dedup ${mode.padEnd(7)}: data stored ${gib(x.stored)}, file allocated ${gib(x.alloc)}, ratio ${x.ratio.toFixed(3)}, ${x.seconds.toFixed(1)} s${mode === 'offline' ? ' (the qledger dedup pass alone)' : ' (writing both file systems)'}`);
      }
      for (const m of ['off', 'online']) rmSync(join(dir, `real-${cs}-${m}.qcow2`));
    }
    rmSync(a);
    rmSync(b);
  } else console.log('realistic: skipped (mke2fs not found, or BENCH_DEDUP_SKIP_REAL set)');

  // ---- throughput ----
  const data = new Uint8Array(mib * MiB);
  for (let o = 0; o < data.length; o += 64 * MiB) randomFillSync(data.subarray(o, Math.min(data.length, o + 64 * MiB)));
  const write = async (img: Image, at: number) => {
    for (let o = 0; o < data.length; o += MiB) await img.write(at + o, data.subarray(o, o + MiB));
  };
  const t: Record<string, number[]> = { uniqueOff: [], uniqueOn: [], dupOff: [], dupOn: [], warmOff: [], warmOn: [] };
  for (let i = 0; i < runs; i++) {
    const paths = { off: join(dir, 'tp-off.qcow2'), on: join(dir, 'tp-on.qcow2') };
    const variant = (mode: 'off' | 'on') => async () => {
      await Image.create(paths[mode], { size: 3 * data.length });
      t[mode === 'off' ? 'uniqueOff' : 'uniqueOn']!.push(
        await timed(async () => {
          const img = await Image.open(paths[mode], { write: true, dedup: mode === 'on' });
          await write(img, 0);
          await img.close();
        }),
      );
    };
    const dup = (mode: 'off' | 'on') => async () => {
      // a read-write open without dedup in between clears the persisted index's bit: the next session rebuilds
      if (process.env['BENCH_DEDUP_REBUILD']) await (await Image.open(paths[mode], { write: true })).close();
      t[mode === 'off' ? 'dupOff' : 'dupOn']!.push(
        await timed(async () => {
          const img = await Image.open(paths[mode], { write: true, dedup: mode === 'on' });
          await write(img, data.length);
          await img.close();
        }),
      );
    };
    // the same, with the index already built (a long session: a server): the first MiB written
    // again untimed builds it, then the third copy is timed
    const warm = (mode: 'off' | 'on') => async () => {
      const img = await Image.open(paths[mode], { write: true, dedup: mode === 'on' });
      await img.write(0, data.subarray(0, MiB));
      t[mode === 'off' ? 'warmOff' : 'warmOn']!.push(
        await timed(async () => {
          await write(img, 2 * data.length);
          await img.close();
        }),
      );
    };
    // alternate() takes synchronous thunks: run each pair in the order it picks
    for (const pair of [variant, dup, warm]) {
      const order: Array<() => Promise<void>> = [];
      alternate(i, () => order.push(pair('off')), () => order.push(pair('on')));
      for (const f of order) await f();
    }
    checkPair(paths.off, paths.on, `throughput round ${i}`);
    if (i === runs - 1) console.log(`  after the duplicate passes: dedup off allocates ${gib(allocated(paths.off))}, dedup on ${gib(allocated(paths.on))}`);
    rmSync(paths.off);
    rmSync(paths.on);
  }
  const mbps = (s: number) => `${(mib / s).toFixed(0)} MiB/s`;
  console.log(`throughput (${mib} MiB in 1 MiB writes, 64 KiB clusters, median of ${runs}, alternating; session open to close):`);
  console.log(`  unique random data: dedup off ${mbps(median(t['uniqueOff']!))}, on ${mbps(median(t['uniqueOn']!))}: ratio ${(median(t['uniqueOff']!) / median(t['uniqueOn']!)).toFixed(2)} of dedup off's speed`);
  console.log(`  duplicating stored data, a new session (dedup on loads the index the first session persisted): dedup off ${mbps(median(t['dupOff']!))}, on ${mbps(median(t['dupOn']!))}: ratio ${(median(t['dupOff']!) / median(t['dupOn']!)).toFixed(2)}`);
  console.log(`  duplicating stored data, the index already built: dedup off ${mbps(median(t['warmOff']!))}, on ${mbps(median(t['warmOn']!))}: ratio ${(median(t['warmOff']!) / median(t['warmOn']!)).toFixed(2)}`);

  // ---- memory ----
  {
    const n = 1_000_000;
    const p = join(dir, 'mem.qcow2');
    await Image.create(p, { size: n * 512 + MiB, clusterSize: 512 });
    const w = await Image.open(p, { write: true });
    const chunk = new Uint8Array(MiB);
    for (let o = 0; o < n * 512; o += MiB) {
      randomFillSync(chunk);
      await w.write(o, chunk.subarray(0, Math.min(MiB, n * 512 - o)));
    }
    await w.close();
    const img = await Image.open(p, { write: true, dedup: true, cacheBytes: 0 });
    const gc = (globalThis as { gc?: () => void }).gc;
    gc?.();
    const m0 = process.memoryUsage();
    const probe = new Uint8Array(512);
    randomFillSync(probe);
    await img.write(n * 512, probe); // the first whole-cluster write builds the index
    gc?.();
    const m1 = process.memoryUsage();
    const d = img.writer!.dedup!;
    const heap = m1.heapUsed + m1.arrayBuffers - (m0.heapUsed + m0.arrayBuffers);
    console.log(`memory: ${d.indexEntries} unique clusters indexed; the index's arrays ${(d.indexBytes / d.indexEntries).toFixed(2)} bytes per cluster; heap and buffers grew by ${(heap / d.indexEntries).toFixed(2)} bytes per cluster during the build (L2 tables loaded for it included${gc ? '' : '; run with --expose-gc for a settled figure'})`);
    await img.close();
    rmSync(p);
  }

  // ---- offline pass on a large image ----
  if (offlineGiB > 0) {
    const p = join(dir, 'big.qcow2');
    await Image.create(p, { size: offlineGiB * 2 ** 30 });
    const img = await Image.open(p, { write: true });
    const half = Math.floor(data.length / MiB);
    // the random GiB over and over: every cluster after the first GiB duplicates one
    for (let o = 0; o < offlineGiB * 1024; o++) await img.write(o * MiB, data.subarray((o % half) * MiB, (o % half + 1) * MiB));
    await img.close();
    const before = allocated(p);
    const r = spawnSync('/usr/bin/time', ['-v', qledger, 'dedup', '--output=json', p], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`qledger dedup: ${r.stderr}`);
    const rss = Number(/Maximum resident set size \(kbytes\): (\d+)/.exec(r.stderr)?.[1] ?? NaN) * 1024;
    const wall = /Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)/.exec(r.stderr)?.[1];
    const j = JSON.parse(r.stdout) as Record<string, number>;
    if (spawnSync('qemu-img', ['check', p]).status !== 0) throw new Error('offline dedup of the big image: check failed');
    console.log(`offline: qledger dedup of a ${offlineGiB} GiB image (${j['clusters-scanned']} clusters): ${j['clusters-merged']} merged, allocated ${gib(before)} -> ${gib(allocated(p))}, peak RSS ${(rss / MiB).toFixed(0)} MiB, wall ${wall}`);
    rmSync(p);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
