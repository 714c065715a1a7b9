/**
 * Regression benchmark: this checkout's qledger against another checkout's
 * (BENCH_BASE=/path/to/checkout, built with `npm install`), whole
 * processes, on the same input images in the same run, alternating which
 * goes first, median of BENCH_RUNS (default 5). The ratio is the other
 * checkout's time over this one's: above 1 means this checkout is faster.
 * Results are checked equal before any time is kept: written images pass
 * `qemu-img check` and `qemu-img compare` equal, check reports and crash
 * counts are identical, recovered images check clean.
 *
 * Cases are those of the write, read, check, crash and journal benchmarks
 * (qledger io is in its default cache mode, writeback with one flush at the
 * end, for both trees: the same durability). BENCH_CASE=<regular expression>
 * runs only matching cases.
 *
 *   git worktree add ../base <commit> && (cd ../base && npm install)
 *   BENCH_BASE=../base BENCH_ONLY=regression npm run bench
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, rmSync, openSync, writeSync, closeSync, existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { alternate, crashedImage, median, randomWriteCommands, scatteredImage } from './common.ts';

const base = process.env['BENCH_BASE'];
if (!base || !existsSync(join(base, 'tools/qledger'))) {
  console.error('bench regression: set BENCH_BASE to a checkout built with npm install (see the comment at the top of bench/regression.ts)');
  process.exit(1);
}
const runs = Number(process.env['BENCH_RUNS'] ?? 5);
const filter = process.env['BENCH_CASE'];
const ours = join(new URL('..', import.meta.url).pathname, 'tools/qledger');
const theirs = join(resolve(base), 'tools/qledger');
const dir = mkdtempSync(join(tmpdir(), 'qledger-rbench-'));

function run(cmd: string, args: string[], ok: number[] = [0]): { s: number; out: string } {
  spawnSync('sync');
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 28 });
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  if (!ok.includes(r.status ?? -1)) throw new Error(`${cmd} ${args.slice(0, 4).join(' ')}...: exit ${r.status}\n${r.stdout.slice(0, 2000)}${r.stderr.slice(0, 2000)}`);
  return { s, out: r.stdout };
}

function qemuClean(img: string): void {
  const r = spawnSync('qemu-img', ['check', img], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`qemu-img check ${img}: exit ${r.status}\n${r.stdout}`);
}

function sameImages(a: string, b: string, what: string): void {
  if (spawnSync('qemu-img', ['compare', a, b]).status !== 0) throw new Error(`${what}: the two trees' images differ`);
}

const create = (size: string, opts: string[] = []) => (p: string) => void execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, p, size]);

/** A case: prepare an input once; each timed run gets a copy; `verify` compares the two results. */
interface Case {
  readonly name: string;
  readonly prepare: (input: string) => Promise<void> | void;
  /** the tool's arguments for one run on `img` (a copy of the input), the output file `out` */
  readonly args: (img: string, out: string) => string[];
  readonly okCodes?: number[];
  /** after both runs of a repetition: results must agree (images, outputs) */
  readonly verify: (a: { img: string; out: string; stdout: string }, b: { img: string; out: string; stdout: string }) => void;
}

const randomCmds = randomWriteCommands();

const io = (cmds: string[]) => (img: string) => ['io', ...cmds.flatMap((c) => ['-c', c]), img];
const writtenEqual: Case['verify'] = (a, b) => {
  qemuClean(a.img);
  qemuClean(b.img);
  sameImages(a.img, b.img, 'write');
};
const stdoutEqual: Case['verify'] = (a, b) => {
  // the reports name their (different) copies of the input
  if (a.stdout.replaceAll(a.img, 'IMG') !== b.stdout.replaceAll(b.img, 'IMG')) throw new Error(`outputs differ:\n${a.stdout.slice(0, 500)}\n---\n${b.stdout.slice(0, 500)}`);
};

/** A qemu-made 1 GiB image with every cluster allocated (the read benchmark's input). */
function fullImage(p: string): void {
  const raw = `${p}.raw`;
  const fd = openSync(raw, 'w');
  const mb = Buffer.alloc(1 << 20);
  for (let i = 0; i < 1024; i++) {
    for (let j = 0; j < mb.length; j += 8) mb.writeUInt32BE((i * 2654435761 + j) >>> 0, j);
    writeSync(fd, mb);
  }
  closeSync(fd);
  execFileSync('qemu-img', ['convert', '-O', 'qcow2', raw, p]);
  rmSync(raw);
}

const recovered: Case['verify'] = (a, b) => {
  qemuClean(a.img);
  qemuClean(b.img);
  sameImages(a.img, b.img, 'recovery');
};

const CASES: Case[] = [
  { name: 'write: sequential 1 GiB in 1 MiB writes', prepare: create('1G'), args: io(Array.from({ length: 1024 }, (_, i) => `write -q -P 1 ${i}M 1M`)), verify: writtenEqual },
  { name: 'write: 20,000 random 4 KiB writes, 100 GiB image', prepare: create('100G'), args: io(randomCmds), verify: writtenEqual },
  { name: 'write: 1 GiB zero write, empty image', prepare: create('1G'), args: io(['write -q -z 0 1G']), verify: writtenEqual },
  {
    name: 'write: 1 GiB zero write over written data',
    prepare: (p) => {
      create('1G')(p);
      execFileSync('qemu-io', ['-c', 'write -q -P 3 0 1G', p]);
    },
    args: io(['write -q -z 0 1G']),
    verify: writtenEqual,
  },
  {
    name: 'read: convert -O raw of a fully allocated 1 GiB image',
    prepare: fullImage,
    args: (img, out) => ['convert', '-O', 'raw', img, out],
    verify: (a, b) => {
      if (!readFileSync(a.out).equals(readFileSync(b.out))) throw new Error('convert outputs differ');
      rmSync(a.out);
      rmSync(b.out);
    },
  },
  {
    // the same without the disk: the output goes to tmpfs, so the read path's CPU is what is timed
    name: 'read: convert -O raw of a fully allocated 1 GiB image, output on tmpfs',
    prepare: fullImage,
    args: (img, out) => ['convert', '-O', 'raw', img, existsSync('/dev/shm') ? `/dev/shm/${out.split('/').pop()}` : out],
    verify: (a, b) => {
      const at = (o: string) => (existsSync('/dev/shm') ? `/dev/shm/${o.split('/').pop()}` : o);
      if (!readFileSync(at(a.out)).equals(readFileSync(at(b.out)))) throw new Error('convert outputs differ');
      rmSync(at(a.out));
      rmSync(at(b.out));
    },
  },
  { name: 'check: 4 GiB preallocated, 4 KiB clusters', prepare: create('4G', ['-o', 'preallocation=metadata,cluster_size=4k']), args: (img) => ['check', '--output=json', img], verify: stdoutEqual },
  { name: 'check: 1,000,000 scattered 4 KiB clusters', prepare: scatteredImage, args: (img) => ['check', '--output=json', img], verify: stdoutEqual },
  {
    name: 'crash: crash-test -o cluster_size=4k --runs 10 --max-states 300',
    prepare: () => {},
    args: () => ['crash-test', '-o', 'cluster_size=4k', '--random', '--runs', '10', '--seed', '7', '--max-states', '300', '--output=json'],
    verify: (a, b) => {
      const pick = (s: string) => {
        const j = JSON.parse(s) as Record<string, unknown>;
        return JSON.stringify([j['states'], j['corruptions'], j['data-errors'], j['leaks'], j['journal-replays'], j['leaks-after-recovery']]);
      };
      if (pick(a.stdout) !== pick(b.stdout)) throw new Error(`crash-test counts differ: ${pick(a.stdout)} against ${pick(b.stdout)}`);
    },
  },
  { name: 'journal: recovery of a compact interrupted write-back (io -c flush)', prepare: (p) => crashedImage(p, false), args: (img) => ['io', '-c', 'flush', img], verify: recovered },
  { name: 'journal: recovery of a scattered interrupted write-back (io -c flush)', prepare: (p) => crashedImage(p, true), args: (img) => ['io', '-c', 'flush', img], verify: recovered },
];

try {
  console.log(`regression: ${ours} against ${theirs}; ${runs} runs each, median, whole process, alternating`);
  console.log('| case | base | this tree | ratio (base time / this time) |');
  console.log('|---|---|---|---|');
  for (const c of CASES) {
    if (filter && !new RegExp(filter).test(c.name)) continue;
    const input = join(dir, 'input.qcow2');
    await c.prepare(input);
    const mine: number[] = [];
    const other: number[] = [];
    for (let i = 0; i < runs; i++) {
      const a = { img: join(dir, 'a.qcow2'), out: join(dir, 'a.out'), stdout: '' };
      const b = { img: join(dir, 'b.qcow2'), out: join(dir, 'b.out'), stdout: '' };
      if (existsSync(input)) {
        copyFileSync(input, a.img);
        copyFileSync(input, b.img);
      }
      const goOurs = () => {
        const r = run(ours, c.args(a.img, a.out), c.okCodes);
        mine.push(r.s);
        a.stdout = r.out;
      };
      const goBase = () => {
        const r = run(theirs, c.args(b.img, b.out), c.okCodes);
        other.push(r.s);
        b.stdout = r.out;
      };
      alternate(i, goOurs, goBase);
      c.verify(a, b);
      rmSync(a.img, { force: true });
      rmSync(b.img, { force: true });
    }
    rmSync(input, { force: true });
    const m = median(mine);
    const o = median(other);
    console.log(`| ${c.name} | ${o.toFixed(3)} s | ${m.toFixed(3)} s | **${(o / m).toFixed(2)}** |`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
