/** The qledger program's entry point (bundled into dist/cli.cjs; run from sources by tools/qledger). */

import { runAsProgram } from './main.ts';

runAsProgram();
