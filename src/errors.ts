/**
 * Error classes shared by every layer. Modelled on isomorphic-git: each error
 * carries a stable machine-readable `code` and a `data` payload, and its
 * message is one line a user can act on. The CLI prints the message only;
 * anything that is not a QledgerError is a bug and keeps its stack.
 */

export type ErrorCode =
  | 'E_FORMAT' // a field of an on-disk structure is invalid
  | 'E_CORRUPT' // metadata is inconsistent (a reference that cannot be right)
  | 'E_UNSUPPORTED' // valid qcow2 that qledger refuses to handle (encryption, ...)
  | 'E_USAGE' // bad command line or API arguments
  | 'E_NOT_FOUND' // a file, snapshot or backing file is missing
  | 'E_RANGE' // a guest request outside the virtual disk
  | 'E_READ_ONLY' // a write to something opened read-only
  | 'E_CLOSED' // an image used after close()
  | 'E_LOCKED' // another user of the file holds permissions that conflict (QEMU's image locks)
  | 'E_IO' // the device failed or returned short data
  | 'E_RECORD' // a metadata record does not fit the state it is applied to
  | 'E_OVERFLOW'; // a refcount would exceed refcount_bits

/**
 * Every error qledger raises: `code` (E_FORMAT, E_RANGE, E_LOCKED, …) for
 * programs, `data` naming the field, offset or path, and a one-line
 * message.
 *
 * @example
 * import { Image, MemoryDevice, QledgerError } from 'qledger';
 *
 * const dev = new MemoryDevice('small.qcow2');
 * await Image.create(dev, { size: 1 << 20 });
 * const img = await Image.open(dev);
 * try {
 *   await img.read(-1, 512);
 * } catch (e) {
 *   if (!(e instanceof QledgerError)) throw e;
 *   console.log(e.code, e.message); // E_RANGE ...
 * }
 * await img.close();
 */
export class QledgerError extends Error {
  readonly code: ErrorCode;
  readonly data: Readonly<Record<string, unknown>>;
  constructor(code: ErrorCode, message: string, data: Record<string, unknown> = {}) {
    super(message);
    this.name = new.target.name;
    this.code = code;
    this.data = data;
  }
}

/** A field of an on-disk structure fails validation. */
export class FormatError extends QledgerError {
  constructor(
    readonly structure: string,
    readonly field: string,
    readonly offset: number,
    problem: string,
    data: Record<string, unknown> = {},
  ) {
    super('E_FORMAT', `${structure}: ${field} at offset ${hex(offset)}: ${problem}`, {
      structure,
      field,
      offset,
      ...data,
    });
  }
}

/** Metadata references something it cannot (unaligned, past the end, into metadata). */
export class CorruptionError extends QledgerError {
  constructor(message: string, data: Record<string, unknown> = {}) {
    super('E_CORRUPT', message, data);
  }
}

export class UnsupportedError extends QledgerError {
  constructor(message: string, data: Record<string, unknown> = {}) {
    super('E_UNSUPPORTED', message, data);
  }
}

export class UsageError extends QledgerError {
  constructor(message: string, data: Record<string, unknown> = {}) {
    super('E_USAGE', message, data);
  }
}

export class NotFoundError extends QledgerError {
  constructor(message: string, data: Record<string, unknown> = {}) {
    super('E_NOT_FOUND', message, data);
  }
}

export class RangeRequestError extends QledgerError {
  constructor(message: string, data: Record<string, unknown> = {}) {
    super('E_RANGE', message, data);
  }
}

export class IoError extends QledgerError {
  constructor(message: string, data: Record<string, unknown> = {}) {
    super('E_IO', message, data);
  }
}

/** strerror's words for the errors a device reports (what qemu-io prints after "write failed: "). */
const STRERROR: Readonly<Record<string, string>> = {
  ENOSPC: 'No space left on device',
  EDQUOT: 'Disk quota exceeded',
  EIO: 'Input/output error',
  EFBIG: 'File too large',
  EROFS: 'Read-only file system',
  EBADF: 'Bad file descriptor',
  EINVAL: 'Invalid argument',
  ENXIO: 'No such device or address',
  EPERM: 'Operation not permitted',
  EACCES: 'Permission denied',
};

/** strerror's words for a device error (deviceError's), or undefined for anything else. */
export function strerrorOf(e: unknown): string | undefined {
  if (!(e instanceof QledgerError) || e.code !== 'E_IO') return undefined;
  const code = e.data['code'];
  return typeof code === 'string' ? STRERROR[code] : undefined;
}

/**
 * A failed system call on a device as a one-line IoError: `what` failed,
 * in strerror's words, with the errno code in `data.code`.
 */
export function deviceError(name: string, what: string, e: unknown): IoError {
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  const words = code !== undefined ? (STRERROR[code] ?? (e as Error).message) : String((e as Error)?.message ?? e);
  return new IoError(`${name}: ${what} failed: ${words}`, { code });
}

/** Offsets in messages are hex, as in QEMU's. */
export function hex(n: number | bigint): string {
  return '0x' + n.toString(16);
}

/** Hex digits without the prefix, for the QEMU messages that print them so ("refcount=0 reference=1 (host offset 0x...)" has its own 0x). */
export function hexDigits(n: number | bigint): string {
  return n.toString(16);
}

/** A 64-bit word given as its two 32-bit halves, in hex digits, exactly (no rounding through a number above 2^53). */
export function hexWord(hi: number, lo: number): string {
  return ((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)).toString(16);
}
