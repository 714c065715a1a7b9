/** The qledger program's entry point (bundled into dist/cli.cjs; run from sources by tools/qledger). A fuzz, crash-test or compression worker thread started from the bundle runs its worker loop instead (harness/fuzz-worker.ts, harness/crash-worker.ts, engine/compress-pool.ts), loaded only then. */

import { isMainThread, workerData } from 'node:worker_threads';
import { runAsProgram } from './main.ts';

const role = isMainThread ? undefined : (workerData as { qledgerFuzzWorker?: boolean; qledgerCrashWorker?: boolean; qledgerCompressWorker?: boolean } | undefined);
if (role?.qledgerFuzzWorker === true) void import('../harness/fuzz-worker.ts').then((m) => m.serveFuzzWorker());
else if (role?.qledgerCrashWorker === true) void import('../harness/crash-worker.ts').then((m) => m.serveCrashWorker());
else if (role?.qledgerCompressWorker === true) void import('../engine/compress-pool.ts').then((m) => m.serveCompressWorker());
else runAsProgram();
