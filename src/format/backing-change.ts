/**
 * Changing an image's backing file name and format (qemu-img rebase) so
 * that the header is valid after every single write: pure planning over
 * the header cluster's bytes. The new name goes to free space in the
 * header cluster first (nothing points at it yet); the backing-format
 * extension is rewritten in place when it exists (raw and qcow2 both pad
 * to 8 bytes, so nothing after it moves) or inserted as
 * extension-insert.ts inserts one; last, one 12-byte write in sector 0
 * (backing_file_offset and backing_file_size) switches to the new name.
 */

import { putU32, putU64, u32, u64 } from './bytes.ts';
import { EXT_BACKING_FORMAT } from './features.ts';
import { planExtensionInsert } from './extension-insert.ts';

export interface HeaderWrite {
  readonly offset: number;
  readonly bytes: Uint8Array;
}

/** Writes in order, a flush after each; undefined when the header cluster has no room. */
export type BackingChangePlan = HeaderWrite[];

const enc = new TextEncoder();

/** Offsets of the extensions after the header in `head`, up to the end marker. */
function extensions(head: Uint8Array): { at: number; type: number; length: number }[] {
  const version = u32(head, 4);
  const out: { at: number; type: number; length: number }[] = [];
  for (let p = version === 2 ? 72 : u32(head, 100); p + 8 <= head.length && u32(head, p) !== 0; ) {
    const length = u32(head, p + 4);
    out.push({ at: p, type: u32(head, p), length });
    p += 8 + Math.ceil(length / 8) * 8;
  }
  return out;
}

/**
 * Plan the change of the backing file of header cluster `head` to `name`
 * with `format` (undefined name: no backing file). After every write the
 * header names the old file with its old format, or the new file with the
 * new format (or, while a missing format extension is being added, with
 * none, which readers probe): never one file with the other's format.
 */
export function planBackingChange(head: Uint8Array, name: string | undefined, format: string | undefined): BackingChangePlan | undefined {
  const cs = head.length;
  const steps: HeaderWrite[] = [];
  const cur = head.slice();
  const apply = (w: HeaderWrite) => {
    steps.push(w);
    cur.set(w.bytes, w.offset);
  };
  const field = new Uint8Array(12);
  if (name === undefined) {
    apply({ offset: 8, bytes: field });
    return steps;
  }
  // the new name, where nothing points: after everything, or else between the extensions and the current name
  const bytes = enc.encode(name);
  const exts = extensions(cur);
  const lastExt = exts[exts.length - 1];
  const extEnd = (lastExt ? lastExt.at + 8 + Math.ceil(lastExt.length / 8) * 8 : u32(cur, 4) === 2 ? 72 : u32(cur, 100)) + 8;
  const oldAt = u64(cur, 8);
  const oldEnd = oldAt ? oldAt + u32(cur, 16) : 0;
  let at = Math.max(extEnd, oldEnd);
  if (at + bytes.length > cs && oldAt && extEnd + bytes.length <= oldAt) at = extEnd;
  if (at + bytes.length > cs) return undefined;
  if (bytes.length) apply({ offset: at, bytes });
  putU64(field, 0, bytes.length ? at : 0);
  putU32(field, 8, bytes.length);
  const ext = format === undefined ? undefined : exts.find((e) => e.type === EXT_BACKING_FORMAT);
  if (format === undefined || !ext) {
    // switch to the new name (its format probed for a moment), then add the format
    apply({ offset: 8, bytes: field });
    if (format === undefined) return steps;
    const plan = planExtensionInsert(cur, EXT_BACKING_FORMAT, enc.encode(format));
    if (!plan) return undefined;
    if (plan.moveName) {
      apply({ offset: plan.moveName.to, bytes: plan.moveName.bytes });
      apply({ offset: 8, bytes: plan.moveName.field });
    }
    apply(plan.body);
    apply(plan.marker);
    return steps;
  }
  const data = enc.encode(format);
  // raw and qcow2 both pad to 8 bytes: the extension is rewritten in place, nothing after it moves
  if (Math.ceil(ext.length / 8) !== Math.ceil(data.length / 8)) return undefined;
  const e = new Uint8Array(8 + Math.ceil(data.length / 8) * 8);
  putU32(e, 0, EXT_BACKING_FORMAT);
  putU32(e, 4, data.length);
  e.set(data, 8);
  const next = cur.slice();
  next.set(field, 8);
  next.set(e, ext.at);
  if (ext.at + e.length <= 512) {
    // name and format in one write inside sector 0, which a power cut cannot tear
    apply({ offset: 8, bytes: next.slice(8, ext.at + e.length) });
  } else {
    // the extension lies past sector 0: two writes (no image qledger or QEMU makes has it there)
    apply({ offset: 8, bytes: field });
    apply({ offset: ext.at, bytes: e });
  }
  return steps;
}
