/**
 * qledger dedup: `dedup [-f qcow2] [-p] [-q] [--output=human|json] IMG`,
 * offline content dedup of an image (no qemu-img counterpart). Every whole
 * data cluster the active tree owns alone whose bytes an earlier cluster
 * holds maps that one, and its own is freed and given back to the file
 * system; the image stays plain qcow2. Reports the clusters scanned and
 * merged, the bytes saved, the active tree's dedup state and the file's
 * length and allocated bytes before and after.
 */

import { statSync } from 'node:fs';
import { UsageError } from '../errors.ts';
import { Image } from '../engine/image.ts';
import type { DedupState } from '../engine/dedup/stats.ts';
import { getopt } from './args.ts';
import { progressPrinter } from './io-format.ts';
import { fail, type Output } from './output.ts';

function fileBytes(path: string): { length: number; allocated: number } {
  const st = statSync(path);
  return { length: st.size, allocated: st.blocks * 512 };
}

export async function runDedup(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'f', flags: 'pqh', long: { output: true } }, 'dedup');
  const last = (k: string) => p.opts.filter(([x]) => x === k).at(-1)?.[1];
  const output = last('output') ?? 'human';
  if (output !== 'human' && output !== 'json') return fail(io, '--output must be used with human or json as argument.');
  if (p.positional.length !== 1) throw new UsageError("Expecting one image file name\nTry 'qledger --help' for more information");
  const fmt = last('f');
  if (fmt !== undefined && fmt !== 'qcow2') return fail(io, `dedup: format '${String(fmt)}' cannot share clusters; only qcow2 can`);
  const path = p.positional[0]!;
  const quiet = last('q') === true;
  const before = fileBytes(path);
  // an image that cannot share gets the error below; its open's warning would say it twice
  const img = await Image.open(path, { format: 'qcow2', write: true, dedup: true, onWarning: (m) => (/: dedup is off: /.test(m) ? undefined : io.err(`qledger: warning: ${m}\n`)) });
  let result: { scanned: number; merged: number; bytesSaved: number };
  let state: DedupState;
  try {
    const printer = last('p') === true && !quiet && output === 'human' ? progressPrinter(io) : undefined;
    printer?.(0, 1);
    result = await img.dedup({ onProgress: printer });
    if (printer) io.out('\n');
    state = await img.dedupState();
  } finally {
    await img.close();
  }
  const after = fileBytes(path);
  if (output === 'json') {
    const j = {
      'clusters-scanned': result.scanned,
      'clusters-merged': result.merged,
      'bytes-saved': result.bytesSaved,
      'data-clusters': state.dataClusters,
      'stored-clusters': state.storedClusters,
      'shared-clusters': state.sharedClusters,
      'bytes-shared': state.bytesSaved,
      ratio: Math.round(state.ratio * 1000) / 1000,
      'file-length-before': before.length,
      'file-length-after': after.length,
      'allocated-before': before.allocated,
      'allocated-after': after.allocated,
    };
    io.out(JSON.stringify(j, null, 4) + '\n');
  } else if (!quiet) {
    io.out(
      `Clusters scanned: ${result.scanned}\n` +
        `Clusters merged: ${result.merged} (${result.bytesSaved} bytes saved)\n` +
        `Shared clusters: ${state.sharedClusters} (${state.dataClusters} data clusters stored in ${state.storedClusters}; ${state.bytesSaved} bytes saved in all)\n` +
        `Dedup ratio: ${state.ratio.toFixed(2)}\n` +
        `File length: ${before.length} -> ${after.length} bytes; allocated: ${before.allocated} -> ${after.allocated} bytes\n`,
    );
  }
  return 0;
}
