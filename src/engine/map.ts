/**
 * `map`: the allocation status of every guest byte, with the meaning and the
 * merging rules of `qemu-img map` (QEMU 7.2): for each offset, walk down the
 * chain until a layer has data or zeroes; `depth` is how far down that was,
 * `present` whether some layer allocated it, `offset` where the bytes live
 * when that is a plain host range.
 */

import { Qcow2Layer } from './qcow2-layer.ts';
import { guest, type Layer } from './layer.ts';

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  /** the file holding the bytes, when `offset` is set */
  filename?: string;
}

/** Status of the run at `offset` (at most `bytes` long), resolved through the chain. */
export async function chainStatus(top: Layer, offset: number, bytes: number): Promise<MapEntry> {
  let layer: Layer = top;
  let depth = 0;
  let len = bytes;
  for (;;) {
    const st = await layer.status(guest(offset), len);
    len = st.length;
    let data = false;
    let zero = false;
    let hostOffset = st.hostOffset as number | undefined;
    let file: string | undefined = hostOffset !== undefined ? dataFileName(layer) : undefined;
    switch (st.type) {
      case 'normal':
      case 'compressed':
        data = true;
        break;
      case 'zero-plain':
      case 'zero-alloc':
        zero = true;
        break;
      case 'raw-data': {
        // QEMU's raw driver hands the question to the file: data or hole.
        const r = await layer.hostZeroRun!(st.hostOffset!, len);
        len = r.length;
        zero = r.zero;
        data = !r.zero;
        break;
      }
      default:
        break;
    }
    const allocated = data || zero;
    if (!allocated) {
      const b = layer.backing;
      if (!b || offset >= b.size) zero = true;
    }
    if (data && !zero && hostOffset !== undefined && layer instanceof Qcow2Layer && (await layer.isMetadataPreallocated())) {
      // QEMU recurses into the file for preallocated metadata: holes read as zero.
      const r = await layer.hostZeroRun(st.hostOffset!, len);
      len = Math.min(len, r.length);
      zero = r.zero;
    }
    if (allocated || zero || !layer.backing) {
      const e: MapEntry = { start: offset, length: len, depth, present: allocated, zero, data };
      if (hostOffset !== undefined) {
        e.offset = hostOffset;
        e.filename = file!;
      }
      return e;
    }
    layer = layer.backing;
    depth++;
    hostOffset = undefined;
    file = undefined;
  }
}

function dataFileName(layer: Layer): string {
  if (layer instanceof Qcow2Layer && layer.dataDev) return layer.dataDev.name;
  return layer.filename;
}

function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.length === 0) return false;
  if (a.zero !== b.zero || a.data !== b.data || a.depth !== b.depth || a.present !== b.present) return false;
  if ((a.offset === undefined) !== (b.offset === undefined) || a.filename !== b.filename) return false;
  if (a.offset !== undefined && a.offset + a.length !== b.offset) return false;
  return true;
}

/** Every extent of [start, start + length), merged as qemu-img map merges them. */
export async function* mapExtents(top: Layer, start = 0, length = top.size, signal?: AbortSignal): AsyncGenerator<MapEntry> {
  const end = start + length;
  let cur: MapEntry | undefined;
  let pos = start;
  while (pos < end) {
    signal?.throwIfAborted();
    const next = await chainStatus(top, pos, end - pos);
    pos += next.length;
    if (cur && mergeable(cur, next)) {
      cur.length += next.length;
      continue;
    }
    if (cur) yield cur;
    cur = next;
  }
  if (cur) yield cur;
}

/** qemu-img map --output=json, byte for byte. */
export function formatMapJson(entries: readonly MapEntry[]): string {
  const lines = entries.map((e) => {
    let s = `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}`;
    if (e.offset !== undefined) s += `, "offset": ${e.offset}`;
    return s + '}';
  });
  return '[' + lines.join(',\n') + ']\n';
}

/** C's printf("%#-16" PRIx64): 0 prints as "0", others with 0x. */
function cHex16(n: number): string {
  return (n === 0 ? '0' : '0x' + n.toString(16)).padEnd(16);
}

export function formatMapHuman(entries: readonly MapEntry[]): string {
  let out = 'Offset          Length          Mapped to       File\n';
  for (const e of entries) {
    if (e.data && e.offset === undefined) {
      throw new MapHumanError('File contains external, encrypted or compressed clusters.');
    }
    if (e.data && !e.zero) out += `${cHex16(e.start)}${cHex16(e.length)}${cHex16(e.offset!)}${e.filename}\n`;
  }
  return out;
}

export class MapHumanError extends Error {}
