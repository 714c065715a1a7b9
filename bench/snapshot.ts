/**
 * Snapshot benchmark (BENCH_ONLY=snapshot): snapshot create, apply and
 * delete, then amend -o refcount_bits=64, on an image with BENCH_CLUSTERS (default 1,000,000) allocated
 * 4 KiB clusters (qemu-img create -o preallocation=metadata), qemu-img
 * snapshot against qledger snapshot in the same run. Each round copies the
 * same image twice and runs the three commands on both copies, the tools
 * alternating which goes first; after every command both copies must list
 * the same snapshots (dates aside), read the same and check clean before
 * the round counts. Whole processes timed, median of BENCH_RUNS (default 5).
 * Both tools flush before they exit (qemu-img snapshot and qledger alike).
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { alternate, median, timeProcess } from './common.ts';

const clusters = Number(process.env['BENCH_CLUSTERS'] ?? 1_000_000);
const runs = Number(process.env['BENCH_RUNS'] ?? 5);
const root = new URL('..', import.meta.url).pathname;
const qledger = join(root, 'tools/qledger');
const dir = mkdtempSync(join(tmpdir(), 'qledger-bench-snap-'));

const time = timeProcess;

const list = (f: string) => execFileSync('qemu-img', ['snapshot', '-l', f], { encoding: 'utf8' }).replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE');

function same(q: string, l: string, what: string): void {
  if (list(q) !== list(l)) throw new Error(`${what}: the snapshot lists differ`);
  if (spawnSync('qemu-img', ['compare', '-q', q, l]).status !== 0) throw new Error(`${what}: the guest contents differ`);
  const ck = spawnSync('qemu-img', ['check', l], { encoding: 'utf8' });
  if (ck.status !== 0) throw new Error(`${what}: qemu-img check of qledger's image: ${ck.stdout}${ck.stderr}`);
}

try {
  if (spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status !== 0) {
    console.error('bench: qemu-img not found (apt-get install qemu-utils): the comparison needs it');
    process.exit(1);
  }
  const base = join(dir, 'base.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,preallocation=metadata', base, String(clusters * 4096)]);
  const ops = [
    ['create', '-c'],
    ['apply', '-a'],
    ['delete', '-d'],
  ] as const;
  const times: Record<string, { q: number[]; l: number[] }> = Object.fromEntries(ops.map(([n]) => [n, { q: [], l: [] }]));
  for (let i = 0; i < runs; i++) {
    const q = join(dir, 'q.qcow2');
    const l = join(dir, 'l.qcow2');
    execFileSync('cp', ['--sparse=always', base, q]);
    execFileSync('cp', ['--sparse=always', base, l]);
    for (const [name, flag] of ops) {
      alternate(
        i,
        () => times[name]!.q.push(time('qemu-img', ['snapshot', flag, 'snap', q])),
        () => times[name]!.l.push(time(qledger, ['snapshot', flag, 'snap', l])),
      );
      same(q, l, `round ${i}, ${name}`);
    }
    // amend -o refcount_bits=64 (16 → 64) on the same pair
    const amend = (tool: string, f: string) => (tool === 'qemu-img' ? time('qemu-img', ['amend', '-o', 'refcount_bits=64', f]) : time(qledger, ['amend', '-o', 'refcount_bits=64', f]));
    alternate(
      i,
      () => (times['amend'] ??= { q: [], l: [] }).q.push(amend('qemu-img', q)),
      () => (times['amend'] ??= { q: [], l: [] }).l.push(amend('qledger', l)),
    );
    same(q, l, `round ${i}, amend`);
  }
  console.log(`image: ${clusters} allocated 4 KiB clusters (preallocation=metadata); ${runs} rounds, alternating, median, whole process; results checked equal after every command`);
  for (const [name] of ops) {
    const t = median(times[name]!.q);
    const o = median(times[name]!.l);
    console.log(`snapshot ${name.padEnd(6)}: qemu-img ${t.toFixed(3)} s, qledger ${o.toFixed(3)} s, ratio (qemu-img time / qledger time) ${(t / o).toFixed(2)}`);
  }
  const t = median(times['amend']!.q);
  const o = median(times['amend']!.l);
  console.log(`amend -o refcount_bits=64: qemu-img ${t.toFixed(3)} s, qledger ${o.toFixed(3)} s, ratio (qemu-img time / qledger time) ${(t / o).toFixed(2)}`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
