/**
 * Check benchmark (issue 4): `qledger check` against `qemu-img check` on the
 * same images with about 1,000,000 allocated clusters, whole processes,
 * median of BENCH_RUNS (default 3):
 *   preallocated  qemu-img create -o preallocation=metadata,cluster_size=4k, 4 GiB (1,048,576 clusters, contiguous)
 *   scattered     1,000,000 4 KiB clusters written one by one in random order over an 8 GiB image
 * and `map --output=json` of the scattered image (1,523,471 extents).
 * The scattered image is built once with qledger's own writer (far faster
 * than 1,000,000 qemu-io commands); both tools must report the same JSON
 * (check) and print the same bytes (map) before anything is timed. The
 * order alternates every run. BENCH_CHECK=preallocated runs the first case
 * alone (seconds instead of minutes: qemu-img takes about 40 s on the
 * scattered image).
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { alternate, median, scatteredImage } from './common.ts';

const runs = Number(process.env['BENCH_RUNS'] ?? 3);
const preOnly = process.env['BENCH_CHECK'] === 'preallocated';
const root = new URL('..', import.meta.url).pathname;
const qledger = join(root, 'tools/qledger');
const dir = mkdtempSync(join(tmpdir(), 'qledger-cbench-'));

function timed(cmd: string, args: string[]): { s: number; out: string } {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 26 });
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.status}\n${r.stdout}${r.stderr}`);
  return { s, out: r.stdout };
}

try {
  if (spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status !== 0) {
    console.error('bench: qemu-img not found (apt-get install qemu-utils)');
    process.exit(1);
  }
  const cases: Array<[string, string, string]> = [];
  const pre = join(dir, 'pre.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=4k', pre, '4G']);
  cases.push(['preallocated: 1,048,576 contiguous 4 KiB clusters (qemu-img preallocation=metadata)', pre, '≥ 1.0']);
  const sc = join(dir, 'scattered.qcow2');
  if (!preOnly) {
    await scatteredImage(sc);
    cases.push(['scattered: 1,000,000 4 KiB clusters written in random order', sc, 'keep the lead']);
  }
  console.log(`check and map benchmarks: ${runs} runs each, median, whole process`);
  console.log('| case | qemu-img | qledger | ratio (qemu-img time / qledger time) | target |');
  console.log('|---|---|---|---|---|');
  for (const [name, f, target] of cases) {
    const q = timed('qemu-img', ['check', '--output=json', f]);
    const o = timed(qledger, ['check', '--output=json', f]);
    const qj = JSON.parse(q.out);
    const oj = JSON.parse(o.out);
    if (JSON.stringify(qj) !== JSON.stringify(oj)) throw new Error(`${name}: reports differ\n${q.out}\n${o.out}`);
    const ours: number[] = [];
    const theirs: number[] = [];
    for (let i = 0; i < runs; i++) {
      alternate(
        i,
        () => theirs.push(timed('qemu-img', ['check', f]).s),
        () => ours.push(timed(qledger, ['check', f]).s),
      );
    }
    const t = median(theirs);
    const ou = median(ours);
    console.log(`| check, ${name} (${qj['allocated-clusters']} allocated) | ${t.toFixed(3)} s | ${ou.toFixed(3)} s | **${(t / ou).toFixed(2)}** | ${target} |`);
  }
  if (!preOnly) {
    // map of the scattered image: the same bytes first, then timed (output to a file, as a script redirects it)
    const mq = join(dir, 'map-qemu.json');
    const ml = join(dir, 'map-qledger.json');
    execFileSync('sh', ['-c', 'qemu-img map --output=json "$1" > "$2"', 'sh', sc, mq]);
    execFileSync('sh', ['-c', '"$1" map --output=json "$2" > "$3"', 'sh', qledger, sc, ml]);
    if (spawnSync('cmp', ['-s', mq, ml]).status !== 0) throw new Error('map --output=json: qledger prints other bytes than qemu-img');
    const extents = JSON.parse(readFileSync(mq, 'utf8')).length as number;
    const mt: number[] = [];
    const mo: number[] = [];
    for (let i = 0; i < runs; i++) {
      alternate(
        i,
        () => mt.push(timed('sh', ['-c', 'qemu-img map --output=json "$1" > "$2"', 'sh', sc, mq]).s),
        () => mo.push(timed('sh', ['-c', '"$1" map --output=json "$2" > "$3"', 'sh', qledger, sc, ml]).s),
      );
    }
    console.log(`| map --output=json, scattered (${extents} extents) | ${median(mt).toFixed(3)} s | ${median(mo).toFixed(3)} s | **${(median(mt) / median(mo)).toFixed(2)}** | ≥ 2 |`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
