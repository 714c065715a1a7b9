/**
 * qemu-img measure: `measure [--output=human|json] [-O FMT] [-o OPTS]
 * [--size N | [-f FMT] [--image-opts] [-l SNAPSHOT] [-U] FILE]`, with
 * qemu-img's checks, messages, lines and JSON keys. The arithmetic is
 * engine/measure.ts; here the options, and the input's data ranges from its
 * map (the whole chain, as bdrv_block_status_above sees it).
 */

import { UsageError } from '../errors.ts';
import { Image } from '../engine/image.ts';
import { qemuJson } from '../engine/info.ts';
import { measure, type MeasureTarget } from '../engine/measure.ts';
import { createOptionsFrom } from '../engine/create.ts';
import type { ImageFormat } from '../engine/open.ts';
import { Qcow2Layer } from '../engine/qcow2-layer.ts';
import { SIZE_SUFFIX_HELP, forceShareOf, getopt, parseOptionList, parseSize } from './args.ts';
import { imageSpec } from './image-spec.ts';
import { fail, type Output } from './output.ts';

export async function runMeasure(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'fOlo', flags: 'hU', long: { output: true, size: true, 'image-opts': false, 'force-share': false, object: true, untrusted: false } }, 'measure');
  const last = (...k: string[]) => p.opts.filter(([x]) => k.includes(x)).at(-1)?.[1];
  const output = last('output') ?? 'human';
  if (output !== 'human' && output !== 'json') return fail(io, '--output must be used with human or json as argument.');
  const outFmt = String(last('O') ?? 'raw');
  if (outFmt !== 'qcow2' && outFmt !== 'raw') return fail(io, `Unknown file format '${outFmt}'`);
  let target: MeasureTarget;
  try {
    target = targetOf(outFmt, p.opts.filter(([k]) => k === 'o').map(([, v]) => String(v)));
  } catch (e) {
    if (e instanceof UsageError && (e.data as { options?: boolean }).options) return fail(io, e.message, `Invalid options for file format '${outFmt}'`);
    if (e instanceof UsageError) return fail(io, e.message);
    throw e;
  }
  const sizeArg = last('size');
  const file = p.positional[0];
  if (p.positional.length > 1) return fail(io, "Expecting one image file name\nTry 'qledger --help' for more information");
  if (sizeArg !== undefined && file !== undefined) return fail(io, '--size N cannot be used together with a filename.');
  if (sizeArg === undefined && file === undefined) return fail(io, 'Either --size N or one filename must be specified.');
  if (file === undefined && (last('f', 'l') !== undefined || p.opts.some(([k]) => k === 'image-opts'))) return fail(io, '--image-opts, -f, and -l require a filename argument.');

  let m;
  if (sizeArg !== undefined) {
    let size: number;
    try {
      size = parseSize(String(sizeArg));
    } catch {
      return fail(io, `Invalid image size specified. ${SIZE_SUFFIX_HELP[0]}`, SIZE_SUFFIX_HELP[1]);
    }
    try {
      m = await measure(target, { size });
    } catch (e) {
      if (e instanceof UsageError) return fail(io, e.message);
      throw e;
    }
  } else {
    const spec = imageSpec(file!, p.opts.some(([k]) => k === 'image-opts'));
    const fmt = (last('f') as ImageFormat | undefined) ?? spec.format;
    const snapshot = last('l');
    const img = await Image.open(spec.path, { format: fmt, snapshot: snapshot === undefined ? undefined : String(snapshot), forceShare: forceShareOf(p) || spec.forceShare, trusted: !p.opts.some(([k]) => k === 'untrusted') });
    try {
      const top = img.top;
      // qcow2 v3 inputs can hold persistent bitmaps: their size is reported (0 without any)
      const bitmaps = top instanceof Qcow2Layer && top.parsed.header.version >= 3 ? (await top.bitmapDirectory()).map((b) => ({ name: b.name, granularity: 2 ** b.granularityBits })) : undefined;
      const data = (async function* () {
        for await (const e of img.map()) if (e.data && !e.zero) yield e;
      })();
      m = await measure(target, { size: img.size, data, bitmaps });
    } catch (e) {
      if (e instanceof UsageError) return fail(io, e.message);
      throw e;
    } finally {
      await img.close();
    }
  }
  if (output === 'json') {
    const o: Record<string, number> = {};
    if (m.bitmaps !== undefined) o['bitmaps'] = m.bitmaps;
    o['required'] = m.required;
    o['fully-allocated'] = m.fullyAllocated;
    io.out(qemuJson(o) + '\n');
  } else {
    io.out(`required size: ${m.required}\nfully allocated size: ${m.fullyAllocated}\n${m.bitmaps !== undefined ? `bitmaps size: ${m.bitmaps}\n` : ''}`);
  }
  return 0;
}

/** The output format's creation options, checked as qcow2_measure checks them (its messages). */
function targetOf(format: 'qcow2' | 'raw', lists: string[]): MeasureTarget {
  const map = new Map<string, string>();
  for (const l of lists) for (const [k, v] of parseOptionList(l)) map.set(k, v);
  const base: MeasureTarget = { format, clusterSize: 65536, refcountBits: 16, extendedL2: false, version: 3, preallocation: 'off', hasBackingFile: false };
  if (format === 'raw') {
    for (const k of map.keys()) if (k !== 'size' && k !== 'preallocation') throw new UsageError(`Invalid parameter '${k}'`, { options: true });
    return base;
  }
  if (map.get('preallocation') !== undefined && !['off', 'metadata', 'falloc', 'full'].includes(map.get('preallocation')!)) throw new UsageError(`invalid parameter value: ${map.get('preallocation')}`);
  let o;
  try {
    o = createOptionsFrom(map, (t, what) => parseSize(t, what));
  } catch (e) {
    if (e instanceof UsageError) throw new UsageError(e.message, { options: true });
    throw e;
  }
  const extendedL2 = o.extendedL2 ?? false;
  const cs = o.clusterSize ?? 65536;
  const bits = Math.log2(cs);
  if (!Number.isInteger(bits) || bits < 9 || bits > 21) throw new UsageError('Cluster size must be a power of two between 512 and 2048k');
  if (extendedL2 && cs < 16384) throw new UsageError('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  const compat = o.compat ?? '1.1';
  if (compat !== '0.10' && compat !== '1.1') throw new UsageError(`Invalid compatibility level: '${compat}'`);
  const version = compat === '0.10' ? 2 : 3;
  const rb = o.refcountBits ?? 16;
  if (rb > 64 || !Number.isInteger(Math.log2(rb))) throw new UsageError('Refcount width must be a power of two and may not exceed 64 bits');
  if (version < 3 && rb !== 16) throw new UsageError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  return { format, clusterSize: cs, refcountBits: rb, extendedL2, version, preallocation: o.preallocation ?? 'off', hasBackingFile: o.backingFile !== undefined };
}
