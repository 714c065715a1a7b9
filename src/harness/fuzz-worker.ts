/**
 * The fuzzer's commands in a worker thread (qledger fuzz's default), so
 * that a hang inside one synchronous step, which no timer in the same
 * thread can interrupt, is stopped from outside: the main thread arms a
 * watchdog for each command, terminates the worker when it fires (the
 * command counts as a hang), and goes on with a fresh worker. A worker
 * that runs out of its heap limit counts its command as a memory blow-up.
 *
 * The worker is long-lived (one per campaign, unless one is stopped): it
 * builds each case itself from (seed, k) and the seed images it was given,
 * so only case numbers and outcomes cross between the threads.
 */

import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import { workerEntry } from '../worker-entry.ts';
import { fuzzCase, runOne, type CaseRunner, type FuzzClass, type FuzzCommand } from './fuzz.ts';

interface WorkerSetup {
  readonly qledgerFuzzWorker: true;
  readonly images: ReadonlyArray<{ readonly name: string; readonly bytes: Uint8Array }>;
  readonly seed: number;
  readonly timeoutMs: number;
  readonly memoryBytes: number;
  /** test switch: this case's first command spins synchronously for ever (the watchdog must stop it) */
  readonly spinCase?: number | undefined;
}

type Reply = { readonly cls: FuzzClass; readonly message: string };

/** True in a thread started as a fuzz worker (the bundled CLI checks this before it runs as a program). */
export function isFuzzWorker(): boolean {
  return !isMainThread && (workerData as Partial<WorkerSetup> | undefined)?.qledgerFuzzWorker === true;
}

/** The worker's loop: a case number and its commands in, each command's outcome out as it finishes. */
export function serveFuzzWorker(): void {
  const setup = workerData as WorkerSetup;
  parentPort!.on('message', (m: { k: number; cmds: FuzzCommand[]; first: boolean }) => {
    void (async () => {
      const name = `case-${m.k}.qcow2`;
      const bytes = fuzzCase(setup.images, setup.seed, m.k).bytes;
      for (const [i, cmd] of m.cmds.entries()) {
        if (i === 0 && m.first && m.k === setup.spinCase) for (;;);
        const r: Reply = await runOne(cmd, name, bytes, setup.timeoutMs, setup.memoryBytes);
        parentPort!.postMessage(r);
      }
    })();
  });
}

/** The main thread's side: one worker at a time, a watchdog per command. */
export class WorkerRunner implements CaseRunner {
  private worker: Worker | undefined;
  private readonly watchdogMs: number;

  constructor(private readonly setup: Omit<WorkerSetup, 'qledgerFuzzWorker'>) {
    // the worker's own timer catches hangs between awaits at timeoutMs; this one, later, the rest
    this.watchdogMs = setup.timeoutMs + Math.max(2000, setup.timeoutMs / 2);
  }

  private start(): Worker {
    const entry = workerEntry(import.meta.url, './fuzz-worker-main');
    const w = new Worker(entry.file, {
      eval: entry.eval,
      workerData: { ...this.setup, qledgerFuzzWorker: true } satisfies WorkerSetup,
      // the memory class's bound, with room for the worker's own code and the case
      // a young generation larger than the default: each case allocates its image and tables afresh, and scavenges cost a fifth of the time
      resourceLimits: { maxOldGenerationSizeMb: Math.ceil(this.setup.memoryBytes / 2 ** 20) + 256, maxYoungGenerationSizeMb: 96 },
      stdout: true,
      stderr: true,
    });
    w.unref();
    return w;
  }

  async runCase(k: number, commands: readonly FuzzCommand[]): Promise<Reply[]> {
    const out: Reply[] = [];
    // one message per case; after a stopped worker, the rest of the case goes to a new one
    while (out.length < commands.length) out.push(...(await this.runSome(k, commands.slice(out.length), out.length === 0)));
    return out;
  }

  /** Commands of case k in the current worker until they are done or one fails the worker (its outcome the last one returned). */
  private runSome(k: number, cmds: readonly FuzzCommand[], first: boolean): Promise<Reply[]> {
    const w = (this.worker ??= this.start());
    const got: Reply[] = [];
    return new Promise<Reply[]>((resolve) => {
      let settled = false;
      let timer: NodeJS.Timeout | undefined;
      const arm = () => {
        clearTimeout(timer);
        timer = setTimeout(() => stop({ cls: 'hang', message: `no result within ${this.watchdogMs} ms (stuck in a synchronous step: the worker was stopped)` }), this.watchdogMs);
      };
      const finish = () => {
        settled = true;
        clearTimeout(timer);
        w.off('message', onMessage);
        w.off('error', onError);
        w.off('exit', onExit);
        resolve(got);
      };
      const stop = (r: Reply) => {
        if (settled) return;
        got.push(r);
        if (this.worker === w) this.worker = undefined;
        void w.terminate();
        finish();
      };
      const onMessage = (r: Reply) => {
        if (settled) return;
        got.push(r);
        if (got.length === cmds.length) finish();
        else arm();
      };
      const onError = (e: Error & { code?: string }) =>
        stop(e.code === 'ERR_WORKER_OUT_OF_MEMORY' ? { cls: 'memory', message: `the worker ran out of its ${this.setup.memoryBytes + (256 << 20)}-byte heap` } : { cls: 'crash', message: `the worker failed: ${e.message}` });
      const onExit = (code: number) => stop({ cls: 'crash', message: `the worker exited (${code})` });
      w.on('message', onMessage);
      w.on('error', onError);
      w.on('exit', onExit);
      arm();
      w.postMessage({ k, cmds, first });
    });
  }

  async close(): Promise<void> {
    const w = this.worker;
    this.worker = undefined;
    await w?.terminate();
  }
}
