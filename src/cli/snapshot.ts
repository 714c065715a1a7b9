/**
 * qemu-img snapshot: `snapshot [-l | -c NAME | -a NAME | -d NAME] [-q] [-U]
 * [--image-opts] IMG`, with qemu-img's lookups (apply: id first, then name;
 * delete: the first snapshot with that name), messages and exit codes.
 * Create, apply and delete are journal transactions of the write engine,
 * durable before the command exits.
 */

import { QledgerError, UsageError } from '../errors.ts';
import { Image } from '../engine/image.ts';
import { snapshotLine } from '../engine/info.ts';
import { getopt, forceShareOf } from './args.ts';
import { imageSpec } from './image-spec.ts';
import { fail, type Output } from './output.ts';

type Action = 'l' | 'c' | 'a' | 'd';

/** strerror for the errnos a snapshot operation reports, as qemu-img prints them. */
const STRERROR: Record<number, string> = { 2: 'No such file or directory', 22: 'Invalid argument', 27: 'File too large', 95: 'Operation not supported' };

export async function runSnapshot(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'fcad', flags: 'lqhU', long: { 'force-share': false, 'image-opts': false } }, 'snapshot');
  let action: Action | undefined;
  let name = '';
  for (const [k, v] of p.opts) {
    if (k !== 'l' && k !== 'c' && k !== 'a' && k !== 'd') continue;
    if (action) return fail(io, "Cannot mix '-l', '-a', '-c', '-d'\nTry 'qledger --help' for more information");
    action = k;
    if (typeof v === 'string') name = v;
  }
  if (p.positional.length !== 1) return fail(io, "Expecting one image file name\nTry 'qledger --help' for more information");
  const imageOpts = p.opts.some(([k]) => k === 'image-opts');
  const spec = imageSpec(p.positional[0]!, imageOpts);
  const fArg = p.opts.filter(([k]) => k === 'f').at(-1)?.[1];
  if (fArg !== undefined && fArg !== 'qcow2' && fArg !== 'raw') throw new UsageError(`Unknown file format '${String(fArg)}'`);
  const format = (fArg as 'qcow2' | 'raw' | undefined) ?? spec.format;
  const forceShare = spec.forceShare || forceShareOf(p);
  if (action === undefined) return 0; // qemu-img does nothing without an action
  if (action === 'l') {
    const img = await Image.open(spec.path, { format, noBacking: true, forceShare });
    try {
      if (img.snapshots.length > 0) {
        io.out('Snapshot list:\n' + snapshotLine() + '\n');
        for (const s of img.snapshots) io.out(snapshotLine(s) + '\n');
      }
      return 0;
    } finally {
      await img.close();
    }
  }
  const probe = await Image.open(spec.path, { format, noBacking: true });
  const raw = probe.format === 'raw';
  const names = probe.snapshots.list().map((s) => s.name);
  await probe.close();
  if (raw) {
    if (action === 'c') return fail(io, `Could not create snapshot '${name}': -95 (${STRERROR[95]})`);
    if (action === 'a') return fail(io, `Could not apply snapshot '${name}': Block driver does not support snapshots`);
    return fail(io, `Could not delete snapshot '${name}': snapshot not found`);
  }
  // qemu-img looks a snapshot to delete up by name only (bdrv_snapshot_find)
  if (action === 'd' && !names.includes(name)) return fail(io, `Could not delete snapshot '${name}': snapshot not found`);
  const img = await Image.open(spec.path, { format: 'qcow2', write: true, onWarning: (m) => io.err(`qledger: warning: ${m}\n`) });
  try {
    if (action === 'c') await img.snapshots.create(name);
    else if (action === 'a') await img.snapshots.apply(name);
    else await img.snapshots.delete(name, { byName: true });
  } catch (e) {
    const errno = e instanceof QledgerError ? (e.data['errno'] as number | undefined) : undefined;
    if (errno === undefined) throw e;
    // the reason QEMU reports on a line of its own before the command's failure (a refused size)
    const detail = (e as QledgerError).data['detail'];
    if (typeof detail === 'string') io.err(`qledger: ${detail}\n`);
    if (action === 'c') return fail(io, `Could not create snapshot '${name}': -${errno} (${STRERROR[errno] ?? 'Error'})`);
    if (action === 'a') return fail(io, `Could not apply snapshot '${name}': Failed to load snapshot: ${STRERROR[errno] ?? 'Error'}`);
    return fail(io, `Could not delete snapshot '${name}': ${errno === 2 ? 'snapshot not found' : `-${errno} (${STRERROR[errno] ?? 'Error'})`}`);
  } finally {
    await img.close();
  }
  return 0;
}
