/**
 * Start-up: `qledger info` of a small image against `qemu-img info` and
 * against Node's own start-up (`node -e 0`), whole processes, alternating,
 * median of BENCH_RUNS (default 15). The CLI runs as a user runs it: the
 * package's bin `dist/qledger.cjs` (the bundled CLI through V8's code
 * cache), directly and through tools/qledger (build first with npm install
 * or npm run build).
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { median } from './common.ts';

const runs = Number(process.env['BENCH_RUNS'] ?? 15);
const root = new URL('..', import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), 'qledger-sbench-'));

function timed(cmd: string, args: string[]): number {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.status}: ${r.stderr}`);
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

try {
  const img = join(dir, 'small.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
  const cases: Array<[string, string, string[]]> = [
    ['node -e 0', 'node', ['-e', '0']],
    ['qledger info (the bin, dist/qledger.cjs)', 'node', [join(root, 'dist/qledger.cjs'), 'info', img]],
    ['qledger info (tools/qledger)', join(root, 'tools/qledger'), ['info', img]],
    ['qemu-img info', 'qemu-img', ['info', img]],
  ];
  const times = cases.map(() => [] as number[]);
  // rotate the order every round, so no command always runs first
  for (let i = 0; i < runs; i++) {
    for (let k = 0; k < cases.length; k++) {
      const at = (k + i) % cases.length;
      const [, cmd, args] = cases[at]!;
      times[at]!.push(timed(cmd, args));
    }
  }
  const node = median(times[0]!);
  console.log(`start-up, median of ${runs}, whole process`);
  console.log('| command | time | against node -e 0 |');
  console.log('|---|---|---|');
  cases.forEach(([name], k) => console.log(`| ${name} | ${median(times[k]!).toFixed(1)} ms | ${(median(times[k]!) / node).toFixed(2)}× |`));
} finally {
  rmSync(dir, { recursive: true, force: true });
}
