/**
 * Snapshot table: nb_snapshots entries starting at snapshots_offset, each
 * padded to a multiple of 8 bytes.
 *
 *   Byte  0 -  7: l1_table_offset    the snapshot's L1 table, cluster aligned
 *         8 - 11: l1_size            entries
 *        12 - 13: id_str_size
 *        14 - 15: name_size
 *        16 - 19: date_sec
 *        20 - 23: date_nsec
 *        24 - 31: vm_clock_nsec
 *        32 - 35: vm_state_size      (32-bit; see the extra data for 64-bit)
 *        36 - 39: extra_data_size
 *        40 -  …: extra data:        0-7 vm_state_size_large, 8-15 disk_size, 16-23 icount
 *            …  : id string, then name string (no NUL), then padding to 8
 */

import { FormatError, hex } from '../errors.ts';
import { u16, u32, u64, u64big, putU16, putU32, putU64 } from './bytes.ts';
import { MAX_L1_BYTES, MAX_SNAPSHOT_EXTRA_DATA } from './limits.ts';

export interface SnapshotEntry {
  readonly l1TableOffset: number;
  readonly l1Size: number;
  readonly id: string;
  readonly name: string;
  readonly dateSec: number;
  readonly dateNsec: number;
  readonly vmClockNsec: number;
  readonly vmStateSize: number;
  /** disk size at the time of the snapshot, if the extra data records it */
  readonly diskSize: number | undefined;
  /** instruction count, or undefined when absent (QEMU's -1) */
  readonly icount: number | undefined;
  /** extra data past the fields we know, kept verbatim */
  readonly extraUnknown: Uint8Array;
  /**
   * The 64-bit fields exactly as read (the numbers above round past 2^53):
   * what info prints and what a rewrite of the table writes back, so that a
   * table rewritten for another entry keeps every bit of this one.
   */
  readonly exact?: SnapshotExactFields | undefined;
}

/** A snapshot entry's 64-bit fields as stored. */
export interface SnapshotExactFields {
  readonly vmClockNsec: bigint;
  readonly vmStateSize: bigint;
  readonly diskSize: bigint | undefined;
  readonly icount: bigint | undefined;
}

/** A field's exact value: the stored one while the number still says the same, else the number. */
function exactOf(n: number | undefined, stored: bigint | undefined): bigint | undefined {
  if (n === undefined) return undefined;
  return stored !== undefined && Number(stored) === n ? stored : BigInt(n);
}

/** The exact 64-bit fields of an entry (those read, or its numbers' values for an entry made here). */
export function snapshotExact(s: SnapshotEntry): SnapshotExactFields {
  return {
    vmClockNsec: exactOf(s.vmClockNsec, s.exact?.vmClockNsec)!,
    vmStateSize: exactOf(s.vmStateSize, s.exact?.vmStateSize)!,
    diskSize: exactOf(s.diskSize, s.exact?.diskSize),
    icount: exactOf(s.icount, s.exact?.icount),
  };
}

const S = 'snapshot table';
const dec = new TextDecoder();
const enc = new TextEncoder();

/**
 * Decode `count` entries from `b`, the bytes at `baseOffset` in the file.
 * Returns the entries and the table's size in bytes.
 */
export function decodeSnapshotTable(
  b: Uint8Array,
  count: number,
  baseOffset: number,
  clusterSize: number,
  fileSize: number,
): { entries: SnapshotEntry[]; size: number } {
  const entries: SnapshotEntry[] = [];
  let off = 0;
  for (let i = 0; i < count; i++) {
    const at = baseOffset + off;
    if (off + 40 > b.length) throw new FormatError(S, `entry ${i}`, at, 'table runs past the end of the file');
    const l1TableOffset = u64(b, off);
    const l1Size = u32(b, off + 8);
    const idLen = u16(b, off + 12);
    const nameLen = u16(b, off + 14);
    const extraLen = u32(b, off + 36);
    if (extraLen > MAX_SNAPSHOT_EXTRA_DATA) throw new FormatError(S, `extra_data_size of entry ${i}`, at + 36, `${extraLen} bytes is too much extra data`);
    const end = off + 40 + extraLen + idLen + nameLen;
    if (end > b.length) throw new FormatError(S, `entry ${i}`, at, 'entry runs past the end of the file');
    // judged on the exact value: above 2^53 a JS number is rounded (2^60 + 1 would pass as aligned)
    const exactL1 = u64big(b, off);
    if (exactL1 % BigInt(clusterSize) !== 0n) throw new FormatError(S, `l1_table_offset of entry ${i}`, at, `${hex(exactL1)} is not cluster aligned`);
    if (l1Size > MAX_L1_BYTES / 8) throw new FormatError(S, `l1_size of entry ${i}`, at + 8, `${l1Size} entries is too large`);
    if (l1TableOffset + l1Size * 8 > fileSize) throw new FormatError(S, `l1_table_offset of entry ${i}`, at, `L1 table at ${hex(exactL1)} ends past the end of the file`);
    const x = off + 40;
    const vmStateLarge = extraLen >= 8 ? u64(b, x) : undefined;
    const noIcount = extraLen < 24 || (u32(b, x + 16) === 0xffff_ffff && u32(b, x + 20) === 0xffff_ffff);
    entries.push({
      l1TableOffset,
      l1Size,
      id: dec.decode(b.subarray(x + extraLen, x + extraLen + idLen)),
      name: dec.decode(b.subarray(x + extraLen + idLen, end)),
      dateSec: u32(b, off + 16),
      dateNsec: u32(b, off + 20),
      vmClockNsec: u64(b, off + 24),
      vmStateSize: vmStateLarge ?? u32(b, off + 32),
      diskSize: extraLen >= 16 ? u64(b, x + 8) : undefined,
      icount: noIcount ? undefined : u64(b, x + 16),
      extraUnknown: b.slice(x + Math.min(extraLen, 24), x + extraLen),
      exact: {
        vmClockNsec: u64big(b, off + 24),
        vmStateSize: extraLen >= 8 ? u64big(b, x) : BigInt(u32(b, off + 32)),
        diskSize: extraLen >= 16 ? u64big(b, x + 8) : undefined,
        icount: noIcount ? undefined : u64big(b, x + 16),
      },
    });
    off = Math.ceil(end / 8) * 8;
  }
  return { entries, size: off };
}

export function encodeSnapshotTable(entries: readonly SnapshotEntry[]): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const s of entries) {
    const id = enc.encode(s.id);
    const name = enc.encode(s.name);
    const extraLen = 24 + s.extraUnknown.length;
    const len = Math.ceil((40 + extraLen + id.length + name.length) / 8) * 8;
    const b = new Uint8Array(len);
    putU64(b, 0, s.l1TableOffset);
    putU32(b, 8, s.l1Size);
    putU16(b, 12, id.length);
    putU16(b, 14, name.length);
    putU32(b, 16, s.dateSec);
    putU32(b, 20, s.dateNsec);
    const x = snapshotExact(s);
    putU64(b, 24, x.vmClockNsec);
    putU32(b, 32, Number(x.vmStateSize > 0xffff_ffffn ? 0xffff_ffffn : x.vmStateSize));
    putU32(b, 36, extraLen);
    putU64(b, 40, x.vmStateSize);
    putU64(b, 48, x.diskSize ?? 0n);
    putU64(b, 56, x.icount ?? 0xffff_ffff_ffff_ffffn);
    b.set(s.extraUnknown, 64);
    b.set(id, 40 + extraLen);
    b.set(name, 40 + extraLen + id.length);
    parts.push(b);
  }
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}
