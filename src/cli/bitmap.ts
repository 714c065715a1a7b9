/**
 * qemu-img bitmap: `bitmap (--merge SOURCE | --add | --remove | --clear |
 * --enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRAN]
 * [--image-opts | -f FMT] FILE BITMAP`. The actions run in the order given
 * on one open of the image, each one journal transaction of the write
 * engine; the first that fails stops the rest with qemu-img's
 * "Operation ACTION on bitmap NAME failed: ..." and exit 1.
 */

import { QledgerError, UsageError } from '../errors.ts';
import { Image } from '../engine/image.ts';
import { getopt, parseSize } from './args.ts';
import { imageSpec } from './image-spec.ts';
import { fail, type Output } from './output.ts';

type Action = { readonly op: 'add' | 'remove' | 'clear' | 'enable' | 'disable' } | { readonly op: 'merge'; readonly source: string };

const LONG = { add: false, remove: false, clear: false, enable: false, disable: false, merge: true, 'image-opts': false, object: true, help: false };

export async function runBitmap(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'bFfg', flags: 'hq', long: LONG }, 'bitmap');
  const actions: Action[] = [];
  let granularity: number | undefined;
  for (const [k, v] of p.opts) {
    if (k === 'merge') actions.push({ op: 'merge', source: String(v) });
    else if (k === 'add' || k === 'remove' || k === 'clear' || k === 'enable' || k === 'disable') actions.push({ op: k });
    else if (k === 'g') {
      try {
        granularity = parseSize(String(v), 'granularity');
      } catch {
        return fail(io, 'Invalid granularity specified. You may use k, M, G, T, P or E suffixes for', 'kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.');
      }
    } else if (k === 'object') throw new UsageError('bitmap: --object is not supported');
  }
  const last = (k: string) => p.opts.filter(([x]) => x === k).at(-1)?.[1];
  const source = last('b');
  const sourceFmt = last('F');
  if (actions.length === 0) return fail(io, 'Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  if (granularity !== undefined && !actions.some((a) => a.op === 'add')) return fail(io, 'granularity only supported with --add');
  if (source !== undefined && !actions.some((a) => a.op === 'merge')) return fail(io, 'Merge bitmap source file only supported with --merge');
  if (sourceFmt !== undefined && source === undefined) return fail(io, '-F only supported with -b');
  if (p.positional.length !== 2) return fail(io, 'Expecting filename and bitmap name');
  const spec = imageSpec(p.positional[0]!, p.opts.some(([k]) => k === 'image-opts'));
  const name = p.positional[1]!;
  const fArg = last('f');
  if (fArg !== undefined && fArg !== 'qcow2' && fArg !== 'raw') throw new UsageError(`Unknown file format '${String(fArg)}'`);
  const format = (fArg as 'qcow2' | 'raw' | undefined) ?? spec.format;
  const probe = await Image.open(spec.path, { format, noBacking: true, forceShare: true });
  const raw = probe.format === 'raw';
  await probe.close();
  // a raw image has nowhere to store a bitmap: the first action fails in qemu-img's words
  if (raw) return fail(io, `Operation ${actions[0]!.op} on bitmap ${name} failed: Can't store persistent bitmaps to ${spec.path}: Operation not supported`);
  const img = await Image.open(spec.path, { format: 'qcow2', write: true, noBacking: true, onWarning: (m) => io.err(`qledger: warning: ${m}\n`) });
  try {
    for (const a of actions) {
      try {
        if (a.op === 'add') await img.bitmaps.add(name, { granularity });
        else if (a.op === 'merge') await img.bitmaps.merge(name, source === undefined ? a.source : await sourceBits(String(source), sourceFmt, a.source));
        else await img.bitmaps[a.op](name);
      } catch (e) {
        if (!(e instanceof QledgerError)) throw e;
        return fail(io, `Operation ${a.op} on bitmap ${name} failed: ${e.message}`);
      }
    }
  } finally {
    await img.close();
  }
  return 0;
}

/** The bits of bitmap `name` of another image (-b FILE [-F FMT]), opened read-only. */
async function sourceBits(file: string, fmt: string | true | undefined, name: string) {
  if (fmt !== undefined && fmt !== 'qcow2' && fmt !== 'raw') throw new UsageError(`Unknown file format '${String(fmt)}'`);
  const src = await Image.open(file, { format: fmt as 'qcow2' | 'raw' | undefined, noBacking: true, forceShare: true });
  try {
    return await src.bitmaps.bits(name);
  } finally {
    await src.close();
  }
}
