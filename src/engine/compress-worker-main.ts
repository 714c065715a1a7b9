/** The entry of a compression worker thread when qledger runs from its sources or its compiled library (the bundled CLI starts workers from itself: cli/bin.ts). */

import { isCompressWorker, serveCompressWorker } from './compress-pool.ts';

if (isCompressWorker()) serveCompressWorker();
