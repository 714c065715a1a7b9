/**
 * Big-endian helpers. qcow2 stores 64-bit fields, but every offset and size
 * qledger accepts fits in 2^53 (8 PiB), so 64-bit fields are read as two
 * 32-bit halves and combined into a number; callers that need all 64 bits
 * (feature masks, entries with flag bits) use the bigint or half readers.
 *
 * The rule the 64-bit audit (issue 20) holds the code to: a number from
 * u64 is exact below 2^53, and a masked table offset (bits 9 and up, a
 * multiple of 512) is exact below 2^62; above that it is rounded, but it
 * stays above 2^53, so a comparison with a file size or a limit still
 * refuses it. What rounding can get wrong is anything else: alignment
 * (2^60 + 1 rounds to an aligned 2^60), equality, and the value a message
 * prints. Those take the exact value (u64big) from the bytes: the header's
 * size and table offsets, a snapshot's L1 offset and its other 64-bit
 * fields (kept as read and written back so), the bitmaps extension and a
 * bitmap's table offset, compressed descriptors, L2 entries and 64-bit
 * refcounts in check. Values of qledger's own structures (the journal and
 * dedup-index extensions, the journal's area header, frame numbers and
 * every record's 64-bit fields) are refused above 2^53 with their exact
 * value (u64Safe).
 */

export const TWO_32 = 0x1_0000_0000;

export function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

export function u16(b: Uint8Array, off: number): number {
  return (b[off]! << 8) | b[off + 1]!;
}

export function u32(b: Uint8Array, off: number): number {
  return ((b[off]! << 24) >>> 0) + ((b[off + 1]! << 16) | (b[off + 2]! << 8) | b[off + 3]!);
}

/** A 64-bit field as a number; values above 2^53 come back imprecise but still above 2^53. */
export function u64(b: Uint8Array, off: number): number {
  return u32(b, off) * TWO_32 + u32(b, off + 4);
}

export function u64big(b: Uint8Array, off: number): bigint {
  return (BigInt(u32(b, off)) << 32n) | BigInt(u32(b, off + 4));
}

/**
 * A plain Uint8Array of `n` bytes that is not zero-filled, for a caller
 * that overwrites every byte before anyone reads it (reads of guest data).
 */
export function uninitialized(n: number): Uint8Array {
  if (n >= ALIGNED_FROM) return new Uint8Array(Buffer.allocUnsafeSlow(n + ALIGN_SLACK).buffer, ALIGN_SKIP, n);
  return new Uint8Array(Buffer.allocUnsafeSlow(n).buffer, 0, n);
}

/**
 * A zero-filled Uint8Array of `n` bytes for large device reads (see
 * ALIGNED_FROM): fresh memory mapped by the allocator reads as zero without
 * being written.
 */
export function zeroedIoBuffer(n: number): Uint8Array {
  if (n >= ALIGNED_FROM) return new Uint8Array(new ArrayBuffer(n + ALIGN_SLACK), ALIGN_SKIP, n);
  return new Uint8Array(n);
}

/**
 * Buffers from this size up start where a page starts. glibc maps a large
 * allocation from the kernel and returns it 16 bytes past the page boundary
 * (its chunk header); the kernel's copy from the page cache into such a
 * buffer ran 20-30% slower here than into one at any other offset (a 2 MiB
 * pread loop over a 1 GiB file on tmpfs: about 950 against 720 ms), so the
 * view skips the rest of that first page. JavaScript cannot see addresses:
 * with another allocator the view merely starts somewhere else, which costs
 * nothing.
 */
const ALIGNED_FROM = 256 * 1024;
const ALIGN_SKIP = 4096 - 16;
const ALIGN_SLACK = 4096;

/**
 * A 64-bit offset or size that qledger itself wrote (its own extensions),
 * as an exact number: undefined when it is above 2^53, for the caller to
 * refuse with the exact value (u64big).
 */
export function u64Safe(b: Uint8Array, off: number): number | undefined {
  const v = u64(b, off);
  return v <= 2 ** 53 && (v < 2 ** 53 || u64big(b, off) === 2n ** 53n) ? v : undefined;
}

export function putU16(b: Uint8Array, off: number, v: number): void {
  b[off] = (v >>> 8) & 0xff;
  b[off + 1] = v & 0xff;
}

export function putU32(b: Uint8Array, off: number, v: number): void {
  b[off] = (v >>> 24) & 0xff;
  b[off + 1] = (v >>> 16) & 0xff;
  b[off + 2] = (v >>> 8) & 0xff;
  b[off + 3] = v & 0xff;
}

export function putU64(b: Uint8Array, off: number, v: number | bigint): void {
  // a non-negative safe integer (every offset, index and count) without a BigInt: the journal's encoder writes millions
  if (typeof v === 'number' && v >= 0 && v <= Number.MAX_SAFE_INTEGER && Number.isInteger(v)) {
    putU32(b, off, Math.floor(v / 4294967296));
    putU32(b, off + 4, v >>> 0);
    return;
  }
  const big = BigInt(v);
  putU32(b, off, Number((big >> 32n) & 0xffff_ffffn));
  putU32(b, off + 4, Number(big & 0xffff_ffffn));
}

const ZERO_4K = new Uint8Array(4096);

/** All bytes zero? Compared 4 KiB at a time against zeros (a native memcmp), stopping at the first difference. */
/**
 * The indices of the 8-byte entries of `table` (an L1 table, a refcount
 * table) that are not zero, in order. Zero 512-byte stretches are skipped
 * by one comparison each: the tables a crash harness or a check opens
 * thousands of times are mostly empty.
 */
export function nonZeroEntries(table: Uint8Array): number[] {
  const out: number[] = [];
  const n = table.length >>> 3;
  const buf = Buffer.from(table.buffer, table.byteOffset, table.byteLength);
  for (let from = 0; from < n; from += 64) {
    const to = Math.min(n, from + 64);
    if (buf.compare(ZERO_4K, 0, (to - from) * 8, from * 8, to * 8) === 0) continue;
    for (let i = from; i < to; i++) {
      const o = i * 8;
      if (table[o]! | table[o + 1]! | table[o + 2]! | table[o + 3]! | table[o + 4]! | table[o + 5]! | table[o + 6]! | table[o + 7]!) out.push(i);
    }
  }
  return out;
}

export function isZero(b: Uint8Array): boolean {
  const buf = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  for (let i = 0; i < b.length; i += 4096) {
    const n = Math.min(4096, b.length - i);
    if (buf.compare(ZERO_4K, 0, n, i, i + n) !== 0) return false;
  }
  return true;
}

