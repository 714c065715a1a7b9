/** The qledger program's entry point (bundled into dist/cli.cjs; run from sources by tools/qledger). A fuzz worker thread started from the bundle runs the worker's loop instead (harness/fuzz-worker.ts), loaded only then. */

import { isMainThread, workerData } from 'node:worker_threads';
import { runAsProgram } from './main.ts';

if (!isMainThread && (workerData as { qledgerFuzzWorker?: boolean } | undefined)?.qledgerFuzzWorker === true) void import('../harness/fuzz-worker.ts').then((m) => m.serveFuzzWorker());
else runAsProgram();
