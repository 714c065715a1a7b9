/**
 * The descriptors of an NBD BLOCK_STATUS reply, one list per metadata
 * context an export serves: base:allocation (holes and zeros from the
 * image's map), qemu:allocation-depth (which image of the chain allocates)
 * and qemu:dirty-bitmap:NAME (dirty and clean runs of an exported bitmap).
 * A list is (length, flags) pairs, neighbours with the same flags merged,
 * at most MAX_EXTENTS of them; with compact headers no length passes
 * 32 bits, with extended headers (64-bit descriptors) any length goes.
 */

import { ALLOCATION_DEPTH, BASE_ALLOCATION, DIRTY_BITMAP_PREFIX, STATE_DIRTY, STATE_HOLE, STATE_ZERO, type Request } from './nbd-protocol.ts';
import type { NbdBackend } from './nbd-session.ts';

/** Extents one BLOCK_STATUS reply describes at most. */
const MAX_EXTENTS = 65536;

/** The contexts an export serves, in qemu-nbd's order; a context's id is its index + 1. */
export function contextNames(b: NbdBackend): string[] {
  return [BASE_ALLOCATION, ...(b.depth ? [ALLOCATION_DEPTH] : []), ...(b.bitmaps ?? []).map((x) => DIRTY_BITMAP_PREFIX + x)];
}

/** Context `name`'s descriptors for `req` (only the first with REQ_ONE); `wide`: extended headers' 64-bit lengths. */
export function extentsOf(b: NbdBackend, name: string, req: Request, one: boolean, wide: boolean): Promise<number[]> {
  // compact: a descriptor holds 32 bits, and one lookup adds at most 2^31 to it (as before extended headers)
  const lim = wide ? { step: Number.MAX_SAFE_INTEGER, max: Number.MAX_SAFE_INTEGER } : { step: 0x8000_0000, max: 0xffff_ffff };
  if (name === BASE_ALLOCATION) return allocationExtents(b, req, one, lim.max);
  if (name === ALLOCATION_DEPTH) return depthExtents(b, req, one, lim);
  return dirtyExtents(b, req, one, name.slice(DIRTY_BITMAP_PREFIX.length), lim);
}

/** qemu:allocation-depth's descriptors: 0 where no image of the chain allocates, else 1 + the depth of the one that does. */
async function depthExtents(b: NbdBackend, req: Request, one: boolean, lim: { step: number; max: number }): Promise<number[]> {
  const end = req.offset + req.length;
  const desc: number[] = [];
  for (let at = req.offset; at < end && desc.length / 2 < MAX_EXTENTS; ) {
    const st = await b.depth!(at, end - at);
    const n = Math.max(1, Math.min(st.length, end - at, lim.step));
    if (desc.length && desc[desc.length - 1] === st.depth && desc[desc.length - 2]! + n <= lim.max) desc[desc.length - 2]! += n;
    else desc.push(n, st.depth);
    at += n;
    if (one) break;
  }
  return desc;
}

/** qemu:dirty-bitmap:NAME's descriptors for a request: dirty and clean runs, up to the request's end. */
async function dirtyExtents(b: NbdBackend, req: Request, one: boolean, name: string, lim: { step: number; max: number }): Promise<number[]> {
  const end = req.offset + req.length;
  const desc: number[] = [];
  const push = (n: number, flags: number) => {
    if (n <= 0) return;
    for (let left = n; left > 0; ) {
      const m = Math.min(left, lim.step);
      if (desc.length && desc[desc.length - 1] === flags && desc[desc.length - 2]! + m <= lim.max) desc[desc.length - 2]! += m;
      else desc.push(m, flags);
      left -= m;
    }
  };
  let at = req.offset;
  for (const [s, e] of await b.dirty!(name, req.offset, req.length)) {
    const a = Math.max(s, req.offset);
    const z = Math.min(e, end);
    if (z <= at) continue;
    push(a - at, 0);
    push(z - Math.max(a, at), STATE_DIRTY);
    at = z;
    if (desc.length / 2 >= MAX_EXTENTS) break;
  }
  if (desc.length / 2 < MAX_EXTENTS) push(end - at, 0);
  return one ? desc.slice(0, 2) : desc;
}

/** base:allocation's descriptors for a request. */
async function allocationExtents(b: NbdBackend, req: Request, one: boolean, max: number): Promise<number[]> {
  const end = req.offset + req.length;
  const desc: number[] = [];
  for (let at = req.offset; at < end && desc.length / 2 < MAX_EXTENTS; ) {
    const st = await b.status(at, end - at);
    const n = Math.max(1, Math.min(st.length, end - at));
    const flags = (st.hole ? STATE_HOLE : 0) | (st.zero ? STATE_ZERO : 0);
    // neighbours with the same flags are one extent
    if (desc.length && desc[desc.length - 1] === flags && desc[desc.length - 2]! + n <= max) desc[desc.length - 2]! += n;
    else desc.push(n, flags);
    at += n;
    if (one) break;
  }
  return desc;
}
