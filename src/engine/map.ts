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
  for await (const batch of extentBatches(top, start, length, signal)) {
    for (const e of batch) {
      // between extents, as before batching: a caller that aborts gets no more
      signal?.throwIfAborted();
      yield e;
    }
  }
}

/**
 * The extents of mapExtents, in arrays (about one L2 table's span each):
 * the same entries, merged the same way, for a caller that would otherwise
 * pay a promise per extent. Runs of a qcow2 top layer that resolve at depth 0
 * (allocated, or with nothing below) are taken from one table lookup each
 * (Qcow2Layer.statusRuns); the rest walk the chain as chainStatus does.
 */
export async function* extentBatches(top: Layer, start = 0, length = top.size, signal?: AbortSignal): AsyncGenerator<MapEntry[]> {
  const end = start + length;
  let cur: MapEntry | undefined;
  let pos = start;
  // preallocated metadata asks the file about holes for every data run: the general path does that
  const batched = top instanceof Qcow2Layer && !(await top.isMetadataPreallocated()) ? top : undefined;
  const file = batched ? dataFileName(batched) : '';
  const below = top.backing;
  while (pos < end) {
    signal?.throwIfAborted();
    const out: MapEntry[] = [];
    const add = (next: MapEntry) => {
      pos += next.length;
      if (cur && mergeable(cur, next)) cur.length += next.length;
      else {
        if (cur) out.push(cur);
        cur = next;
      }
    };
    if (!batched) add(await chainStatus(top, pos, end - pos));
    else {
      for (const st of await batched.statusRuns(guest(pos), end - pos)) {
        const data = st.type === 'normal' || st.type === 'compressed';
        const zero = st.type === 'zero-plain' || st.type === 'zero-alloc';
        if (data || zero || !below || pos >= below.size) {
          const e: MapEntry = { start: pos, length: st.length, depth: 0, present: data || zero, zero: zero || (!data && !zero), data };
          if (st.hostOffset !== undefined) {
            e.offset = st.hostOffset;
            e.filename = file;
          }
          add(e);
          continue;
        }
        // unallocated over a backing file: resolved below, perhaps in shorter pieces
        for (const stop = pos + st.length; pos < stop; ) add(await chainStatus(top, pos, stop - pos));
      }
    }
    if (out.length) yield out;
  }
  if (cur) yield [cur];
}

/** One extent as a line of qemu-img map --output=json. */
function jsonLine(e: MapEntry): string {
  const s = `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}`;
  return e.offset !== undefined ? `${s}, "offset": ${e.offset}}` : s + '}';
}

/** qemu-img map --output=json, byte for byte. */
export function formatMapJson(entries: readonly MapEntry[]): string {
  return '[' + entries.map(jsonLine).join(',\n') + ']\n';
}

/**
 * qemu-img map --output=json as the extents come, written as ASCII bytes
 * into pieces of 64 KiB handed to `out`: a million extents are neither one
 * string of 100 MB nor a million strings to encode. The pieces joined
 * equal formatMapJson of the extents.
 */
export async function streamMapJson(batches: AsyncIterable<readonly MapEntry[]>, out: (bytes: Uint8Array) => void): Promise<void> {
  const w = new AsciiWriter(out);
  w.reserve(1);
  w.put(JSON_OPEN);
  let first = true;
  const JSON_TAIL = tails();
  for await (const batch of batches) {
    for (const e of batch) {
      w.reserve(ENTRY_MAX);
      // the previous entry's close shares a put with this one's opening
      w.put(first ? JSON_FIRST : JSON_CLOSE_NEXT);
      first = false;
      w.num(e.start);
      w.put(JSON_LENGTH);
      w.num(e.length);
      const flags = (e.present ? 4 : 0) | (e.zero ? 2 : 0) | (e.data ? 1 : 0);
      const hasOffset = e.offset !== undefined ? 1 : 0;
      if (e.depth < TAIL_DEPTHS) w.put(JSON_TAIL[(e.depth * 8 + flags) * 2 + hasOffset]!);
      else {
        w.put(JSON_DEPTH);
        w.num(e.depth);
        w.put(JSON_FLAGS[flags]!);
        if (hasOffset) w.put(JSON_OFFSET);
      }
      if (hasOffset) w.num(e.offset!);
    }
  }
  w.reserve(3);
  if (!first) w.put(JSON_CLOSE);
  w.put(JSON_END);
  w.flush();
}

const ascii = (s: string) => Uint8Array.from(s, (c) => c.charCodeAt(0));
const JSON_OPEN = ascii('[');
const JSON_FIRST = ascii('{ "start": ');
const JSON_LENGTH = ascii(', "length": ');
const JSON_DEPTH = ascii(', "depth": ');
/** the three flags together, indexed by present << 2 | zero << 1 | data */
const JSON_FLAGS = Array.from({ length: 8 }, (_, k) => ascii(`, "present": ${(k & 4) !== 0}, "zero": ${(k & 2) !== 0}, "data": ${(k & 1) !== 0}`));
const JSON_OFFSET = ascii(', "offset": ');
const JSON_CLOSE = ascii('}');
const JSON_CLOSE_NEXT = ascii('},\n{ "start": ');
/** depths below this have their depth, flags and offset key in one piece */
const TAIL_DEPTHS = 16;
/** `, "depth": D, "present": …, "zero": …, "data": …` and, at odd indices, `, "offset": ` after it; by (depth * 8 + flags) * 2 + has offset */
let jsonTail: Uint8Array[] | undefined;
/** built at the first map, not at every command's start-up */
function tails(): Uint8Array[] {
  jsonTail ??= Array.from({ length: TAIL_DEPTHS * 16 }, (_, i) => {
    const k = i >> 1;
    const depth = k >> 3;
    const f = k & 7;
    return ascii(`, "depth": ${depth}, "present": ${(f & 4) !== 0}, "zero": ${(f & 2) !== 0}, "data": ${(f & 1) !== 0}${i & 1 ? ', "offset": ' : ''}`);
  });
  return jsonTail;
}
const JSON_END = ascii(']\n');
/** the longest entry: its constant parts and four numbers of at most 16 digits */
const ENTRY_MAX = 160;
/** "00" to "99" */
const PAIRS = ascii(Array.from({ length: 100 }, (_, i) => String(i).padStart(2, '0')).join(''));

/** ASCII bytes and non-negative integers into a 64 KiB buffer, handed on when full (room is reserved before writing). */
class AsciiWriter {
  private buf = new Uint8Array(65536);
  private at = 0;
  private readonly digits = new Uint8Array(24);

  constructor(private readonly out: (bytes: Uint8Array) => void) {}

  /** make room for `n` bytes of put and num */
  reserve(n: number): void {
    if (this.at + n > this.buf.length) this.flush();
  }

  put(b: Uint8Array): void {
    const n = b.length;
    // a long constant (an entry's tail) as one copy; short ones byte by byte (a call costs more)
    if (n > 24) this.buf.set(b, this.at);
    else {
      const buf = this.buf;
      const at = this.at;
      for (let i = 0; i < n; i++) buf[at + i] = b[i]!;
    }
    this.at += n;
  }

  num(n: number): void {
    // two digits per division, from the right
    const d = this.digits;
    let k = d.length;
    while (n >= 100) {
      const q = Math.floor(n / 100);
      const r = (n - q * 100) * 2;
      d[--k] = PAIRS[r + 1]!;
      d[--k] = PAIRS[r]!;
      n = q;
    }
    if (n >= 10) {
      d[--k] = PAIRS[n * 2 + 1]!;
      d[--k] = PAIRS[n * 2]!;
    } else d[--k] = 48 + n;
    const buf = this.buf;
    let at = this.at;
    while (k < d.length) buf[at++] = d[k++]!;
    this.at = at;
  }

  flush(): void {
    if (this.at === 0) return;
    this.out(this.buf.subarray(0, this.at));
    // the receiver may keep the bytes (a stream's queue): the next piece goes into a new buffer
    this.buf = new Uint8Array(65536);
    this.at = 0;
  }
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
