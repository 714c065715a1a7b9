/**
 * Read benchmark (npm run bench, or BENCH_ONLY=read): read a fully allocated 1 GiB qcow2 image to raw with
 * `qledger convert -O raw` and with `qemu-img convert -O raw`, in the same run,
 * whole processes timed, median of several runs. Prints MiB/s and the ratio.
 * BENCH_SIZE_MB and BENCH_RUNS override the defaults (1024, 5).
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, openSync, writeSync, closeSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { timeProcess } from './common.ts';

const sizeMb = Number(process.env['BENCH_SIZE_MB'] ?? 1024);
const runs = Number(process.env['BENCH_RUNS'] ?? 5);
const root = new URL('..', import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), 'qledger-bench-'));

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

const time = timeProcess;

try {
  if (spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status !== 0) {
    console.error('bench: qemu-img not found (apt-get install qemu-utils): the comparison needs it');
    process.exit(1);
  }
  // Source: non-zero data in every cluster, so every cluster is allocated.
  const raw = join(dir, 'src.raw');
  const fd = openSync(raw, 'w');
  const mb = Buffer.alloc(1 << 20);
  for (let i = 0; i < sizeMb; i++) {
    for (let j = 0; j < mb.length; j += 8) mb.writeUInt32BE((i * 2654435761 + j) >>> 0, j);
    writeSync(fd, mb);
  }
  closeSync(fd);
  const img = join(dir, 'bench.qcow2');
  execFileSync('qemu-img', ['convert', '-O', 'qcow2', raw, img]);
  rmSync(raw);
  const map = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', img], { encoding: 'utf8' })) as Array<{ data: boolean; length: number }>;
  const allocated = map.filter((e) => e.data).reduce((n, e) => n + e.length, 0);

  const qledger = join(root, 'tools/qledger');
  const out = join(dir, 'out.raw');
  const ours: number[] = [];
  const theirs: number[] = [];
  // warm the page cache once, then alternate so both see the same conditions
  time('qemu-img', ['convert', '-O', 'raw', img, out]);
  for (let i = 0; i < runs; i++) {
    rmSync(out, { force: true });
    theirs.push(time('qemu-img', ['convert', '-O', 'raw', img, out]));
    rmSync(out, { force: true });
    ours.push(time(qledger, ['convert', '-O', 'raw', img, out]));
  }
  const size = statSync(out).size;
  const o = median(ours);
  const t = median(theirs);
  const mibs = (s: number) => size / 2 ** 20 / s;
  console.log(`image: ${sizeMb} MiB virtual, ${allocated / 2 ** 20} MiB allocated, 64 KiB clusters; ${runs} runs each, median, whole process`);
  console.log(`qemu-img convert -O raw : ${t.toFixed(3)} s  ${mibs(t).toFixed(0)} MiB/s`);
  console.log(`qledger convert -O raw  : ${o.toFixed(3)} s  ${mibs(o).toFixed(0)} MiB/s`);
  console.log(`ratio (qledger throughput / qemu-img throughput): ${(t / o).toFixed(2)}`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
