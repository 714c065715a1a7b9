/**
 * Write benchmarks, qledger io against qemu-io on identical fresh images in
 * the same run (whole processes, median of BENCH_RUNS, default 3):
 *   seq     1 GiB written in 1 MiB requests to an empty 1 GiB image
 *   random  20,000 4 KiB writes to distinct unallocated 64 KiB clusters of a 100 GiB image
 *   zero    write -z over 1 GiB: of an empty image, and of a fully written one
 * qledger runs twice per repetition, with its journal (the default) and with
 * --journal=off, so the journal's cost is measured in the same run.
 * Both tools run at the same durability, in each cache mode of BENCH_MODES
 * (default writeback,writethrough), passed as -t to both: qemu-io's own
 * default is writethrough (a flush after every write), qledger io's is
 * writeback (a flush at the end), and comparing the two defaults would
 * compare durabilities, not tools.
 * BENCH_CASE=<substring> runs only the matching cases.
 * Every result image must pass `qemu-img check` and equal qemu-io's (checked
 * outside the timing). Each timed run starts after `sync`, and the order
 * alternates, so neither tool pays for the other's dirty pages.
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { median, randomWriteCommands } from './common.ts';

const runs = Number(process.env['BENCH_RUNS'] ?? 3);
const root = new URL('..', import.meta.url).pathname;
const qledger = join(root, 'tools/qledger');
const dir = mkdtempSync(join(tmpdir(), 'qledger-wbench-'));


function timed(cmd: string, args: string[]): number {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], maxBuffer: 1 << 26 });
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} failed (${r.status}): ${r.stderr}`);
  return s;
}

function check(img: string): void {
  const r = spawnSync('qemu-img', ['check', img], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`qemu-img check ${img}: exit ${r.status}\n${r.stdout}`);
}

interface Case {
  readonly name: string;
  readonly make: (path: string) => void;
  readonly cmds: string[];
  readonly bytes: number;
  /** issue 19's target for the ratio, per cache mode */
  readonly target?: { readonly writeback?: string; readonly writethrough?: string };
}

const create = (size: string, clusterSize = 65536) => (p: string) => void execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusterSize}`, p, size]);

const randomCmds = randomWriteCommands();

const CASES: Case[] = [
  { name: 'sequential 1 GiB in 1 MiB writes', make: create('1G'), cmds: Array.from({ length: 1024 }, (_, i) => `write -q -P 1 ${i}M 1M`), bytes: 2 ** 30, target: { writeback: '≥ 1.0', writethrough: '≥ 1.0' } },
  { name: '20,000 random 4 KiB writes, 100 GiB image', make: create('100G'), cmds: randomCmds, bytes: 20000 * 4096, target: { writeback: '≥ 1.5', writethrough: '≥ 2' } },
  // each write a new cluster and (2 MiB per L2 table) mostly a new L2 table
  { name: '20,000 random 4 KiB writes, 4 KiB clusters, 100 GiB image', make: create('100G', 4096), cmds: randomCmds, bytes: 20000 * 4096, target: { writethrough: '≥ 5' } },
  { name: '1 GiB zero write, empty image', make: create('1G'), cmds: ['write -q -z 0 1G'], bytes: 2 ** 30 },
  {
    name: '1 GiB zero write over written data',
    make: (p) => {
      create('1G')(p);
      execFileSync('qemu-io', ['-c', 'write -q -P 3 0 1G', p]);
    },
    cmds: ['write -q -z 0 1G'],
    bytes: 2 ** 30,
  },
];

try {
  if (spawnSync('qemu-io', ['--version'], { stdio: 'ignore' }).status !== 0) {
    console.error('bench: qemu-io not found (apt-get install qemu-utils): the comparison needs it');
    process.exit(1);
  }
  console.log(`write benchmarks: ${runs} runs each, median, whole process, 64 KiB clusters, fresh image per run`);
  console.log('| cache mode (-t, both tools) | case | qemu-io | qledger io (journal on) | ratio (qledger / qemu-io throughput) | target | qledger io --journal=off | ratio, journal off | journal cost |');
  console.log('|---|---|---|---|---|---|---|---|---|');
  const filter = process.env['BENCH_CASE'];
  const modes = (process.env['BENCH_MODES'] ?? 'writeback,writethrough').split(',');
  for (const mode of modes)
  for (const c of CASES) {
    if (filter && !c.name.includes(filter)) continue;
    const pristine = join(dir, 'pristine.qcow2');
    c.make(pristine);
    const args = ['-t', mode, ...c.cmds.flatMap((x) => ['-c', x])];
    const ours: number[] = [];
    const theirs: number[] = [];
    const off: number[] = [];
    for (let i = 0; i < runs; i++) {
      const a = join(dir, 'a.qcow2');
      const b = join(dir, 'b.qcow2');
      const n = join(dir, 'n.qcow2');
      copyFileSync(pristine, a);
      copyFileSync(pristine, b);
      copyFileSync(pristine, n);
      // Start each timed run with no dirty pages left from the previous one,
      // and alternate who goes first: the disk, not the tool, sets the pace.
      const q = () => {
        spawnSync('sync');
        theirs.push(timed('qemu-io', [...args, a]));
      };
      const l = () => {
        spawnSync('sync');
        ours.push(timed(qledger, ['io', ...args, b]));
      };
      const lo = () => {
        spawnSync('sync');
        off.push(timed(qledger, ['io', '--journal=off', ...args, n]));
      };
      const order = [[q, l, lo], [l, lo, q], [lo, q, l]][i % 3]!;
      for (const f of order) f();
      for (const img of [a, b, n]) check(img);
      for (const img of [b, n]) {
        const cmp = spawnSync('qemu-img', ['compare', a, img]);
        if (cmp.status !== 0) throw new Error(`${c.name}: qledger's image differs from qemu-io's`);
      }
      rmSync(a);
      rmSync(b);
      rmSync(n);
    }
    rmSync(pristine);
    const t = median(theirs);
    const o = median(ours);
    const f = median(off);
    const mib = (s: number) => `${(c.bytes / 2 ** 20 / s).toFixed(0)} MiB/s`;
    const cost = ((o / f - 1) * 100).toFixed(1);
    const target = c.target?.[mode as 'writeback' | 'writethrough'] ?? '—';
    console.log(`| ${mode} | ${c.name} | ${t.toFixed(3)} s (${mib(t)}) | ${o.toFixed(3)} s (${mib(o)}) | **${(t / o).toFixed(2)}** | ${target} | ${f.toFixed(3)} s (${mib(f)}) | ${(t / f).toFixed(2)} | ${cost}% |`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
