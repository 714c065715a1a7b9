/**
 * qledger fuzz: `fuzz [--cases N] [--seed S] [--shard I/N] [--commands
 * LIST] [--timeout MS] [--memory MIB] [--out DIR] [--qemu] [--output=
 * human|json] [--in-process] [--checkpoint FILE [--resume]] [IMAGE...]`, qledger's own: seeded mutations of the given
 * images (or the built-in kinds) with every command run on each, the
 * outcomes counted by class (harness/fuzz.ts), failing cases written to
 * --out. The commands run in a worker thread that is stopped when one
 * hangs inside a synchronous step (harness/fuzz-worker.ts); --in-process
 * runs them on the main thread, where only hangs between awaits are caught. Exit 0 when no case crashed, hung, passed the memory bound or
 * wrote after an error; 2 otherwise (disagreements with qemu-img are
 * reported, not failed).
 */

import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { basename } from 'node:path';
import { UsageError } from '../errors.ts';
import { FUZZ_CLASSES, FUZZ_COMMANDS, builtinImages, fuzz, type FuzzCommand, type FuzzSummary } from '../harness/fuzz.ts';
import { WorkerRunner } from '../harness/fuzz-worker.ts';
import { getopt } from './args.ts';
import type { Output } from './output.ts';

export async function runFuzz(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: '', flags: 'q', long: { cases: true, seed: true, shard: true, commands: true, timeout: true, memory: true, out: true, qemu: false, output: true, 'in-process': false, checkpoint: true, resume: false } }, 'fuzz');
  const last = (k: string) => p.opts.filter(([x]) => x === k).at(-1)?.[1];
  const int = (k: string, d: number, min = 0) => {
    const v = last(k);
    if (v === undefined) return d;
    const n = Number(v);
    if (!Number.isSafeInteger(n) || n < min) throw new UsageError(`fuzz: --${k} expects an integer of at least ${min} (got '${String(v)}')`);
    return n;
  };
  const cases = int('cases', 1000, 1);
  const seed = int('seed', 1);
  const timeoutMs = int('timeout', 10_000, 1);
  const memoryBytes = int('memory', 512, 1) * 2 ** 20;
  let shard: { index: number; count: number } | undefined;
  const s = last('shard');
  if (s !== undefined) {
    const m = /^(\d+)\/(\d+)$/.exec(String(s));
    if (!m || Number(m[2]) < 1 || Number(m[1]) >= Number(m[2])) throw new UsageError(`fuzz: --shard expects I/N with 0 <= I < N (got '${String(s)}')`);
    shard = { index: Number(m[1]), count: Number(m[2]) };
  }
  let commands: FuzzCommand[] | undefined;
  const c = last('commands');
  if (c !== undefined) {
    commands = String(c).split(',') as FuzzCommand[];
    for (const x of commands) if (!FUZZ_COMMANDS.includes(x)) throw new UsageError(`fuzz: unknown command '${x}' (commands: ${FUZZ_COMMANDS.join(', ')})`);
  }
  const output = last('output') ?? 'human';
  if (output !== 'human' && output !== 'json') throw new UsageError(`fuzz: --output expects human or json`);
  const images = p.positional.length ? p.positional.map((f) => ({ name: basename(f), bytes: new Uint8Array(readFileSync(f)) })) : undefined;
  const out = last('out');
  const quiet = p.opts.some(([k]) => k === 'q');
  const step = Math.max(1, Math.floor(cases / 20));
  // the commands in a worker thread, stopped from here when one hangs in a synchronous step (--in-process: here)
  const inProcess = p.opts.some(([k]) => k === 'in-process');
  const seedImages = images ?? (await builtinImages());
  const runner = inProcess ? undefined : new WorkerRunner({ images: seedImages, seed, timeoutMs, memoryBytes });
  // --checkpoint FILE: the summary so far written every 1000 cases and when the campaign is stopped
  // (SIGTERM, SIGINT: a job runner's time limit), so a long campaign cut short still leaves its counts
  const checkpoint = last('checkpoint');
  // --resume: a campaign whose checkpoint is there goes on from it (the same command line run again
  // after a stop); with no checkpoint file yet it starts
  let resume: FuzzSummary | undefined;
  if (p.opts.some(([k]) => k === 'resume')) {
    if (checkpoint === undefined) throw new UsageError('fuzz: --resume needs --checkpoint FILE');
    if (existsSync(String(checkpoint))) {
      try {
        resume = JSON.parse(readFileSync(String(checkpoint), 'utf8')) as FuzzSummary;
      } catch (e) {
        throw new UsageError(`fuzz: the checkpoint '${String(checkpoint)}' is not a campaign summary (${e instanceof Error ? e.message : String(e)})`);
      }
      if (typeof resume?.next !== 'number' || typeof resume.campaign !== 'object') throw new UsageError(`fuzz: the checkpoint '${String(checkpoint)}' is not a campaign summary (no next case)`);
    }
  }
  let latest: FuzzSummary | undefined;
  const save = () => latest && checkpoint !== undefined && writeFileSync(String(checkpoint), JSON.stringify({ ...latest, stopped: true }, null, 2) + '\n');
  const onSignal = () => {
    save();
    process.exit(130);
  };
  if (checkpoint !== undefined) {
    process.once('SIGTERM', onSignal);
    process.once('SIGINT', onSignal);
  }
  const r = await fuzz({
    runner,
    onProgress: checkpoint === undefined ? undefined : (x) => ((latest = x), save()),
    resume,
    cases,
    seed,
    shard,
    images: seedImages,
    commands,
    timeoutMs,
    memoryBytes,
    outDir: out === undefined ? undefined : String(out),
    qemu: p.opts.some(([k]) => k === 'qemu'),
    onCase: quiet || output === 'json' ? undefined : (k) => (k % step === 0 ? io.err(`case ${k}\n`) : undefined),
  });
  await runner?.close();
  if (checkpoint !== undefined) {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
    writeFileSync(String(checkpoint), JSON.stringify(r, null, 2) + '\n');
  }
  if (output === 'json') io.out(JSON.stringify(r, null, 2) + '\n');
  else {
    io.out(`cases: ${r.cases} (seed ${r.seed}${shard ? `, shard ${shard.index}/${shard.count}` : ''}), command runs: ${r.runs}, ${r.casesPerSecond.toFixed(1)} cases per second\n`);
    for (const k of FUZZ_CLASSES) io.out(`${k}: ${r.classes[k]}\n`);
    if (r.differential) {
      // for judgment, not failures: which side refused an image the other one opened or read, and why
      io.out(`differential: ${r.differential.compared} outcomes compared with qemu-img info and qemu-io, ${r.differential.groups.reduce((n, g) => n + g.count, 0)} differ\n`);
      for (const g of r.differential.groups.slice(0, 30)) io.out(`  ${g.command} ${g.side === 'qemu-only' ? 'qemu-img/qemu-io only' : 'qledger only'}: ${g.count} (case ${g.example}): ${g.reason}\n`);
    }
    for (const f of r.failures.slice(0, 50)) io.out(`FAIL case ${f.case} (${f.image}: ${f.mutations.join('; ')}): ${f.command}: ${f.class}: ${f.message}${f.file ? `\n  reproduce: qledger ${f.command === 'write' ? "io -c 'write 0 128k'" : f.command === 'read' ? "io -r -c 'read 0 1M'" : f.command === 'convert' ? 'convert -O raw' : f.command} ${f.file}${f.command === 'convert' ? ' /dev/null' : ''}` : ''}\n`);
  }
  const bad = r.classes.crash + r.classes.hang + r.classes.memory + r.classes.writeAfterError;
  return bad ? 2 : 0;
}
