/**
 * Images named as QEMU's tools name them: a filename, a `json:{…}`
 * pseudo-filename, or with --image-opts a `driver=…,file.filename=…` option
 * string. Nested JSON objects flatten to dotted keys as QEMU flattens them.
 * The drivers qledger has are qcow2 and raw over the file protocol; any
 * other driver, and any option qledger does not take, is refused by name
 * in qemu-img's words, exit 1.
 */

import { QledgerError } from '../errors.ts';
import { parseOptionList } from './args.ts';
import { OVERLAP_MODES, isOverlapMode, type OverlapMode } from '../engine/write/overlap.ts';

export interface ImageSpec {
  readonly path: string;
  /** the format the spec names; undefined: probe (or -f) */
  readonly format: 'qcow2' | 'raw' | undefined;
  readonly forceShare: boolean;
  /** qcow2's overlap-check option, if the spec names it */
  readonly overlapCheck?: OverlapMode | undefined;
  /** false: the untrusted-image policy (--untrusted) */
  readonly trusted?: boolean | undefined;
}

const FORMATS = new Set(['qcow2', 'raw']);
const PROTOCOLS = new Set(['file']);

function refuse(spec: string, why: string): never {
  throw new QledgerError('E_USAGE', `Could not open '${spec}': ${why}`, { spec });
}

function flatten(v: unknown, prefix: string, out: Map<string, string>, spec: string): void {
  if (v !== null && typeof v === 'object' && !Array.isArray(v)) {
    for (const [k, x] of Object.entries(v)) flatten(x, prefix ? `${prefix}.${k}` : k, out, spec);
    return;
  }
  if (typeof v === 'string') out.set(prefix, v);
  else if (typeof v === 'boolean') out.set(prefix, v ? 'on' : 'off');
  else if (typeof v === 'number') out.set(prefix, String(v));
  else refuse(spec, `Invalid parameter type for '${prefix}'`);
}

function onOff(spec: string, key: string, v: string | undefined): boolean {
  if (v === undefined || v === 'off' || v === 'false') return false;
  if (v === 'on' || v === 'true') return true;
  return refuse(spec, `Parameter '${key}' expects 'on' or 'off'`);
}

/** The options of a spec, as QEMU reads them. */
function options(spec: string, imageOpts: boolean): Map<string, string> | undefined {
  if (spec.startsWith('json:')) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(spec.slice(5));
    } catch {
      refuse(spec, 'Could not parse the JSON options');
    }
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) refuse(spec, 'Could not parse the JSON options: not an object');
    const out = new Map<string, string>();
    flatten(parsed, '', out, spec);
    return out;
  }
  return imageOpts ? parseOptionList(spec) : undefined;
}

/** Resolve one image argument: a filename as it is, or the options a spec gives. */
export function imageSpec(arg: string, imageOpts: boolean): ImageSpec {
  const o = options(arg, imageOpts);
  if (!o) return { path: arg, format: undefined, forceShare: false };
  const ol = o.get('overlap-check');
  o.delete('overlap-check');
  if (ol !== undefined && !isOverlapMode(ol)) refuse(arg, `Unsupported value '${ol}' for qcow2 option 'overlap-check'. Allowed are any of the following: ${OVERLAP_MODES.join(', ')}`);
  const take = (k: string) => {
    const v = o.get(k);
    o.delete(k);
    return v;
  };
  const driver = take('driver');
  const forceShare = onOff(arg, 'force-share', take('force-share'));
  take('read-only'); // qemu-img opens read-only where it only reads
  let path: string | undefined;
  let format: ImageSpec['format'];
  if (driver === 'file') {
    // the protocol alone: the file's bytes, as raw
    path = take('filename');
    format = 'raw';
  } else {
    if (driver !== undefined && !FORMATS.has(driver)) refuse(arg, `Unknown driver '${driver}' (qledger has qcow2, raw and file)`);
    format = driver as ImageSpec['format'];
    const proto = take('file.driver');
    if (proto !== undefined && !PROTOCOLS.has(proto)) refuse(arg, `Unknown protocol driver '${proto}' (qledger has file)`);
    path = take('file.filename') ?? take('file');
    for (const k of o.keys()) {
      if (k.startsWith('file.')) refuse(arg, `Block protocol 'file' doesn't support the option '${k.slice(5)}'`);
    }
  }
  for (const k of o.keys()) refuse(arg, `Block format '${format ?? driver ?? 'qcow2'}' does not support the option '${k}'`);
  if (path === undefined || path === '') refuse(arg, "A block device must be specified for \"file\"");
  if (ol !== undefined && format === 'raw') refuse(arg, `Block format 'raw' does not support the option 'overlap-check'`);
  return { path, format, forceShare, overlapCheck: ol as OverlapMode | undefined };
}
