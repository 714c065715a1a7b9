/**
 * The on-disk journal: the header extension that locates it, the area
 * header, and the CRC-framed frames that carry records. Pure codecs over
 * bytes, no I/O; journal-format.md is the normative description and
 * test/journal-log.test.ts fails when it and these constants disagree.
 *
 * One write-back of the write engine is one journal transaction: its
 * records are framed, written from the start of the frame area and flushed
 * before any of the in-place writes they describe. A torn or half-written
 * tail shows as a frame whose magic, generation, sequence number, length or
 * CRC is wrong; the scan stops there and a transaction without its last
 * frame is dropped (hypercore's rule for its log).
 */

import { createRequire } from 'node:module';

// node:zlib's crc32, loaded at the first frame (a read-only open never needs it)
let crcFn: ((b: Uint8Array) => number) | undefined;
export const crc32 = (b: Uint8Array): number => (crcFn ??= (createRequire(import.meta.url)('node:zlib') as typeof import('node:zlib')).crc32)(b);
import { FormatError, hex } from '../errors.ts';
import { u32, u64big, u64Safe, putU32, putU64, u16, putU16, isZero } from '../format/bytes.ts';
import { decodeRecord, encodeRecordInto, encodedLength } from './codec.ts';
import type { JournalRecord } from './records.ts';

// ---- header extension ------------------------------------------------------

/** Length of the journal header extension's data. */
export const EXT_JOURNAL_LENGTH = 16;

export interface JournalExtension {
  /** host offset of the journal area (cluster aligned) */
  readonly offset: number;
  /** bytes in the area (a multiple of the cluster size) */
  readonly size: number;
}

export function encodeJournalExtension(e: JournalExtension): Uint8Array {
  const b = new Uint8Array(EXT_JOURNAL_LENGTH);
  putU64(b, 0, e.offset);
  putU64(b, 8, e.size);
  return b;
}

export function decodeJournalExtension(data: Uint8Array, at: number): JournalExtension {
  if (data.length !== EXT_JOURNAL_LENGTH) throw new FormatError('journal header extension', 'length', at + 4, `${data.length} bytes, expected ${EXT_JOURNAL_LENGTH}`);
  const field = (o: number, name: string): number => {
    const v = u64Safe(data, o);
    if (v === undefined) throw new FormatError('journal header extension', name, at + 8 + o, `${hex(u64big(data, o))} is above 2^53`);
    return v;
  };
  return { offset: field(0, 'area offset'), size: field(8, 'area size') };
}

// ---- area header -------------------------------------------------------------

/** "QLJOURNL" */
export const AREA_MAGIC = 0x514c4a4f_554e524cn;
export const AREA_VERSION = 1;
/** The area header takes the first sector of the area; frames start after it. */
export const AREA_HEADER_SIZE = 512;
/** Frames start at sector boundaries, so a torn frame never shares a sector with an earlier one. */
export const FRAME_ALIGN = 512;

export interface AreaHeader {
  /** random, chosen when the area is (re)initialised; every frame repeats it */
  readonly generation: bigint;
  /** bytes in the area, the header included (equals the extension's size) */
  readonly size: number;
  /** checkpoint: every transaction numbered up to this one is entirely in place */
  readonly appliedTx: number;
}

export function encodeAreaHeader(h: AreaHeader): Uint8Array {
  const b = new Uint8Array(AREA_HEADER_SIZE);
  putU64(b, 0, AREA_MAGIC);
  putU32(b, 8, AREA_VERSION);
  putU32(b, 12, AREA_HEADER_SIZE);
  putU64(b, 16, h.generation);
  putU64(b, 24, h.size);
  putU64(b, 32, h.appliedTx);
  putU32(b, 44, crc32(b));
  return b;
}

export function decodeAreaHeader(b: Uint8Array, at: number): AreaHeader {
  const S = 'journal area header';
  if (b.length < AREA_HEADER_SIZE) throw new FormatError(S, 'magic', at, 'area is shorter than its header');
  const magic = (BigInt(u32(b, 0)) << 32n) | BigInt(u32(b, 4));
  if (magic !== AREA_MAGIC) throw new FormatError(S, 'magic', at, `0x${magic.toString(16)} is not the journal magic`);
  if (u32(b, 8) !== AREA_VERSION) throw new FormatError(S, 'version', at + 8, `unsupported journal version ${u32(b, 8)}`);
  if (u32(b, 12) !== AREA_HEADER_SIZE) throw new FormatError(S, 'header_length', at + 12, `${u32(b, 12)}, expected ${AREA_HEADER_SIZE}`);
  const copy = b.slice(0, AREA_HEADER_SIZE);
  putU32(copy, 44, 0);
  if (crc32(copy) !== u32(b, 44)) throw new FormatError(S, 'crc32', at + 44, 'checksum mismatch');
  // qledger writes sizes and transaction numbers far below 2^53: a larger one is refused exactly, never rounded
  const exact = (o: number, field: string): number => {
    const v = u64Safe(b, o);
    if (v === undefined) throw new FormatError(S, field, at + o, `${hex(u64big(b, o))} is above 2^53`);
    return v;
  };
  return { generation: (BigInt(u32(b, 16)) << 32n) | BigInt(u32(b, 20)), size: exact(24, 'size'), appliedTx: exact(32, 'applied_tx') };
}

// ---- frames --------------------------------------------------------------------

/** "QLJF" */
export const FRAME_MAGIC = 0x514c4a46;
export const FRAME_HEADER_SIZE = 40;
/** flags: this frame opens a transaction */
export const FRAME_FIRST = 1;
/** flags: this frame closes (commits) a transaction */
export const FRAME_LAST = 2;
/** Records are packed into frames of about this many payload bytes (a bigger record gets a frame of its own). */
export const FRAME_TARGET_PAYLOAD = 64 * 1024;

export interface Frame {
  readonly seq: number;
  readonly tx: number;
  readonly flags: number;
  /** where the frame starts, relative to the area */
  readonly at: number;
  readonly payload: Uint8Array;
}

/**
 * Encode one transaction as frames starting with sequence number `seq`.
 * Returns the bytes to write at the frame area's start (a multiple of
 * FRAME_ALIGN) and the next free sequence number.
 */
export function encodeTransaction(records: readonly JournalRecord[], o: { generation: bigint; tx: number; seq: number }): { bytes: Uint8Array; frames: number; nextSeq: number } {
  // group records into payloads
  const groups: Array<{ from: number; to: number; bytes: number }> = [];
  let from = 0;
  let bytes = 0;
  for (let i = 0; i < records.length; i++) {
    const n = encodedLength(records[i]!);
    if (bytes > 0 && bytes + n > FRAME_TARGET_PAYLOAD) {
      groups.push({ from, to: i, bytes });
      from = i;
      bytes = 0;
    }
    bytes += n;
  }
  groups.push({ from, to: records.length, bytes });
  let total = 0;
  for (const g of groups) total += align(FRAME_HEADER_SIZE + g.bytes);
  const out = new Uint8Array(total);
  let off = 0;
  let seq = o.seq;
  groups.forEach((g, k) => {
    const start = off;
    putU32(out, start, FRAME_MAGIC);
    putU32(out, start + 4, g.bytes);
    putU64(out, start + 8, o.generation);
    putU64(out, start + 16, seq);
    putU64(out, start + 24, o.tx);
    putU16(out, start + 32, (k === 0 ? FRAME_FIRST : 0) | (k === groups.length - 1 ? FRAME_LAST : 0));
    let p = start + FRAME_HEADER_SIZE;
    for (let i = g.from; i < g.to; i++) p += encodeRecordInto(records[i]!, out, p);
    putU32(out, start + 36, crc32(out.subarray(start, start + FRAME_HEADER_SIZE + g.bytes)));
    off = start + align(FRAME_HEADER_SIZE + g.bytes);
    seq++;
  });
  return { bytes: out, frames: groups.length, nextSeq: seq };
}

function align(n: number): number {
  return Math.ceil(n / FRAME_ALIGN) * FRAME_ALIGN;
}

/** Why a scan stopped: the first frame position that is not a valid continuation. */
export interface ScanEnd {
  readonly at: number;
  readonly reason: string;
}

export interface JournalTransaction {
  readonly tx: number;
  readonly firstSeq: number;
  readonly frames: number;
  /** all of its frames are present (the last one carries FRAME_LAST) */
  readonly committed: boolean;
  readonly records: JournalRecord[];
}

export interface ScanResult {
  readonly transactions: JournalTransaction[];
  readonly end: ScanEnd;
}

/**
 * Read frames from the start of the frame area while each one is a valid
 * continuation of the previous: magic, generation, payload length inside
 * the area, CRC, sequence number one more than the previous frame's, and
 * transaction numbers that open with FRAME_FIRST and close with FRAME_LAST.
 * `area` is the whole area (header included).
 */
export function scanFrames(area: Uint8Array, generation: bigint): ScanResult {
  const txs: JournalTransaction[] = [];
  let off = AREA_HEADER_SIZE;
  let prevSeq = -1;
  let open: { tx: number; firstSeq: number; frames: number; records: JournalRecord[] } | undefined;
  const stop = (reason: string): ScanResult => {
    if (open) txs.push({ ...open, committed: false });
    return { transactions: txs, end: { at: off, reason } };
  };
  for (;;) {
    if (off + FRAME_HEADER_SIZE > area.length) return stop('end of the area');
    if (u32(area, off) !== FRAME_MAGIC) return stop(u32(area, off) === 0 && isZero(area.subarray(off, off + FRAME_HEADER_SIZE)) ? 'no more frames' : 'bad frame magic');
    const len = u32(area, off + 4);
    if (len % 8 !== 0 || off + FRAME_HEADER_SIZE + len > area.length) return stop(`frame payload length ${len} does not fit the area`);
    const gen = (BigInt(u32(area, off + 8)) << 32n) | BigInt(u32(area, off + 12));
    if (gen !== generation) return stop('frame from another generation');
    const seq = u64Safe(area, off + 16);
    const tx = u64Safe(area, off + 24);
    // numbers qledger never writes, which a JS number would round into equal ones
    if (seq === undefined || tx === undefined) return stop(`frame sequence ${hex(u64big(area, off + 16))} or transaction ${hex(u64big(area, off + 24))} is above 2^53`);
    const flags = u16(area, off + 32);
    const frame = area.slice(off, off + FRAME_HEADER_SIZE + len);
    putU32(frame, 36, 0);
    if (crc32(frame) !== u32(area, off + 36)) return stop('frame checksum mismatch');
    if (prevSeq >= 0 && seq !== prevSeq + 1) return stop(`sequence number ${seq} does not follow ${prevSeq}`);
    if (open && (flags & FRAME_FIRST || tx !== open.tx)) return stop(`frame of transaction ${tx} inside transaction ${open.tx}`);
    if (!open && !(flags & FRAME_FIRST)) return stop(`frame of transaction ${tx} does not open it`);
    const records: JournalRecord[] = [];
    try {
      for (let p = FRAME_HEADER_SIZE; p < FRAME_HEADER_SIZE + len; ) {
        const { record, length } = decodeRecord(frame, p);
        records.push(record);
        p += length;
      }
    } catch (e) {
      // a frame with a valid CRC but records this version cannot read: not ours to trust
      return stop(`frame records do not decode: ${(e as Error).message}`);
    }
    if (!open) open = { tx, firstSeq: seq, frames: 0, records: [] };
    open.frames++;
    open.records.push(...records);
    if (flags & FRAME_LAST) {
      txs.push({ ...open, committed: true });
      open = undefined;
    }
    prevSeq = seq;
    off += align(FRAME_HEADER_SIZE + len);
  }
}
