/**
 * NBD benchmark (BENCH_ONLY=nbd): the same fully allocated qcow2 image
 * (BENCH_SIZE_MB, default 1024, 64 KiB clusters) exported by qemu-nbd and
 * by qledger nbd, each on its own copy, both with -e 4 (four clients at
 * once) and qemu-nbd's default cache mode (writeback: a write is
 * acknowledged from the cache, FLUSH makes it durable; nbdcopy flushes at
 * the end of a copy into the export). nbdcopy copies out of each export
 * (to null:) and into it (from a raw file of other content), with one and
 * with four connections; the runs alternate between the servers. Before
 * anything is timed, a copy out of each export must equal the image's
 * content and, after the copies in, both images must compare equal to the
 * raw source. Median of BENCH_RUNS (default 5), whole nbdcopy processes.
 * Then latency: 4 KiB random reads and writes (2000 each, the same offsets
 * for both servers) at queue depth 1 and 16 through libnbd's Python
 * bindings (bench/nbd-latency.py, Debian python3-libnbd), alternating,
 * median of the runs; writes end with a FLUSH inside the timing.
 */

import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, closeSync, writeSync, rmSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { median, timeProcess } from './common.ts';

const sizeMb = Number(process.env['BENCH_SIZE_MB'] ?? 1024);
const runs = Number(process.env['BENCH_RUNS'] ?? 5);
const root = new URL('..', import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), 'qledger-bench-nbd-'));

const time = timeProcess;

function rawFile(path: string, seed: number): void {
  const fd = openSync(path, 'w');
  const mb = Buffer.alloc(1 << 20);
  for (let i = 0; i < sizeMb; i++) {
    for (let j = 0; j < mb.length; j += 8) mb.writeUInt32BE(((i + seed) * 2654435761 + j) >>> 0, j);
    writeSync(fd, mb);
  }
  closeSync(fd);
}

async function serve(tool: 'qemu-nbd' | 'qledger', image: string): Promise<{ uri: string; proc: ChildProcess }> {
  const sock = join(dir, `${tool}.sock`);
  const proc = tool === 'qemu-nbd' ? spawn('qemu-nbd', ['-t', '-e', '4', '-k', sock, '-f', 'qcow2', image], { stdio: 'inherit' }) : spawn(join(root, 'tools/qledger'), ['nbd', '-t', '-e', '4', '-k', sock, image], { stdio: 'inherit' });
  for (let i = 0; i < 400 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 25));
  return { uri: `nbd+unix:///?socket=${sock}`, proc };
}

async function stop(p: ChildProcess): Promise<void> {
  const done = new Promise((r) => p.once('exit', r));
  p.kill('SIGTERM');
  await done;
}

try {
  for (const t of ['qemu-nbd', 'nbdcopy', 'qemu-img']) {
    if (spawnSync(t, ['--version'], { stdio: 'ignore' }).status !== 0) {
      console.error(`bench: ${t} not found (apt-get install qemu-utils libnbd-bin): the comparison needs it`);
      process.exit(1);
    }
  }
  const srcA = join(dir, 'a.raw');
  const srcB = join(dir, 'b.raw');
  rawFile(srcA, 1);
  rawFile(srcB, 7);
  const q = join(dir, 'q.qcow2');
  const l = join(dir, 'l.qcow2');
  execFileSync('qemu-img', ['convert', '-O', 'qcow2', srcA, q]);
  execFileSync('cp', [q, l]);
  const servers = { 'qemu-nbd': await serve('qemu-nbd', q), qledger: await serve('qledger', l) };
  const t: Record<string, number[]> = {};
  const add = (k: string, v: number) => (t[k] ??= []).push(v);
  try {
    // equal before timed: a copy out of each export is the image's content
    for (const [name, s] of Object.entries(servers)) {
      const out = join(dir, `check-${name}.raw`);
      execFileSync('nbdcopy', [s.uri, out]);
      if (!readFileSync(out).equals(readFileSync(srcA))) throw new Error(`${name}: the copy out differs from the image`);
      rmSync(out);
    }
    for (let i = 0; i < runs; i++) {
      const order = i % 2 === 0 ? (['qemu-nbd', 'qledger'] as const) : (['qledger', 'qemu-nbd'] as const);
      for (const c of ['1', '4']) {
        for (const name of order) add(`${name} out -C ${c}`, time('nbdcopy', ['-C', c, servers[name].uri, 'null:']));
        for (const name of order) add(`${name} in -C ${c}`, time('nbdcopy', ['-C', c, i % 2 === 0 ? srcB : srcA, servers[name].uri]));
      }
    }
    if (spawnSync('/usr/bin/python3', ['-c', 'import nbd'], { stdio: 'ignore' }).status === 0) {
      for (let i = 0; i < runs; i++) {
        const order = i % 2 === 0 ? (['qemu-nbd', 'qledger'] as const) : (['qledger', 'qemu-nbd'] as const);
        for (const mode of ['read', 'write'])
          for (const depth of ['1', '16'])
            for (const name of order) {
              const us = Number(execFileSync('/usr/bin/python3', [join(root, 'bench/nbd-latency.py'), servers[name].uri, mode, depth, '2000'], { encoding: 'utf8' }).trim());
              add(`${name} ${mode} qd${depth}`, us);
            }
      }
    } else console.error('bench: python3-libnbd not found: the latency part is skipped');
  } finally {
    await stop(servers['qemu-nbd'].proc);
    await stop(servers.qledger.proc);
  }
  // the last copy in was the same source for both (the latency writes came after it, the same ones on both): the images must now be equal to it
  if (spawnSync('qemu-img', ['compare', '-q', q, l]).status !== 0) throw new Error('the two images differ after the same copies and writes');
  if (spawnSync('qemu-img', ['check', l]).status !== 0) throw new Error("qledger's image does not check clean");
  console.log(`image: ${sizeMb} MiB, fully allocated, 64 KiB clusters; both servers -e 4, writeback; ${runs} runs each, alternating, median, whole nbdcopy processes; copies checked equal`);
  for (const dirn of ['out', 'in']) {
    for (const c of ['1', '4']) {
      const a = median(t[`qemu-nbd ${dirn} -C ${c}`]!);
      const b = median(t[`qledger ${dirn} -C ${c}`]!);
      console.log(`nbdcopy ${dirn === 'out' ? 'out of' : 'into  '} the export, ${c} connection${c === '1' ? ' ' : 's'}: qemu-nbd ${a.toFixed(3)} s, qledger ${b.toFixed(3)} s, ratio (qemu-nbd time / qledger time) ${(a / b).toFixed(2)}`);
    }
  }
  for (const mode of ['read', 'write'])
    for (const depth of ['1', '16']) {
      const a = t[`qemu-nbd ${mode} qd${depth}`];
      const b = t[`qledger ${mode} qd${depth}`];
      if (!a || !b) continue;
      console.log(`4 KiB random ${mode}s, queue depth ${depth.padEnd(2)}: qemu-nbd ${median(a).toFixed(1)} µs, qledger ${median(b).toFixed(1)} µs per request, ratio ${(median(a) / median(b)).toFixed(2)}`);
    }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
