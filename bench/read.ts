/**
 * Read benchmarks (issue 19, item 2), qledger against qemu-img/qemu-io in the
 * same run, whole processes, order alternating, median of BENCH_RUNS (default 5):
 *   convert -O raw            of a 1 GiB image, every cluster allocated
 *   io -r -c 'read -q 0 1G'   of the same
 * and both of a 1 GiB image whose 64 KiB clusters alternate data and zero
 * (qemu-io wrote every other one). The outputs must be equal (cmp of the
 * raw files, and qemu-img compare of each against the image) before anything
 * is timed. BENCH_SIZE_MB overrides the size (1024).
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, openSync, writeSync, closeSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { alternate, median, timeProcess } from './common.ts';

const sizeMb = Number(process.env['BENCH_SIZE_MB'] ?? 1024);
const runs = Number(process.env['BENCH_RUNS'] ?? 5);
const root = new URL('..', import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), 'qledger-bench-'));
const qledger = join(root, 'tools/qledger');

function same(a: string, b: string, what: string): void {
  if (spawnSync('cmp', ['-s', a, b]).status !== 0) throw new Error(`${what}: qledger's output differs from qemu-img's`);
}

try {
  if (spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status !== 0) {
    console.error('bench: qemu-img not found (apt-get install qemu-utils): the comparison needs it');
    process.exit(1);
  }
  // Fully allocated: non-zero data in every cluster.
  const raw = join(dir, 'src.raw');
  const fd = openSync(raw, 'w');
  const mb = Buffer.alloc(1 << 20);
  for (let i = 0; i < sizeMb; i++) {
    for (let j = 0; j < mb.length; j += 8) mb.writeUInt32BE((i * 2654435761 + j) >>> 0, j);
    writeSync(fd, mb);
  }
  closeSync(fd);
  const full = join(dir, 'full.qcow2');
  execFileSync('qemu-img', ['convert', '-O', 'qcow2', raw, full]);
  rmSync(raw);
  // Half zero: every other 64 KiB cluster written by qemu-io, the rest never allocated.
  const half = join(dir, 'half.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', half, `${sizeMb}M`]);
  const cmds: string[] = [];
  for (let c = 0; c < sizeMb * 16; c += 2) cmds.push('-c', `write -q -P ${1 + (c % 250)} ${c * 65536} 64k`);
  for (let k = 0; k < cmds.length; k += 4000) execFileSync('qemu-io', [...cmds.slice(k, k + 4000), half]);

  const out = join(dir, 'out.raw');
  const ref = join(dir, 'ref.raw');
  console.log(`read benchmarks: ${sizeMb} MiB images, 64 KiB clusters; ${runs} runs each, median, whole process, page cache warm, order alternating`);
  console.log('| case | qemu | qledger | ratio (qemu time / qledger time) | target |');
  console.log('|---|---|---|---|---|');
  for (const [name, img] of [['fully allocated', full], ['64 KiB alternating data and zero', half]] as const) {
    // equal results first: the same raw file from both, equal to the image
    execFileSync('qemu-img', ['convert', '-O', 'raw', img, ref]);
    execFileSync(qledger, ['convert', '-O', 'raw', img, out]);
    same(ref, out, `convert of ${name}`);
    execFileSync('qemu-img', ['compare', '-q', img, out]);
    const cases: Array<[string, string[], string[], string]> = [
      ['convert -O raw', ['qemu-img', 'convert', '-O', 'raw', img, out], [qledger, 'convert', '-O', 'raw', img, out], '≥ 1.0'],
      [`io -r -c 'read -q 0 ${sizeMb}M'`, ['qemu-io', '-r', '-c', `read -q 0 ${sizeMb}M`, img], [qledger, 'io', '-r', '-c', `read -q 0 ${sizeMb}M`, img], '≥ 1.2'],
    ];
    for (const [what, theirsCmd, oursCmd, target] of cases) {
      const ours: number[] = [];
      const theirs: number[] = [];
      const q = () => {
        rmSync(out, { force: true });
        spawnSync('sync'); // neither pays for the other's dirty pages
        theirs.push(timeProcess(theirsCmd[0]!, theirsCmd.slice(1)));
      };
      const l = () => {
        rmSync(out, { force: true });
        spawnSync('sync');
        ours.push(timeProcess(oursCmd[0]!, oursCmd.slice(1)));
      };
      q(); // warm the page cache once
      theirs.length = 0;
      for (let i = 0; i < runs; i++) alternate(i, q, l);
      const t = median(theirs);
      const o = median(ours);
      console.log(`| ${what}, ${name} | ${t.toFixed(3)} s | ${o.toFixed(3)} s | **${(t / o).toFixed(2)}** | ${target} |`);
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
