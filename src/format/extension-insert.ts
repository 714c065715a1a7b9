/**
 * Adding a header extension to an existing image so that the header is
 * valid after every single write: pure planning over the header cluster's
 * bytes. Header extensions follow the header as `{u32 type, u32 length,
 * data padded to 8}` until a type-0 end marker; the new extension's body
 * goes beyond the current end marker first (inactive), and the 8 bytes that
 * turn the end marker into the extension's type and length go last, in one
 * sector. A backing file name in the way (it lies in cluster 0, after the
 * extensions) moves to free space in the header cluster first.
 */

import { putU32, putU64, u32, u64 } from './bytes.ts';

export interface ExtensionInsertPlan {
  /** first, when the backing file name is in the way: copy it to `to`, flush, then write `field` at offset 8 (the header's backing_file_offset), flush */
  readonly moveName?: { readonly to: number; readonly bytes: Uint8Array; readonly field: Uint8Array } | undefined;
  /** the extension's data and a new end marker, beyond the current end marker */
  readonly body: { readonly offset: number; readonly bytes: Uint8Array };
  /** last: the extension's type and length over the old end marker */
  readonly marker: { readonly offset: number; readonly bytes: Uint8Array };
}

/**
 * Plan the insertion of extension `type` with `data` into header cluster
 * `head` (the whole cluster); undefined when the cluster has no room.
 */
export function planExtensionInsert(head: Uint8Array, type: number, data: Uint8Array): ExtensionInsertPlan | undefined {
  const cs = head.length;
  const version = u32(head, 4);
  const headerLength = version === 2 ? 72 : u32(head, 100);
  let p = headerLength;
  while (p + 8 <= cs && u32(head, p) !== 0) p += 8 + Math.ceil(u32(head, p + 4) / 8) * 8;
  if (p + 8 > cs) return undefined;
  const padded = Math.ceil(data.length / 8) * 8;
  const need = p + 8 + padded + 8;
  const nameAt = u64(head, 8);
  const nameLen = u32(head, 16);
  let moveName: ExtensionInsertPlan['moveName'];
  if (nameAt > 0 && nameAt >= p && nameAt < need) {
    const to = Math.ceil(Math.max(need, nameAt + nameLen) / 512) * 512;
    if (to + nameLen > cs) return undefined;
    const field = new Uint8Array(8);
    putU64(field, 0, to);
    moveName = { to, bytes: head.slice(nameAt, nameAt + nameLen), field };
  } else if (need > cs) return undefined;
  const body = new Uint8Array(padded + 8);
  body.set(data);
  const marker = new Uint8Array(8);
  putU32(marker, 0, type);
  putU32(marker, 4, data.length);
  return { moveName, body: { offset: p + 8, bytes: body }, marker: { offset: p, bytes: marker } };
}

/** Where extension `type` is in header cluster `head`: the offset of its type field and its length; undefined when absent. */
export function findExtension(head: Uint8Array, type: number): { readonly offset: number; readonly length: number } | undefined {
  const version = u32(head, 4);
  let p = version === 2 ? 72 : u32(head, 100);
  while (p + 8 <= head.length && u32(head, p) !== 0) {
    const len = u32(head, p + 4);
    if (u32(head, p) === type) return { offset: p, length: len };
    p += 8 + Math.ceil(len / 8) * 8;
  }
  return undefined;
}

/** A header extension type no reader knows (QEMU keeps such extensions as they are): what a removed extension becomes when it cannot go. */
export const EXT_QLEDGER_VACANT = 0x716c7663; // "qlvc"

/**
 * Plan the removal of extension `type` (one its feature bit disowns): the
 * extensions after it and the end marker move down over it. The writes,
 * flushed one by one, each stay inside one sector and leave a valid list
 * after every one:
 *  - one write when the moved bytes stay inside one sector;
 *  - two when they straddle a sector boundary and are no longer than the
 *    extension itself: the part past the boundary first (it lands inside
 *    the old extension's body, which its header still covers), then the
 *    part before it;
 *  - otherwise the extension's type alone becomes EXT_QLEDGER_VACANT.
 * Undefined when the extension is absent.
 */
export function planExtensionRemove(head: Uint8Array, type: number): Array<{ readonly offset: number; readonly bytes: Uint8Array }> | undefined {
  const at = findExtension(head, type);
  if (!at) return undefined;
  let end = at.offset;
  while (end + 8 <= head.length && u32(head, end) !== 0) end += 8 + Math.ceil(u32(head, end + 4) / 8) * 8;
  end += 8; // the end marker
  if (end > head.length) return undefined;
  const skip = 8 + Math.ceil(at.length / 8) * 8;
  const moved = head.slice(at.offset + skip, end);
  const last = at.offset + moved.length - 1;
  const sector = (x: number) => Math.floor(x / 512);
  if (sector(at.offset) === sector(last)) return [{ offset: at.offset, bytes: moved }];
  if (sector(last) === sector(at.offset) + 1 && moved.length <= skip) {
    const boundary = (sector(at.offset) + 1) * 512;
    const cut = boundary - at.offset;
    return [
      { offset: boundary, bytes: moved.subarray(cut) },
      { offset: at.offset, bytes: moved.subarray(0, cut) },
    ];
  }
  const vacant = new Uint8Array(4);
  putU32(vacant, 0, EXT_QLEDGER_VACANT);
  return [{ offset: at.offset, bytes: vacant }];
}
