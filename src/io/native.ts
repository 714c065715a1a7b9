/**
 * The optional native helper (native/qledger-native.c, built by `npm install`
 * through node-gyp): SEEK_DATA/SEEK_HOLE, fallocate, OFD byte-range locks,
 * copy_file_range and sync_file_range, which Node's fs lacks, and zstd
 * compression from the system's libzstd, which Node 20's zlib lacks. Everything works without it; hole detection becomes
 * a content guess and image locks hold only within this process.
 */

import { createRequire } from 'node:module';

export interface NativeHelper {
  seekData(fd: number, offset: number): number;
  seekHole(fd: number, offset: number): number;
  fallocate(fd: number, mode: 0 | 1 | 2, offset: number, length: number): void;
  /** take (1) or release (0) a shared OFD byte-range lock; throws code EAGAIN on a conflict */
  ofdLock?(fd: number, start: number, length: number, take: 0 | 1): void;
  /** whether another open file description holds a lock on the range */
  ofdHeld?(fd: number, start: number, length: number): boolean;
  /** copy_file_range(2): the bytes copied (0 at the source's end), -1 where the kernel cannot copy between these files */
  copyRange?(fdIn: number, offIn: number, fdOut: number, offOut: number, length: number): number;
  /** sync_file_range(SYNC_FILE_RANGE_WRITE): the range's write-back started, not waited for; false where it cannot */
  writeBehind?(fd: number, offset: number, length: number): boolean;
  /** one zstd frame at `level` from the system's libzstd (dlopen at the first call); undefined where it is missing */
  zstdCompress?(data: Uint8Array, level: number): Uint8Array | undefined;
}

function load(): NativeHelper | undefined {
  if (process.env['QLEDGER_NO_NATIVE']) return undefined;
  try {
    const require = createRequire(import.meta.url);
    // from src/io/ or dist/io/ (two levels below the package root), or from the CLI bundle in dist/ (one level)
    for (const at of ['../../build/Release/qledger_native.node', '../build/Release/qledger_native.node']) {
      try {
        return ownCopy(require(at) as Record<string, unknown>);
      } catch {
        // try the next place
      }
    }
  } catch {
    // no helper: the fallbacks apply
  }
  return undefined;
}

/**
 * The helper's functions on a plain object: an addon's properties are
 * read-only, and a test wraps one to see how it is called.
 */
function ownCopy(m: Record<string, unknown>): NativeHelper {
  const out: Record<string, unknown> = {};
  for (const k of ['seekData', 'seekHole', 'fallocate', 'ofdLock', 'ofdHeld', 'copyRange', 'writeBehind', 'zstdCompress']) if (typeof m[k] === 'function') out[k] = m[k];
  if (typeof out['seekData'] !== 'function') throw new Error('not the helper');
  return out as unknown as NativeHelper;
}

export const native: NativeHelper | undefined = load();
