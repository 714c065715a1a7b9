/**
 * Binary codec for records. Every record starts with a one-byte type and is
 * a multiple of 8 bytes long; integers are big-endian. The layouts are the
 * normative ones of journal-format.md, section "Record encoding", and
 * test/journal.test.ts checks that the document and these constants agree.
 */

import { FormatError } from '../errors.ts';
import { u32, u64Safe, putU32, putU64 } from '../format/bytes.ts';
import type { HeaderField, ImageRole, JournalRecord, L2Word, TableRole, Word64 } from './records.ts';

export const RECORD_TYPE = {
  refcount: 1,
  l2: 2,
  l1: 3,
  'l1-swap': 4,
  reftable: 5,
  'reftable-swap': 6,
  'table-new': 7,
  header: 8,
  image: 9,
  data: 16,
  barrier: 17,
  begin: 18,
  commit: 19,
  unjournalled: 20,
  'data-crc': 21,
  'data-fresh': 22,
  refcounts: 10,
  l2s: 11,
} as const;

/** Encoded length of each fixed-size record type, in bytes. */
export const RECORD_LENGTH: Record<Exclude<JournalRecord['kind'], 'begin' | 'image' | 'refcounts' | 'l2s'>, number> = {
  refcount: 32,
  l2: 56,
  l1: 24,
  'l1-swap': 32,
  reftable: 24,
  'reftable-swap': 32,
  'table-new': 24,
  header: 24,
  data: 24,
  barrier: 8,
  commit: 16,
  unjournalled: 16,
  'data-crc': 24,
  'data-fresh': 24,
};

export const HEADER_FIELD_ID: Record<HeaderField, number> = {
  size: 1,
  incompatible_features: 2,
  compatible_features: 3,
  autoclear_features: 4,
  nb_snapshots: 5,
  snapshots_offset: 6,
  nb_bitmaps: 7,
  bitmap_directory_size: 8,
  bitmap_directory_offset: 9,
};

const utf8 = new TextEncoder();
const utf8d = new TextDecoder();

const ROLE_ID: Record<TableRole, number> = { l2: 0, refblock: 1 };
export const IMAGE_ROLE_ID: Record<ImageRole, number> = { l1: 0, reftable: 1, l2: 2 };

function putWord(b: Uint8Array, off: number, x: Word64): void {
  putU32(b, off, x.hi);
  putU32(b, off + 4, x.lo);
}

function putL2(b: Uint8Array, off: number, x: L2Word): void {
  putU32(b, off, x.hi);
  putU32(b, off + 4, x.lo);
  putU32(b, off + 8, x.bitmapHi);
  putU32(b, off + 12, x.bitmapLo);
}

export function encodedLength(r: JournalRecord): number {
  // every guest operation's begin marker comes through here: measure, do not encode
  if (r.kind === 'begin') return 16 + Math.ceil(Buffer.byteLength(r.op, 'utf8') / 8) * 8;
  if (r.kind === 'image') return 16 + Math.ceil(r.bytes.length / 8) * 8;
  if (r.kind === 'refcounts') return 16 + r.index.length * 24;
  if (r.kind === 'l2s') return 24 + r.index.length * 40;
  return RECORD_LENGTH[r.kind];
}

/** Encode `r` into `b` at `off`; returns the number of bytes written. */
export function encodeRecordInto(r: JournalRecord, b: Uint8Array, off: number): number {
  const n = encodedLength(r);
  b.fill(0, off, off + n);
  b[off] = RECORD_TYPE[r.kind];
  switch (r.kind) {
    case 'refcount':
      putU64(b, off + 8, r.cluster);
      putU64(b, off + 16, r.old);
      putU64(b, off + 24, r.new);
      break;
    case 'l2':
      putU32(b, off + 4, r.index);
      putU32(b, off + 8, r.l1Index);
      putU64(b, off + 16, r.table);
      putL2(b, off + 24, r.old);
      putL2(b, off + 40, r.new);
      break;
    case 'l1':
      putU32(b, off + 4, r.index);
      putWord(b, off + 8, r.old);
      putWord(b, off + 16, r.new);
      break;
    case 'l1-swap':
      putU64(b, off + 8, r.oldOffset);
      putU64(b, off + 16, r.newOffset);
      putU32(b, off + 24, r.oldSize);
      putU32(b, off + 28, r.newSize);
      break;
    case 'reftable':
      putU32(b, off + 4, r.index);
      putU64(b, off + 8, r.old);
      putU64(b, off + 16, r.new);
      break;
    case 'reftable-swap':
      putU64(b, off + 8, r.oldOffset);
      putU64(b, off + 16, r.newOffset);
      putU32(b, off + 24, r.oldClusters);
      putU32(b, off + 28, r.newClusters);
      break;
    case 'table-new':
      b[off + 1] = ROLE_ID[r.role];
      putU32(b, off + 4, r.slot);
      putU64(b, off + 8, r.offset);
      putU64(b, off + 16, r.copyOf);
      break;
    case 'header':
      b[off + 1] = HEADER_FIELD_ID[r.field];
      putU64(b, off + 8, r.old);
      putU64(b, off + 16, r.new);
      break;
    case 'data':
      putU64(b, off + 8, r.host);
      putU64(b, off + 16, r.length);
      break;
    case 'barrier':
      break;
    case 'begin': {
      const op = utf8.encode(r.op);
      putU32(b, off + 4, op.length);
      putU64(b, off + 8, r.tx);
      b.set(op, off + 16);
      break;
    }
    case 'commit':
      putU64(b, off + 8, r.tx);
      break;
    case 'image':
      b[off + 1] = IMAGE_ROLE_ID[r.role];
      putU32(b, off + 4, r.bytes.length);
      putU64(b, off + 8, r.offset);
      b.set(r.bytes, off + 16);
      break;
    case 'unjournalled':
      putU64(b, off + 8, r.records);
      break;
    case 'data-crc':
    case 'data-fresh':
      // the same layout; a data-fresh record's bytes 4-7 stay 0
      if (r.kind === 'data-crc') putU32(b, off + 4, r.crc);
      putU64(b, off + 8, r.host);
      putU64(b, off + 16, r.length);
      break;
    case 'refcounts': {
      putU32(b, off + 4, r.index.length);
      putU64(b, off + 8, r.rt);
      // a batch has up to a block's entries: one DataView, the arrays in locals
      const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
      const { index, old, new: next } = r;
      for (let k = 0, o = off + 16; k < index.length; k++, o += 24) {
        // an index is under 2^32; a refcount may be up to 2^64 - 1, stored as a number
        dv.setUint32(o + 4, index[k]!);
        putU64(b, o + 8, old[k]!);
        putU64(b, o + 16, next[k]!);
      }
      break;
    }
    case 'l2s': {
      putU32(b, off + 4, r.index.length);
      putU32(b, off + 8, r.l1Index);
      putU64(b, off + 16, r.table);
      const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
      const { index, old, new: next } = r;
      for (let k = 0, o = off + 24; k < index.length; k++, o += 40) {
        // the index's high word stays zero (the buffer was zeroed above)
        dv.setUint32(o + 4, index[k]!);
        for (let x = 0; x < 4; x++) {
          dv.setUint32(o + 8 + x * 4, old[k * 4 + x]!);
          dv.setUint32(o + 24 + x * 4, next[k * 4 + x]!);
        }
      }
      break;
    }
  }
  return n;
}

export function encodeRecord(r: JournalRecord): Uint8Array {
  const b = new Uint8Array(encodedLength(r));
  encodeRecordInto(r, b, 0);
  return b;
}

function bad(field: string, off: number, problem: string): never {
  throw new FormatError('journal record', field, off, problem);
}

/** type code -> kind, for decoding (a lookup per record, not a search) */
const KIND_BY_TYPE: Array<keyof typeof RECORD_TYPE | undefined> = (() => {
  const t: Array<keyof typeof RECORD_TYPE | undefined> = new Array(256).fill(undefined);
  for (const k of Object.keys(RECORD_TYPE) as Array<keyof typeof RECORD_TYPE>) t[RECORD_TYPE[k]] = k;
  return t;
})();

const word = (b: Uint8Array, o: number): Word64 => ({ hi: u32(b, o), lo: u32(b, o + 4) });
const l2word = (b: Uint8Array, o: number): L2Word => ({ hi: u32(b, o), lo: u32(b, o + 4), bitmapHi: u32(b, o + 8), bitmapLo: u32(b, o + 12) });
// qledger writes offsets, counts and transaction numbers below 2^53: a larger one (a frame whose
// checksum holds but that qledger did not write) would round, so it is refused, exactly
const u64r = (b: Uint8Array, o: number): number => {
  const v = u64Safe(b, o);
  if (v === undefined) bad('value', o, `0x${big(b, o).toString(16)} is above 2^53`);
  return v!;
};
const big = (b: Uint8Array, o: number): bigint => (BigInt(u32(b, o)) << 32n) | BigInt(u32(b, o + 4));

/** Decode the record at `off`; throws FormatError for an unknown type or a short buffer. */
export function decodeRecord(b: Uint8Array, off = 0): { record: JournalRecord; length: number } {
  if (off + 8 > b.length) bad('type', off, 'record is truncated');
  const type = b[off]!;
  const kind = KIND_BY_TYPE[type];
  if (!kind) bad('type', off, `unknown record type ${type}`);
  const length =
    kind === 'begin' || kind === 'image' ? 16 + Math.ceil(u32(b, off + 4) / 8) * 8 : kind === 'refcounts' ? 16 + u32(b, off + 4) * 24 : kind === 'l2s' ? 24 + u32(b, off + 4) * 40 : RECORD_LENGTH[kind];
  if (off + length > b.length) bad('length', off, `record of type ${kind} is truncated`);
  let record: JournalRecord;
  switch (kind) {
    case 'refcount':
      record = { kind, cluster: u64r(b, off + 8), old: u64r(b, off + 16), new: u64r(b, off + 24) };
      break;
    case 'l2':
      record = { kind, index: u32(b, off + 4), l1Index: u32(b, off + 8), table: u64r(b, off + 16), old: l2word(b, off + 24), new: l2word(b, off + 40) };
      break;
    case 'l1':
      record = { kind, index: u32(b, off + 4), old: word(b, off + 8), new: word(b, off + 16) };
      break;
    case 'l1-swap':
      record = { kind, oldOffset: u64r(b, off + 8), newOffset: u64r(b, off + 16), oldSize: u32(b, off + 24), newSize: u32(b, off + 28) };
      break;
    case 'reftable':
      record = { kind, index: u32(b, off + 4), old: u64r(b, off + 8), new: u64r(b, off + 16) };
      break;
    case 'reftable-swap':
      record = { kind, oldOffset: u64r(b, off + 8), newOffset: u64r(b, off + 16), oldClusters: u32(b, off + 24), newClusters: u32(b, off + 28) };
      break;
    case 'table-new': {
      const role = b[off + 1] === 0 ? 'l2' : b[off + 1] === 1 ? 'refblock' : bad('role', off + 1, `unknown table role ${b[off + 1]}`);
      record = { kind, role, slot: u32(b, off + 4), offset: u64r(b, off + 8), copyOf: u64r(b, off + 16) };
      break;
    }
    case 'header': {
      const field = (Object.keys(HEADER_FIELD_ID) as HeaderField[]).find((f) => HEADER_FIELD_ID[f] === b[off + 1]);
      if (!field) bad('field', off + 1, `unknown header field id ${b[off + 1]}`);
      record = { kind, field, old: big(b, off + 8), new: big(b, off + 16) };
      break;
    }
    case 'data':
      record = { kind, host: u64r(b, off + 8), length: u64r(b, off + 16) };
      break;
    case 'barrier':
      record = { kind };
      break;
    case 'begin':
      record = { kind, tx: u64r(b, off + 8), op: utf8d.decode(b.subarray(off + 16, off + 16 + u32(b, off + 4))) };
      break;
    case 'commit':
      record = { kind, tx: u64r(b, off + 8) };
      break;
    case 'image': {
      const role = (Object.keys(IMAGE_ROLE_ID) as ImageRole[]).find((k) => IMAGE_ROLE_ID[k] === b[off + 1]);
      if (!role) bad('role', off + 1, `unknown image role ${b[off + 1]}`);
      record = { kind, role, offset: u64r(b, off + 8), bytes: b.slice(off + 16, off + 16 + u32(b, off + 4)) };
      break;
    }
    case 'unjournalled':
      record = { kind, records: u64r(b, off + 8) };
      break;
    case 'data-crc':
      record = { kind, host: u64r(b, off + 8), length: u64r(b, off + 16), crc: u32(b, off + 4) };
      break;
    case 'data-fresh':
      record = { kind, host: u64r(b, off + 8), length: u64r(b, off + 16) };
      break;
    case 'refcounts': {
      const n = u32(b, off + 4);
      const index = new Uint32Array(n);
      const old = new Float64Array(n);
      const next = new Float64Array(n);
      for (let k = 0, o = off + 16; k < n; k++, o += 24) {
        index[k] = u64r(b, o);
        old[k] = u64r(b, o + 8);
        next[k] = u64r(b, o + 16);
      }
      record = { kind, rt: u64r(b, off + 8), index, old, new: next };
      break;
    }
    case 'l2s': {
      const n = u32(b, off + 4);
      const index = new Uint32Array(n);
      const old = new Uint32Array(n * 4);
      const next = new Uint32Array(n * 4);
      for (let k = 0, o = off + 24; k < n; k++, o += 40) {
        index[k] = u64r(b, o);
        for (let x = 0; x < 4; x++) {
          old[k * 4 + x] = u32(b, o + 8 + x * 4);
          next[k * 4 + x] = u32(b, o + 24 + x * 4);
        }
      }
      record = { kind, l1Index: u32(b, off + 8), table: u64r(b, off + 16), index, old, new: next };
      break;
    }
  }
  return { record, length };
}
