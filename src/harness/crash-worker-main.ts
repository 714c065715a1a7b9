/** The entry of a crash-test worker thread when qledger runs from its sources or its compiled library (the bundled CLI starts workers from itself: cli/bin.ts). */

import { isCrashWorker, serveCrashWorker } from './crash-worker.ts';

if (isCrashWorker()) serveCrashWorker();
