/** The entry of a fuzz worker thread when qledger runs from its sources or its compiled library (the bundled CLI starts workers from itself: cli/bin.ts). */

import { isFuzzWorker, serveFuzzWorker } from './fuzz-worker.ts';

if (isFuzzWorker()) serveFuzzWorker();
