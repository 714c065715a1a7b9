/**
 * Chains and conversion (issue 15), qledger against qemu-img in the same
 * run, whole processes, order alternating, median of BENCH_RUNS (default 5),
 * both tools at their defaults (convert: cache 'unsafe', no flush; commit
 * and rebase: writeback, flushed before exit):
 *   convert -O qcow2        of a raw file whose 64 KiB alternate data and
 *                           zeros (the zeros written out), and of a qcow2
 *                           image of the same content
 *   convert -c -O qcow2     deflate and zstd, of a compressible image
 *   commit                  of an overlay fully written over a full base
 *   rebase (safe)           of an overlay from its backing file to that
 *                           file's own backing file, over a chain whose
 *                           middle image rewrote every other cluster
 * Before anything is timed, each case's outputs from both tools compare
 * equal (qemu-img compare) and pass qemu-img check. Inputs that a command
 * changes are copied fresh before every run, outside the timing.
 * BENCH_CHAIN_MB (1024) sizes the images, BENCH_CHAIN_COMPRESS_MB (256) the
 * compressed case. BENCH_CASE=<substring> runs only the cases whose name
 * has it (and builds only their inputs).
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { alternate, median, timeProcess } from './common.ts';

const sizeMb = Number(process.env['BENCH_CHAIN_MB'] ?? 1024);
const compressMb = Number(process.env['BENCH_CHAIN_COMPRESS_MB'] ?? 256);
const runs = Number(process.env['BENCH_RUNS'] ?? 5);
const root = new URL('..', import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), 'qledger-bench-chain-'));
const qledger = join(root, 'tools/qledger');
const f = (n: string) => join(dir, n);
const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { stdio: ['ignore', 'ignore', 'inherit'] });

/** A raw file of `mb` MiB: 64 KiB of data (incompressible, or text-like when `compressible`), then 64 KiB of zeros, written out. */
function rawInput(path: string, mb: number, compressible: boolean, everyOther = true): void {
  const fd = openSync(path, 'w');
  const chunk = Buffer.alloc(1 << 20);
  let x = 2463534242;
  for (let i = 0; i < mb; i++) {
    chunk.fill(0);
    for (let c = 0; c < 16; c++) {
      if (everyOther && c % 2 === 1) continue;
      const at = c * 65536;
      for (let j = 0; j < 65536; j += 4) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        chunk.writeUInt32LE(compressible ? 0x20202020 + ((x >>> 0) % 26) : x >>> 0, at + j);
      }
    }
    writeSync(fd, chunk);
  }
  closeSync(fd);
}

function check(img: string, what: string): void {
  if (spawnSync('qemu-img', ['check', '-q', img]).status !== 0) throw new Error(`${what}: ${img} does not pass qemu-img check`);
}

function compare(a: string, b: string, what: string): void {
  if (spawnSync('qemu-img', ['compare', '-q', a, b]).status !== 0) throw new Error(`${what}: the two results differ`);
}

interface Case {
  readonly name: string;
  readonly target: string;
  /** fresh inputs for one run of `who`, outside the timing */
  readonly prepare?: (who: 'q' | 'l') => void;
  readonly cmd: (who: 'q' | 'l') => [string, string[]];
  /** the result of one run of `who`, to compare and check */
  readonly result: (who: 'q' | 'l') => string;
  readonly reference?: string;
}

const only = process.env['BENCH_CASE'];
const NAMES = {
  convertRaw: 'convert -O qcow2, raw input (64 KiB data, 64 KiB zeros)',
  convertQcow2: 'convert -O qcow2, qcow2 input (the same content)',
  deflate: 'convert -c -O qcow2 (deflate)',
  zstd: 'convert -c -O qcow2 -o compression_type=zstd',
  commit: `commit of a ${sizeMb} MiB overlay into its base`,
  rebase: `rebase (safe) of an overlay onto its backing file's backing file, ${sizeMb} MiB chain`,
};
/** whether a case named `name` runs (BENCH_CASE) */
const wanted = (name: string) => !only || name.includes(only);

function measure(c: Case): void {
  if (!wanted(c.name)) return;
  for (const who of ['q', 'l'] as const) {
    c.prepare?.(who);
    const [cmd, args] = c.cmd(who);
    sh(cmd, args);
  }
  compare(c.result('q'), c.result('l'), c.name);
  if (c.reference) compare(c.reference, c.result('l'), c.name);
  check(c.result('l'), c.name);
  const ours: number[] = [];
  const theirs: number[] = [];
  const once = (who: 'q' | 'l', into: number[]) => () => {
    c.prepare?.(who);
    spawnSync('sync'); // neither pays for the other's dirty pages
    const [cmd, args] = c.cmd(who);
    into.push(timeProcess(cmd, args));
  };
  for (let i = 0; i < runs; i++) alternate(i, once('q', theirs), once('l', ours));
  const t = median(theirs);
  const o = median(ours);
  console.log(`| ${c.name} | ${t.toFixed(3)} s | ${o.toFixed(3)} s | **${(t / o).toFixed(2)}** | ${c.target} |`);
}

try {
  if (spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status !== 0) {
    console.error('bench: qemu-img not found (apt-get install qemu-utils): the comparison needs it');
    process.exit(1);
  }
  if (wanted(NAMES.convertRaw) || wanted(NAMES.convertQcow2)) {
    rawInput(f('alt.raw'), sizeMb, false);
    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', f('alt.raw'), f('alt.qcow2')]);
  }
  if (wanted(NAMES.deflate) || wanted(NAMES.zstd)) rawInput(f('text.raw'), compressMb, true);
  if (wanted(NAMES.commit) || wanted(NAMES.rebase)) {
    // commit: a full base and an overlay written all over it
    rawInput(f('full.raw'), sizeMb, false, false);
    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', f('full.raw'), f('base.qcow2')]);
  }
  if (wanted(NAMES.commit)) {
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f('top.qcow2')]);
    sh('qemu-io', ['-c', `write -q -P 0x6c 0 ${sizeMb}M`, f('top.qcow2')]);
    sh('qemu-img', ['convert', '-O', 'raw', f('top.qcow2'), f('top-content.raw')]);
  }
  if (wanted(NAMES.rebase)) {
    // rebase: base (full), mid over it rewriting every other cluster, top over mid with a little of its own
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f('mid.qcow2')]);
    const mid: string[] = [];
    for (let c = 0; c < sizeMb * 16; c += 2) mid.push('-c', `write -q -P ${1 + (c % 200)} ${c * 65536} 64k`);
    for (let k = 0; k < mid.length; k += 4000) sh('qemu-io', [...mid.slice(k, k + 4000), f('mid.qcow2')]);
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', f('rtop.qcow2')]);
    sh('qemu-io', ['-c', 'write -q -P 0x33 0 1M', '-c', `write -q -P 0x34 ${Math.floor(sizeMb / 2)}M 1M`, f('rtop.qcow2')]);
    sh('qemu-img', ['convert', '-O', 'raw', f('rtop.qcow2'), f('rtop-content.raw')]);
  }

  const tool = (who: 'q' | 'l') => (who === 'q' ? 'qemu-img' : qledger);
  console.log(`chain benchmarks: ${sizeMb} MiB images (${compressMb} MiB for -c), 64 KiB clusters; ${runs} runs each, median, whole process, order alternating`);
  console.log('| case | qemu-img | qledger | ratio (qemu time / qledger time) | target |');
  console.log('|---|---|---|---|---|');
  const out = (who: 'q' | 'l') => f(`out-${who}.qcow2`);
  const convert = (name: string, input: string, opts: string[], target: string): Case => ({
    name,
    target,
    prepare: (who) => rmSync(out(who), { force: true }),
    cmd: (who) => [tool(who), ['convert', ...opts, '-O', 'qcow2', input, out(who)]],
    result: out,
    reference: input,
  });
  measure(convert(NAMES.convertRaw, f('alt.raw'), ['-f', 'raw'], '≥ 1'));
  measure(convert(NAMES.convertQcow2, f('alt.qcow2'), [], '≥ 1'));
  measure(convert(NAMES.deflate, f('text.raw'), ['-f', 'raw', '-c'], '≥ 1'));
  measure(convert(NAMES.zstd, f('text.raw'), ['-f', 'raw', '-c', '-o', 'compression_type=zstd'], '≥ 1'));
  measure({
    name: NAMES.commit,
    target: '≥ 1',
    prepare: (who) => {
      copyFileSync(f('base.qcow2'), f(`c-${who}-base.qcow2`));
      copyFileSync(f('top.qcow2'), f(`c-${who}-top.qcow2`));
      sh('qemu-img', ['rebase', '-u', '-b', `c-${who}-base.qcow2`, '-F', 'qcow2', f(`c-${who}-top.qcow2`)]);
    },
    cmd: (who) => [tool(who), ['commit', f(`c-${who}-top.qcow2`)]],
    result: (who) => f(`c-${who}-base.qcow2`),
    reference: f('top-content.raw'),
  });
  measure({
    name: NAMES.rebase,
    target: '≥ 1',
    prepare: (who) => copyFileSync(f('rtop.qcow2'), f(`r-${who}-top.qcow2`)),
    cmd: (who) => [tool(who), ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', f(`r-${who}-top.qcow2`)]],
    result: (who) => f(`r-${who}-top.qcow2`),
    reference: f('rtop-content.raw'),
  });
} finally {
  rmSync(dir, { recursive: true, force: true });
}
