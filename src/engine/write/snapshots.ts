/**
 * Internal snapshots: create, apply (QEMU's "goto") and delete, each one
 * transaction of records over the live state, as QEMU's qcow2-snapshot.c
 * does them but ordered by the write-back's phases (ordering.ts):
 *
 *   create  +1 on every cluster the active tree reaches (L2 tables, data,
 *           each cluster a compressed run touches), COPIED cleared on the
 *           active entries, a copy of the active L1 and the new snapshot
 *           table written to fresh clusters (like guest data, before the
 *           transaction is durable), then the header switched to the table.
 *   apply   +1 on the snapshot's tree, the active L1 entries set to the
 *           snapshot's, −1 on the old active tree, COPIED cleared where a
 *           snapshot table still carries it; the virtual size follows the
 *           snapshot's disk size.
 *   delete  the header switched to a table without the entry, −1 on the
 *           snapshot's tree and its L1 freed, then COPIED set on the active
 *           entries left with one reference.
 *
 * The refcount a snapshot adds is counted per tree, as QEMU counts it: an
 * L2 table shared by two trees counts its data twice.
 */

import type { Geometry } from '../../format/header.ts';
import { CorruptionError, QledgerError, hex } from '../../errors.ts';
import { COPIED_HI, entryOffset } from '../../format/l1.ts';
import { isCompressed, isCopied, l2EntryAt, standardOffset, L2E_COMPRESSED_HI, L2E_COPIED_HI, L2E_OFFSET_MASK_HI, L2E_OFFSET_MASK_LO } from '../../format/l2.ts';
import { encodeSnapshotTable, snapshotExact, type SnapshotEntry } from '../../format/snapshot.ts';
import { MAX_L1_BYTES, MAX_SUPPORTED_BYTES } from '../../format/limits.ts';
import { cluster, clusterOf, host, type HostOffset } from '../../format/offsets.ts';
import { putU32, u32 } from '../../format/bytes.ts';
import { readAt, readClusters } from '../../io/device.ts';
import type { Word64 } from '../../journal/records.ts';
import type { Allocator } from './allocator.ts';
import type { WriteContext } from './context.ts';
import { OL_INACTIVE_L1, OL_INACTIVE_L2, OL_SNAPSHOT_TABLE, type OverlapIndex } from './overlap.ts';
import type { Resizer } from './resize.ts';
import type { TableCache } from './tables.ts';
import { ClusterList, copiedEntries, treeRefs } from './tree-refs.ts';

/** QEMU's QCOW_MAX_SNAPSHOTS. */
export const MAX_SNAPSHOTS = 65536;

/** What a new snapshot records besides its name (qemu-img: the time, everything else 0). */
export interface SnapshotFields {
  readonly dateSec?: number | undefined;
  readonly dateNsec?: number | undefined;
  readonly vmClockNsec?: number | undefined;
}

/** A snapshot by id first, then by name, as QEMU's find_snapshot_by_id_or_name. */
export function findSnapshotIndex(list: readonly SnapshotEntry[], key: string): number {
  const byId = list.findIndex((s) => s.id === key);
  return byId >= 0 ? byId : list.findIndex((s) => s.name === key);
}

export class Snapshots {
  /** the snapshot table as the live state has it */
  list: SnapshotEntry[];

  constructor(
    private readonly ctx: WriteContext,
    private readonly tables: TableCache,
    private readonly alloc: Allocator,
    private readonly resizer: Resizer,
    private readonly overlap: OverlapIndex,
    entries: readonly SnapshotEntry[],
    /** bytes of the snapshot table on disk */
    private tableBytes: number,
  ) {
    this.list = [...entries];
  }

  /** What this room keeps in memory, to put back when a failed operation was undone (writer.ts). */
  save(): () => void {
    const list = this.list;
    const tableBytes = this.tableBytes;
    const reader = this.ctx.reader();
    const seen = reader.snapshots;
    return () => {
      this.list = list;
      this.tableBytes = tableBytes;
      reader.snapshots = seen;
    };
  }

  async create(name: string, f: SnapshotFields = {}): Promise<SnapshotEntry> {
    const ctx = this.ctx;
    const t = ctx.t();
    const g = ctx.geometry;
    const cs = g.clusterSize;
    if (ctx.hasDataFile) throw new QledgerError('E_UNSUPPORTED', `${ctx.filename}: internal snapshots are not possible with an external data file`, { errno: 95 });
    if (this.list.length >= MAX_SNAPSHOTS) throw new QledgerError('E_OVERFLOW', `${ctx.filename}: the image has ${MAX_SNAPSHOTS} snapshots, QEMU's limit`, { errno: 27 });
    const h = t.header;
    // QEMU's find_new_snapshot_id: one past the largest numeric id
    const id = String(this.list.reduce((m, s) => Math.max(m, Number.parseInt(s.id, 10) || 0), 0) + 1);

    // Everything is read and checked before the first record: a refusal leaves the state untouched.
    const refs = new ClusterList();
    const l1Entries: { index: number; e: Word64; table: HostOffset }[] = [];
    const active: [number, HostOffset][] = [];
    for (let i = 0; i < h.l1Size; i++) if (t.l1TableOffset(i) !== 0) active.push([i, t.l1TableOffset(i)]);
    await this.tables.preloadL2(active);
    for (let i = 0; i < h.l1Size; i++) {
      const table = t.l1TableOffset(i);
      if (table === 0) continue;
      treeRefs(t.l2(i) ?? (await this.tables.loadL2(i, table)), this.ctx.geometry, refs);
      refs.push(clusterOf(table, cs));
      l1Entries.push({ index: i, e: t.l1Entry(i), table });
    }
    await this.alloc.changeRefcounts(refs.view(), 1, { referenced: true });
    for (const x of l1Entries) {
      // the table is loaded (above): its entries that lose COPIED, one record for the table
      const bytes = t.l2(x.index)!;
      this.emitCopied(x.index, x.table, bytes, copiedEntries(bytes, g), false);
    }
    for (const x of l1Entries) if (x.e.hi & COPIED_HI) ctx.emit({ kind: 'l1', index: x.index, old: x.e, new: { hi: (x.e.hi & ~COPIED_HI) >>> 0, lo: x.e.lo } });

    // the snapshot's L1: the active one as it is now (COPIED clear everywhere)
    const l1 = new Uint8Array(Math.ceil((h.l1Size * 8) / 512) * 512);
    for (const x of l1Entries) {
      putU32(l1, x.index * 8, (x.e.hi & ~COPIED_HI) >>> 0);
      putU32(l1, x.index * 8 + 4, x.e.lo);
    }
    let l1Offset = 0;
    if (h.l1Size > 0) {
      l1Offset = (await this.alloc.allocate(Math.ceil((h.l1Size * 8) / cs))) * cs;
      await this.writeFresh(l1Offset, l1, OL_INACTIVE_L1, 'snapshot l1');
    }
    const now = Date.now();
    const sn: SnapshotEntry = {
      l1TableOffset: l1Offset,
      l1Size: h.l1Size,
      id,
      name,
      dateSec: f.dateSec ?? Math.floor(now / 1000),
      dateNsec: f.dateNsec ?? (now % 1000) * 1_000_000,
      vmClockNsec: f.vmClockNsec ?? 0,
      vmStateSize: 0,
      diskSize: h.size,
      icount: 0,
      extraUnknown: new Uint8Array(0),
    };
    await this.switchTable([...this.list, sn]);
    // the active tables are now also the snapshot's
    for (const x of l1Entries) this.overlap.reserve(x.table, cs, OL_INACTIVE_L2);
    return sn;
  }

  async apply(key: string): Promise<SnapshotEntry> {
    const ctx = this.ctx;
    const t = ctx.t();
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const at = findSnapshotIndex(this.list, key);
    if (at < 0) throw new QledgerError('E_NOT_FOUND', `${ctx.filename}: no snapshot with id or name '${key}'`, { errno: 2 });
    const sn = this.list[at]!;
    const h = t.header;
    // the virtual size the snapshot brings back, judged exactly and before any change, as
    // QEMU's apply truncates to it first (its refusals in its words, as `detail`)
    const exactSize = snapshotExact(sn).diskSize ?? BigInt(h.size);
    const refuse = (errno: number, detail: string) => new QledgerError(errno === 22 ? 'E_FORMAT' : 'E_UNSUPPORTED', `${ctx.filename}: snapshot '${key}': ${detail} (disk size ${exactSize})`, { errno, detail, field: 'disk_size', size: exactSize });
    if (exactSize % 512n !== 0n) throw refuse(22, 'The new size must be a multiple of 512');
    if (exactSize / BigInt(g.l2Entries * cs) + (exactSize % BigInt(g.l2Entries * cs) ? 1n : 0n) > BigInt(MAX_L1_BYTES / 8)) throw refuse(27, 'Failed to grow the L1 table: File too large');
    if (exactSize > BigInt(MAX_SUPPORTED_BYTES)) throw refuse(27, 'a virtual size above 2^53 bytes is not supported');
    const size = Number(exactSize);
    const snapL1 = await this.readL1(sn);

    // Both trees, read first. Slots whose table is the same in both cancel out.
    const add = new ClusterList();
    const drop = new ClusterList();
    const slots: { index: number; old: Word64; table: HostOffset }[] = [];
    const snapTables = await readClusters(ctx.files.image, [...new Set(snapL1.filter((o, i) => o !== 0 && o !== t.l1TableOffset(i)))], cs);
    for (let i = 0; i < Math.max(h.l1Size, snapL1.length); i++) {
      const now = t.l1TableOffset(i);
      const next = i < snapL1.length ? snapL1[i]! : 0;
      if (now === next) continue;
      if (next !== 0) {
        treeRefs(snapTables.get(next)!, this.ctx.geometry, add);
        add.push(clusterOf(host(next), cs));
      }
      if (now !== 0) {
        treeRefs(t.l2(i) ?? (await this.tables.loadL2(i, now)), this.ctx.geometry, drop);
        drop.push(clusterOf(now, cs));
      }
      slots.push({ index: i, old: t.l1Entry(i), table: host(next) });
    }
    // checked whole before its first record: a refusal changes nothing
    await this.alloc.changeRefcounts(add.view(), 1, { referenced: true });
    // the active L1 takes the snapshot's size when that is larger (QEMU's qcow2_grow_l1_table), and
    // covers the virtual size the snapshot brings back (QEMU's truncate to it); the entries stay
    await this.resizer.growL1(Math.max(sn.l1Size, Math.ceil(size / (g.l2Entries * cs))));
    for (const s of slots) {
      // the snapshot still holds the table: shared, so COPIED clear
      ctx.emit({ kind: 'l1', index: s.index, old: s.old, new: { hi: Math.floor(s.table / 0x1_0000_0000), lo: s.table % 0x1_0000_0000 } });
      if (s.table === 0) t.unload(s.index);
      else t.load('l2', s.index, snapTables.get(s.table)!);
    }
    await this.alloc.changeRefcounts(drop.view(), -1);
    // COPIED left set in a snapshot's table (QEMU's delete sets it on tables another snapshot shares) goes now
    for (const s of slots) {
      if (s.table === 0) continue;
      const bytes = t.l2(s.index)!;
      const lose: number[] = [];
      for (let j = 0; j < g.l2Entries; j++) {
        const e = l2EntryAt(bytes, j, g);
        if (!isCopied(e) || isCompressed(e)) continue;
        if ((await this.alloc.refcount(clusterOf(host(standardOffset(e)), cs))) === 1) continue;
        lose.push(j);
      }
      this.emitCopied(s.index, s.table, bytes, lose, false);
    }
    if (size !== t.header.size) {
      ctx.emit({ kind: 'header', field: 'size', old: BigInt(t.header.size), new: BigInt(size) });
      ctx.reader().size = size;
    }
    return sn;
  }

  /** Delete snapshot `key`: by id, then name; `byName`: the first with that name (qemu-img snapshot -d). */
  async delete(key: string, byName = false): Promise<SnapshotEntry> {
    const ctx = this.ctx;
    const t = ctx.t();
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const at = byName ? this.list.findIndex((s) => s.name === key) : findSnapshotIndex(this.list, key);
    if (at < 0) throw new QledgerError('E_NOT_FOUND', `${ctx.filename}: no snapshot with id or name '${key}'`, { errno: 2 });
    const sn = this.list[at]!;
    const snapL1 = await this.readL1(sn);
    const tables = [...new Set(snapL1.filter((o) => o !== 0))];
    // a table the snapshot names in a slot that names it in the active L1 too is read live
    const live = new Set(snapL1.filter((T, i) => T !== 0 && t.l1TableOffset(i) === T));
    const bytesOf = await readClusters(ctx.files.image, tables.filter((o) => !live.has(o)), cs);
    const drop = new ClusterList();
    await this.tables.preloadL2(snapL1.flatMap((T, i) => (T !== 0 && t.l1TableOffset(i) === T ? [[i, host(T)] as [number, HostOffset]] : [])));
    for (let i = 0; i < snapL1.length; i++) {
      const T = snapL1[i]!;
      if (T === 0) continue;
      const active = t.l1TableOffset(i) === T ? (t.l2(i) ?? (await this.tables.loadL2(i, host(T)))) : undefined;
      treeRefs(active ?? bytesOf.get(T)!, this.ctx.geometry, drop);
      drop.push(T / cs);
    }
    const rest = this.list.filter((_, i) => i !== at);
    await this.switchTable(rest);
    // clusters the deletion leaves with one reference, as a bitmap over the file's clusters
    const left = new ClusterBits(ctx.extent.endCluster);
    await this.alloc.changeRefcounts(drop.view(), -1, {
      onResult: (c, rc) => {
        if (rc === 1) left.add(c);
      },
    });
    const l1First = sn.l1TableOffset / cs;
    for (let k = 0; k < Math.ceil((sn.l1Size * 8) / cs); k++) await this.alloc.changeRefcount(cluster(l1First + k), -1);
    if (left.size) await this.settleCopied(left);
    // tables no remaining snapshot holds stop being inactive L2 tables
    const still = new Set<number>();
    for (const s of rest) for (const o of await this.readL1(s)) if (o) still.add(o);
    for (const T of tables) if (!still.has(T)) this.overlap.releaseLater(host(T), cs, OL_INACTIVE_L2);
    return sn;
  }

  // ---- helpers -----------------------------------------------------------

  /** One record: COPIED set (`set`) or cleared on entries `indices` of the table of L1 index `l1Index`, as `bytes` holds them. */
  private emitCopied(l1Index: number, table: number, bytes: Uint8Array, indices: readonly number[] | Uint32Array, set: boolean): void {
    if (indices.length === 0) return;
    const g = this.ctx.geometry;
    const es = g.l2EntrySize;
    const words = g.extendedL2 ? 4 : 2;
    const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const old = new Uint32Array(indices.length * 4);
    for (let k = 0; k < indices.length; k++) {
      const o = indices[k]! * es;
      for (let x = 0; x < words; x++) old[k * 4 + x] = dv.getUint32(o + 4 * x);
    }
    const next = old.slice();
    for (let k = 0; k < indices.length; k++) next[k * 4] = set ? (next[k * 4]! | L2E_COPIED_HI) >>> 0 : (next[k * 4]! & ~L2E_COPIED_HI) >>> 0;
    this.ctx.emit({ kind: 'l2s', l1Index, table, index: indices instanceof Uint32Array ? indices : new Uint32Array(indices), old, new: next });
  }

  /** A snapshot's L1 table from disk, as table offsets (flags masked), checked. */
  private async readL1(sn: SnapshotEntry): Promise<number[]> {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    if (sn.l1Size === 0) return [];
    const b = await readAt(ctx.files.image, sn.l1TableOffset, sn.l1Size * 8);
    const out: number[] = [];
    for (let i = 0; i < sn.l1Size; i++) {
      const o = entryOffset(u32(b, i * 8), u32(b, i * 8 + 4));
      if (o % cs !== 0 || o + (o ? cs : 0) > ctx.extent.end()) {
        throw new CorruptionError(`${ctx.filename}: snapshot '${sn.name}' (id ${sn.id}) L1 entry ${i} points at ${hex(o)}, outside the image or unaligned`, { snapshot: sn.id, index: i });
      }
      out.push(o);
    }
    return out;
  }

  /** Bytes into fresh clusters nothing durable points at, like guest data; the index learns their kind. */
  private async writeFresh(offset: number, bytes: Uint8Array, kind: number, what: string): Promise<void> {
    await this.ctx.writeFresh(offset, bytes, what);
    this.overlap.reserve(host(offset), bytes.length, kind);
  }

  /** The header switches to a new snapshot table holding `entries`; the old table is freed. */
  private async switchTable(entries: SnapshotEntry[]): Promise<void> {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    const h = ctx.t().header;
    const bytes = encodeSnapshotTable(entries);
    let offset = 0;
    if (entries.length) {
      offset = (await this.alloc.allocate(Math.ceil(bytes.length / cs))) * cs;
      await this.writeFresh(offset, bytes, OL_SNAPSHOT_TABLE, 'snapshot table');
    }
    ctx.emit({ kind: 'header', field: 'nb_snapshots', old: BigInt(h.nbSnapshots), new: BigInt(entries.length) });
    ctx.emit({ kind: 'header', field: 'snapshots_offset', old: BigInt(h.snapshotsOffset), new: BigInt(offset) });
    if (h.nbSnapshots > 0 && this.tableBytes > 0) {
      const first = h.snapshotsOffset / cs;
      for (let k = 0; k < Math.ceil(this.tableBytes / cs); k++) await this.alloc.changeRefcount(cluster(first + k), -1);
    }
    this.list = entries;
    this.tableBytes = bytes.length;
    ctx.reader().snapshots = entries;
  }

  /**
   * COPIED on the active entries whose cluster the deletion left with one
   * reference: the L1 entries of such tables, and the entries of tables
   * with one reference mapping such clusters (QEMU's qcow2_update_snapshot_refcount
   * with addend 0 over the active tree).
   */
  private async settleCopied(left: ClusterBits): Promise<void> {
    const ctx = this.ctx;
    const t = ctx.t();
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const active: [number, HostOffset][] = [];
    for (let i = 0; i < t.header.l1Size; i++) if (t.l1TableOffset(i) !== 0) active.push([i, t.l1TableOffset(i)]);
    await this.tables.preloadL2(active);
    for (let i = 0; i < t.header.l1Size; i++) {
      const T = t.l1TableOffset(i);
      if (T === 0) continue;
      const e = t.l1Entry(i);
      const rc = await this.alloc.refcount(clusterOf(T, cs));
      if (rc !== 1) continue; // shared: its entries' clusters are too
      if ((e.hi & COPIED_HI) === 0 && left.has(T / cs)) ctx.emit({ kind: 'l1', index: i, old: e, new: { hi: (e.hi | COPIED_HI) >>> 0, lo: e.lo } });
      const bytes = t.l2(i) ?? (await this.tables.loadL2(i, T));
      this.emitCopied(i, T, bytes, gainingCopied(bytes, g, left), true);
    }
  }
}

/**
 * The entries of an L2 table without COPIED whose standard cluster is in
 * `left` (the clusters a deletion left with one reference). A function of
 * its own, not a loop in settleCopied: that async body runs unoptimised in
 * a fresh process, and this runs once per table (2,048 times for a
 * million clusters), so V8 optimises it early.
 */
function gainingCopied(bytes: Uint8Array, g: Geometry, left: ClusterBits): number[] {
  const gain: number[] = [];
  const es = g.l2EntrySize;
  const cs = g.clusterSize;
  for (let j = 0; j < g.l2Entries; j++) {
    const hi = u32(bytes, j * es);
    if (hi & (L2E_COPIED_HI | L2E_COMPRESSED_HI)) continue;
    const off = (hi & L2E_OFFSET_MASK_HI) * 0x1_0000_0000 + ((u32(bytes, j * es + 4) & L2E_OFFSET_MASK_LO) >>> 0);
    if (off !== 0 && left.has(off / cs)) gain.push(j);
  }
  return gain;
}

/** A set of cluster numbers below a bound, one bit each (a million of them cost 128 KiB, not a hash set). */
class ClusterBits {
  private bits: Uint8Array;

  constructor(bound: number) {
    this.bits = new Uint8Array(Math.ceil(Math.max(1, bound) / 8));
  }

  add(c: number): void {
    if (c >= this.bits.length * 8) {
      const grown = new Uint8Array(Math.ceil((c + 1) / 8) * 2);
      grown.set(this.bits);
      this.bits = grown;
    }
    this.bits[c >>> 3] = this.bits[c >>> 3]! | (1 << (c & 7));
    this.count++;
  }

  has(c: number): boolean {
    return c < this.bits.length * 8 && (this.bits[c >>> 3]! & (1 << (c & 7))) !== 0;
  }

  count = 0;

  get size(): number {
    return this.count;
  }
}
