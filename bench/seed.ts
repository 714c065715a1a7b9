/**
 * Seed-feature measurements (issue 7), qledger io against qemu-io in the
 * same run, device traffic counted with strace (pwrite*, write, fallocate
 * on the image's descriptors; stdout/stderr excluded):
 *   zero-detect  cost of zero detection on non-zero data: 1 GiB written in
 *                1 MiB requests with --detect-zeroes=off and =unmap (qledger only)
 *   batching     `write -z -u 0 64M` over 64 MiB of written data, 64 KiB clusters
 *   zero-cow     20,000 random 4 KiB writes to unallocated clusters of a 100 GiB image
 *   allocator    file size against allocated clusters after a mixed allocate/free workload
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, copyFileSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { rng } from '../src/io/crash-device.ts';

const root = new URL('..', import.meta.url).pathname;
const qledger = join(root, 'tools/qledger');
const dir = mkdtempSync(join(tmpdir(), 'qledger-seed-'));

interface Traffic {
  calls: number;
  bytes: number;
  fallocates: number;
}

function traced(cmd: string[], args: string[]): Traffic {
  const log = join(dir, 'strace.txt');
  const r = spawnSync('strace', ['-f', '-qq', '-y', '-e', 'trace=pwrite64,pwritev,pwritev2,write,fallocate', '-o', log, ...cmd, ...args], { stdio: ['ignore', 'ignore', 'pipe'], maxBuffer: 1 << 26 });
  if (r.status !== 0) throw new Error(`${cmd.join(' ')} failed: ${r.stderr}`);
  const t: Traffic = { calls: 0, bytes: 0, fallocates: 0 };
  for (const line of readFileSync(log, 'utf8').split('\n')) {
    // -y names each descriptor's file: count only the image's
    const m = /(pwrite64|pwritev2?|write|fallocate)\((\d+)<([^>]*)>,.*\)\s+=\s+(-?\d+)/.exec(line);
    if (!m || !m[3]!.endsWith('.qcow2')) continue;
    if (m[1] === 'fallocate') {
      t.fallocates++;
      continue;
    }
    if (Number(m[4]) < 0) continue;
    t.calls++;
    t.bytes += Number(m[4]);
  }
  return t;
}

const io = (cmds: string[]) => cmds.flatMap((c) => ['-c', c]);
const mib = (n: number) => `${(n / 2 ** 20).toFixed(2)} MiB`;
const create = (p: string, size: string, opts = 'cluster_size=65536') => execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, p, size]);

function timed(cmd: string, args: string[]): number {
  spawnSync('sync');
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { stdio: 'ignore' });
  if (r.status !== 0) throw new Error(`${cmd} failed`);
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

try {
  if (spawnSync('strace', ['-V'], { stdio: 'ignore' }).status !== 0) {
    console.error('bench: strace not found (apt-get install strace): the traffic counts need it');
    process.exit(1);
  }
  // ---- zero detection cost ----
  if (!process.env['BENCH_SEED_SKIP_DETECT']) {
    const cmds = io(Array.from({ length: 1024 }, (_, i) => `write -q -P 1 ${i}M 1M`));
    const off: number[] = [];
    const on: number[] = [];
    for (let i = 0; i < 3; i++) {
      const a = join(dir, 'a.qcow2');
      create(a, '1G');
      off.push(timed(qledger, ['io', '--detect-zeroes=off', ...cmds, a]));
      rmSync(a);
      create(a, '1G');
      on.push(timed(qledger, ['io', '--detect-zeroes=unmap', ...cmds, a]));
      rmSync(a);
    }
    const med = (x: number[]) => [...x].sort((p, q) => p - q)[1]!;
    console.log(`zero detection on non-zero data, 1 GiB in 1 MiB writes (median of 3): off ${med(off).toFixed(3)} s, unmap ${med(on).toFixed(3)} s, ratio ${(med(off) / med(on)).toFixed(2)}`);
  }
  // ---- batching: 64 MiB zero write over written data ----
  {
    const base = join(dir, 'base.qcow2');
    create(base, '64M');
    execFileSync('qemu-io', ['-c', 'write -P 3 0 64M', base]);
    const a = join(dir, 'a.qcow2');
    const b = join(dir, 'b.qcow2');
    copyFileSync(base, a);
    copyFileSync(base, b);
    const q = traced(['qemu-io'], [...io(['write -z -u 0 64M']), a]);
    const o = traced([qledger], ['io', ...io(['write -z -u 0 64M']), b]);
    if (spawnSync('qemu-img', ['compare', a, b]).status !== 0) throw new Error('batching: images differ');
    console.log(`write -z -u 0 64M over written data (64 KiB clusters): qemu-io ${q.calls} writes, ${mib(q.bytes)}, ${q.fallocates} fallocates; qledger ${o.calls} writes, ${mib(o.bytes)}, ${o.fallocates} fallocates`);
  }
  // ---- zero COW: random 4 KiB writes to unallocated clusters ----
  {
    const r = rng(42);
    const seen = new Set<number>();
    while (seen.size < 20000) seen.add(Math.floor(r() * ((100 * 2 ** 30) / 65536)));
    const cmds = io([...seen].map((c) => `write -q -P 7 ${c * 65536 + Math.floor(r() * 16) * 4096} 4k`));
    const a = join(dir, 'a.qcow2');
    const b = join(dir, 'b.qcow2');
    create(a, '100G');
    create(b, '100G');
    const q = traced(['qemu-io'], [...cmds, a]);
    const o = traced([qledger], ['io', ...cmds, b]);
    const du = (f: string) => Number(execFileSync('du', ['-B1', f], { encoding: 'utf8' }).split('\t')[0]);
    console.log(`20,000 random 4 KiB writes to unallocated 64 KiB clusters: payload ${mib(20000 * 4096)}; qemu-io wrote ${mib(q.bytes)} in ${q.calls} writes + ${q.fallocates} fallocates, file ${mib(statSync(a).size)}, disk use ${mib(du(a))}; qledger wrote ${mib(o.bytes)} in ${o.calls} writes + ${o.fallocates} fallocates, file ${mib(statSync(b).size)}, disk use ${mib(du(b))}`);
  }
  // ---- allocator: mixed allocate/free workload ----
  {
    const r = rng(7);
    const cmds: string[] = [];
    for (let round = 0; round < 20; round++) {
      for (let i = 0; i < 100; i++) cmds.push(`write -q -P ${1 + (i % 200)} ${Math.floor(r() * 1020) * 65536} ${(1 + Math.floor(r() * 4)) * 65536}`);
      for (let i = 0; i < 40; i++) cmds.push(`write -q -z -u ${Math.floor(r() * 1016) * 65536} ${(1 + Math.floor(r() * 8)) * 65536}`);
      cmds.push('flush');
    }
    const a = join(dir, 'a.qcow2');
    const b = join(dir, 'b.qcow2');
    create(a, '64M');
    create(b, '64M');
    const run = (c: string, args: string[]) => {
      const r2 = spawnSync(c, args, { stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });
      if (r2.status !== 0) throw new Error(`${c}: exit ${r2.status}: ${r2.stderr.slice(0, 300)}`);
    };
    run('qemu-io', ['--image-opts', ...io(cmds), `driver=qcow2,file.filename=${a},discard=unmap`]);
    run(qledger, ['io', ...io(cmds), b]);
    if (spawnSync('qemu-img', ['compare', a, b]).status !== 0) throw new Error('allocator: images differ');
    const alloc = (f: string) => JSON.parse(execFileSync('qemu-img', ['check', '--output=json', f], { encoding: 'utf8' }))['image-end-offset'] as number;
    const used = (f: string) => {
      const m = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', f], { encoding: 'utf8' })) as Array<{ data: boolean; length: number }>;
      return m.filter((e) => e.data).reduce((n, e) => n + e.length, 0);
    };
    const du = (f: string) => Number(execFileSync('du', ['-B1', f], { encoding: 'utf8' }).split('\t')[0]);
    console.log(`mixed workload (20 rounds of 100 writes of 1-4 clusters and 40 unmapping zero writes, 64 MiB disk): guest data ${mib(used(a))}; qemu-io image end ${mib(alloc(a))}, file ${mib(statSync(a).size)}, disk use ${mib(du(a))}; qledger image end ${mib(alloc(b))}, file ${mib(statSync(b).size)}, disk use ${mib(du(b))}`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
