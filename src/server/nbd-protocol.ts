/**
 * The NBD protocol's wire constants and encoders, as the protocol document
 * (NetworkBlockDevice/nbd, doc/proto.md) defines them: the fixed newstyle
 * handshake, option requests and replies, transmission requests, simple
 * and structured replies. Pure code over bytes; all integers big-endian.
 */

/** "NBDMAGIC", then "IHAVEOPT": the server's first 16 bytes, and every option request's magic. */
export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
/** magic of every option reply */
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
/** EXTENDED_HEADERS: 32-byte requests and reply chunks with 64-bit lengths */
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const EXTENDED_REPLY_MAGIC = 0x6e8a278c;

/** Handshake flags (server) and client flags. */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const ERR = 0x8000_0000;
export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: ERR + 1,
  ERR_POLICY: ERR + 2,
  ERR_INVALID: ERR + 3,
  ERR_PLATFORM: ERR + 4,
  ERR_TLS_REQD: ERR + 5,
  ERR_UNKNOWN: ERR + 6,
  ERR_SHUTDOWN: ERR + 7,
  ERR_BLOCK_SIZE_REQD: ERR + 8,
  ERR_TOO_BIG: ERR + 9,
  ERR_EXT_HEADER_REQD: ERR + 10,
} as const;

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

/** Transmission flags. */
export const TF = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7, RESIZE: 8 } as const;

/** Command flags. */
export const CF = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3, FAST_ZERO: 1 << 4, PAYLOAD_LEN: 1 << 5 } as const;

/** Structured reply flags and chunk types. */
export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_TYPE = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, BLOCK_STATUS_EXT: 6, ERROR: 0x8000 + 1, ERROR_OFFSET: 0x8000 + 2 } as const;

/** base:allocation's extent flags. */
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;

/** The errno values the protocol carries (Linux numbering, which the protocol fixes). */
export const ERRNO = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 } as const;

/** The metadata contexts qledger serves: allocation, and each exported dirty bitmap (qemu-nbd -B). */
export const BASE_ALLOCATION = 'base:allocation';
export const DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';
export const ALLOCATION_DEPTH = 'qemu:allocation-depth';
/** qemu:dirty-bitmap's extent flag. */
export const STATE_DIRTY = 1 << 0;

/** The longest option payload a client may send (the protocol's string limit is 4096; names, queries and info requests fit). */
export const MAX_OPTION_BYTES = 64 * 1024;

/** One option reply. */
export function optionReply(option: number, type: number, data: Uint8Array = new Uint8Array(0)): Buffer {
  const b = Buffer.alloc(20 + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  b.set(data, 20);
  return b;
}

/** An error option reply with a message for humans. */
export function optionError(option: number, type: number, message: string): Buffer {
  return optionReply(option, type, Buffer.from(message.slice(0, 4096), 'utf8'));
}

/** NBD_INFO_EXPORT: size and transmission flags. */
export function infoExport(size: number, flags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(INFO.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

/** NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum. */
export function infoBlockSize(min: number, preferred: number, max: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(INFO.BLOCK_SIZE, 0);
  b.writeUInt32BE(min, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(max, 10);
  return b;
}

/** NBD_INFO_NAME or NBD_INFO_DESCRIPTION. */
export function infoString(type: number, s: string): Buffer {
  const text = Buffer.from(s, 'utf8');
  const b = Buffer.alloc(2 + text.length);
  b.writeUInt16BE(type, 0);
  b.set(text, 2);
  return b;
}

/** A simple reply header (a read's data follows it). */
export function simpleReply(error: number, cookie: bigint): Buffer {
  const b = Buffer.alloc(16);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

/** A request as read off the wire (compact: 28 bytes; extended: 32, with a 64-bit length). */
export interface Request {
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  /** past 2^53 (past any export's end) it stays a number that says so; `exactOffset` keeps the value */
  readonly offset: number;
  readonly exactOffset: bigint;
  /** past 2^53 likewise (an extended request's effect length) */
  readonly length: number;
}

const SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const toNumber = (v: bigint): number => (v > SAFE ? Number.MAX_SAFE_INTEGER : Number(v));

/** The compact request header (28 bytes), or undefined without its magic. */
export function decodeRequest(b: Buffer): Request | undefined {
  if (b.readUInt32BE(0) !== REQUEST_MAGIC) return undefined;
  const off = b.readBigUInt64BE(16);
  return { flags: b.readUInt16BE(4), type: b.readUInt16BE(6), cookie: b.readBigUInt64BE(8), offset: toNumber(off), exactOffset: off, length: b.readUInt32BE(24) };
}

/** The extended request header (32 bytes: the length is 64 bits), or undefined without its magic. */
export function decodeExtendedRequest(b: Buffer): Request | undefined {
  if (b.readUInt32BE(0) !== EXTENDED_REQUEST_MAGIC) return undefined;
  const off = b.readBigUInt64BE(16);
  return { flags: b.readUInt16BE(4), type: b.readUInt16BE(6), cookie: b.readBigUInt64BE(8), offset: toNumber(off), exactOffset: off, length: toNumber(b.readBigUInt64BE(24)) };
}
