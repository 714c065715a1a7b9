/**
 * qemu-img rebase: `rebase [-f FMT] [-t CACHE] [-T CACHE] [-p] [-q] [-u]
 * -b BACKING [-F FMT] IMG` (engine/rebase.ts does the work), with
 * qemu-img's checks and messages. A missing -F with a new backing file is
 * refused before anything is written (qemu-img copies first and refuses the
 * header change at the end).
 */

import { NotFoundError, UnsupportedError, UsageError } from '../errors.ts';
import { combinePath, type ImageFormat } from '../engine/open.ts';
import { rebase } from '../engine/rebase.ts';
import { getopt } from './args.ts';
import { progressPrinter } from './io-format.ts';
import type { Output } from './output.ts';

export async function runRebase(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'fbFtT', flags: 'pqucUh', long: { 'image-opts': false, object: true, 'force-share': false, untrusted: false } }, 'rebase');
  const last = (k: string) => p.opts.filter(([x]) => x === k).at(-1)?.[1];
  const unsafe = last('u') === true;
  const b = last('b');
  if (b === undefined && !unsafe) {
    io.err("qledger: Must specify backing file (-b) or use unsafe mode (-u)\nTry 'qledger --help' for more information\n");
    return 1;
  }
  if (last('c') === true) throw new UnsupportedError('rebase: -c (compressed copies) is not supported');
  if (p.positional.length !== 1) throw new UsageError("Expecting one image file name\nTry 'qledger --help' for more information");
  const path = p.positional[0]!;
  const name = b === undefined || b === '' ? undefined : String(b);
  const F = last('F');
  if (name !== undefined && F === undefined) {
    io.err(`qledger: Could not change the backing file to '${name}': backing format must be specified\n`);
    return 1;
  }
  if (F !== undefined && F !== 'qcow2' && F !== 'raw') throw new UnsupportedError(`rebase: backing format '${String(F)}' is not supported (qcow2 and raw are)`);
  const progress = last('p') === true && last('q') !== true;
  try {
    await rebase(path, {
      backing: name,
      backingFormat: F as 'qcow2' | 'raw' | undefined,
      backingPath: name === undefined ? undefined : combinePath(path, name),
      unsafe,
      format: last('f') as ImageFormat | undefined,
      progress: progress ? progressPrinter(io) : undefined,
      trusted: !p.opts.some(([k]) => k === 'untrusted'),
    });
  } catch (e) {
    if (e instanceof NotFoundError && name !== undefined && !unsafe && String((e.data as { path?: string }).path ?? '').endsWith(name)) {
      io.err(`qledger: Could not open new backing file '${name}': ${e.message}\n`);
      return 1;
    }
    throw e;
  }
  if (progress) io.out('\n');
  return 0;
}
