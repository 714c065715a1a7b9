/**
 * make_empty (issue 15, item 1) against QEMU's. No QEMU tool runs
 * make_empty alone: qemu-img commit copies the top's data into the base and
 * then empties the top, and `commit -d` does the copy without the emptying.
 * So each tool's make_empty is timed as the difference of the medians of
 * `commit` and `commit -d` on fresh copies of the same chain, in the same
 * run, alternating tools and modes. The chain lives on /dev/shm so that the
 * copy, the same for both modes, costs little and varies little:
 *   base  qcow2, 100 GiB, empty
 *   top   qcow2, 100 GiB, 4 KiB clusters, 1,000,000 clusters written
 * without and with one internal snapshot of the top (QEMU 7.2 takes its
 * fast path, one new refcount structure, only without it; with it, QEMU
 * discards the image cluster by cluster). Before anything is timed, the
 * emptied tops from both tools must read the same (qemu-img compare) and
 * pass qemu-img check, and qemu-img snapshot -l must list the same.
 * BENCH_RUNS (3) repetitions, BENCH_EMPTY_CLUSTERS (1,000,000), BENCH_EMPTY_DIR (/dev/shm).
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { median, timeProcess } from './common.ts';

const runs = Number(process.env['BENCH_RUNS'] ?? 3);
const clusters = Number(process.env['BENCH_EMPTY_CLUSTERS'] ?? 1_000_000);
const root = new URL('..', import.meta.url).pathname;
const dir = mkdtempSync(join(process.env['BENCH_EMPTY_DIR'] ?? '/dev/shm', 'qledger-bench-empty-'));
const qledger = join(root, 'tools/qledger');
const f = (n: string) => join(dir, n);
const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { stdio: ['ignore', 'ignore', 'inherit'] });

type Who = 'qemu-img' | 'qledger';

/** Fresh copies of the chain for one run; returns the top's path. */
function chain(top: string, tag: string): string {
  copyFileSync(f('base.qcow2'), f(`${tag}-base.qcow2`));
  copyFileSync(f(top), f(`${tag}-top.qcow2`));
  sh('qemu-img', ['rebase', '-u', '-b', `${tag}-base.qcow2`, '-F', 'qcow2', f(`${tag}-top.qcow2`)]);
  return f(`${tag}-top.qcow2`);
}

function commit(who: Who, top: string, keep: boolean, tag: string): number {
  const t = chain(top, tag);
  spawnSync('sync');
  const s = timeProcess(who === 'qemu-img' ? 'qemu-img' : qledger, ['commit', '-q', ...(keep ? ['-d'] : []), t]);
  return s;
}

try {
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', f('base.qcow2'), '100G']);
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'base.qcow2', '-F', 'qcow2', f('top.qcow2'), '100G']);
  const bytes = clusters * 4096;
  const writes: string[] = [];
  for (let at = 0; at < bytes; at += 256 << 20) writes.push('-c', `write -q -P 0x5a ${at} ${Math.min(256 << 20, bytes - at)}`);
  sh('qemu-io', [...writes, f('top.qcow2')]);

  console.log(`make_empty, timed as commit minus commit -d: a 100 GiB overlay with ${clusters.toLocaleString('en')} written 4 KiB clusters over an empty base, on ${dir.split('/').slice(0, -1).join('/') || '/'}; ${runs} runs of each, median, whole process`);
  console.log('| top | tool | commit | commit -d | make_empty (difference) | top after commit |');
  console.log('|---|---|---|---|---|---|');
  const results: Record<string, number> = {};
  for (const [name, top] of [['no snapshot', 'top.qcow2'], ['one internal snapshot', 'snap.qcow2']] as const) {
    // the snapshot's top replaces the plain one (memory: every copy lives on /dev/shm)
    if (top === 'snap.qcow2') {
      execFileSync('mv', [f('top.qcow2'), f('snap.qcow2')]);
      sh('qemu-img', ['snapshot', '-c', 's1', f('snap.qcow2')]);
    }
    // equal results first: each emptied chain reads as the top did, checks clean, lists the same snapshots
    const sizes: Record<Who, number> = { 'qemu-img': 0, qledger: 0 };
    const lists: Record<Who, string> = { 'qemu-img': '', qledger: '' };
    for (const who of ['qemu-img', 'qledger'] as const) {
      commit(who, top, false, 'eq');
      const t = f('eq-top.qcow2');
      if (spawnSync('qemu-img', ['check', '-q', t]).status !== 0) throw new Error(`${name}: ${who}'s emptied top does not pass qemu-img check`);
      const reads: string[] = [];
      for (let at = 0; at < bytes; at += 1 << 30) reads.push('-c', `read -q -P 0x5a ${at} ${Math.min(1 << 30, bytes - at)}`);
      const read = execFileSync('qemu-io', ['-r', ...reads, '-c', `read -q -P 0 ${bytes} 1M`, t], { encoding: 'utf8' });
      if (read.includes('verification failed')) throw new Error(`${name}: ${who}'s chain does not read as the top did`);
      lists[who] = execFileSync('qemu-img', ['snapshot', '-l', t], { encoding: 'utf8' }).replace(/^.*\n/, '').replace(/\s+\S+\s+\S+\s+\S+\s*$/gm, '');
      sizes[who] = statSync(t).size;
      rmSync(f('eq-base.qcow2'));
      rmSync(t);
    }
    if (lists['qemu-img'] !== lists.qledger) throw new Error(`${name}: the snapshot lists differ`);
    const times: Record<string, number[]> = {};
    for (let i = 0; i < runs; i++) {
      const order: Array<[Who, boolean]> = [
        ['qemu-img', false],
        ['qledger', false],
        ['qemu-img', true],
        ['qledger', true],
      ];
      if (i % 2 === 1) order.reverse();
      for (const [who, keep] of order) {
        const k = `${who} ${keep}`;
        (times[k] ??= []).push(commit(who, top, keep, 'run'));
        rmSync(f('run-base.qcow2'));
        rmSync(f('run-top.qcow2'));
      }
    }
    for (const who of ['qemu-img', 'qledger'] as const) {
      const full = median(times[`${who} false`]!);
      const keep = median(times[`${who} true`]!);
      results[`${name} ${who}`] = full - keep;
      console.log(`| ${name} | ${who} | ${full.toFixed(3)} s | ${keep.toFixed(3)} s | ${(full - keep).toFixed(3)} s | ${sizes[who].toLocaleString('en')} bytes |`);
    }
  }
  for (const name of ['no snapshot', 'one internal snapshot']) {
    const q = results[`${name} qemu-img`]!;
    const l = results[`${name} qledger`]!;
    console.log(`${name}: make_empty ratio (qemu-img's / qledger's) ${(q / l).toFixed(2)} (target ${name === 'no snapshot' ? '≥ 1' : '≥ 10'})`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
