/**
 * Wiring: the rooms of one read-write session built over one write
 * context, each handed only the rooms below it, and the record stream's
 * subscribers registered in one place (trace, overlap index, allocator
 * epoch, journal stream, pending write-back, compressed packing); content dedup when asked for;
 * persistent dirty bitmaps.
 */

import type { JournalPlan } from '../journal/live.ts';
import type { FaultPlan } from '../faults.ts';
import { Allocator } from './allocator.ts';
import { Bitmaps } from './bitmaps.ts';
import { CompressedWriter } from './compressed.ts';
import type { WriteContext } from './context.ts';
import { DataWriter } from './data-write.ts';
import { Dedup } from './dedup.ts';
import { Discarder } from './discard.ts';
import { JournalSession } from './journal-session.ts';
import { Mapping } from './mapping.ts';
import type { OverlapIndex } from './overlap.ts';
import { Resizer } from './resize.ts';
import { SharedClusters, ZeroCluster } from './shared.ts';
import { Snapshots } from './snapshots.ts';
import { MakeEmpty } from './make-empty.ts';
import { ZeroExpansion } from './downgrade.ts';
import type { SnapshotEntry } from '../../format/snapshot.ts';
import { TableCache } from './tables.ts';
import { WriteBack } from './writeback.ts';
import { ZeroWriter } from './zero.ts';

export interface RoomOptions {
  /** the overlap index the image's guarded device checks against, built at open */
  readonly overlap: OverlapIndex;
  readonly cacheBytes: number;
  readonly writebackRecords: number;
  readonly faults: FaultPlan | undefined;
  readonly journal: JournalPlan | undefined;
  readonly extensions: ConstructorParameters<typeof JournalSession>[3];
  readonly onWarning: ((message: string) => void) | undefined;
  readonly stopAfterPhase: number | undefined;
  /** the snapshot table as read at open, and its size in bytes */
  readonly snapshots: { readonly entries: readonly SnapshotEntry[]; readonly tableBytes: number };
  /** content dedup on (the caller checked the image can share clusters) */
  readonly dedup: boolean;
  /** the header's compression type, for compressed writes */
  readonly compressionType: number;
}

export interface Rooms {
  readonly overlap: OverlapIndex;
  readonly tables: TableCache;
  readonly alloc: Allocator;
  readonly mapping: Mapping;
  readonly shared: SharedClusters;
  readonly zeroCluster: ZeroCluster;
  readonly data: DataWriter;
  readonly dedup: Dedup | undefined;
  readonly zero: ZeroWriter;
  readonly discard: Discarder;
  readonly compressed: CompressedWriter;
  readonly resize: Resizer;
  readonly snapshots: Snapshots;
  readonly makeEmpty: MakeEmpty;
  readonly zeroExpansion: ZeroExpansion;
  readonly bitmaps: Bitmaps;
  readonly journal: JournalSession;
  readonly writeback: WriteBack;
}

export function buildRooms(ctx: WriteContext, o: RoomOptions): Rooms {
  const overlap = o.overlap;
  const tables = new TableCache(ctx, overlap, o.cacheBytes);
  const alloc = new Allocator(ctx, tables, overlap, o.faults);
  const mapping = new Mapping(ctx, tables, alloc);
  const shared = new SharedClusters(ctx, tables, alloc, mapping);
  const zeroCluster = new ZeroCluster(ctx, tables, alloc, mapping, shared);
  const data = new DataWriter(ctx, alloc, mapping, shared);
  const dedup = o.dedup ? new Dedup(ctx, tables, alloc, mapping, shared) : undefined;
  data.dedup = dedup;
  shared.dedup = o.dedup;
  const zero = new ZeroWriter(ctx, mapping, data, zeroCluster);
  const journal = new JournalSession(ctx, overlap, o.journal, o.extensions, o.onWarning, o.faults);
  const writeback = new WriteBack(ctx, alloc, tables, journal, overlap, o.faults, o.writebackRecords, o.stopAfterPhase);
  ctx.subscribe((r) => ctx.trace.record(r));
  ctx.subscribe((r) => overlap.follow(r));
  ctx.subscribe((r) => alloc.follow(r));
  ctx.subscribe((r) => journal.follow(r));
  ctx.subscribe((r) => writeback.follow(r));
  const compressed = new CompressedWriter(ctx, alloc, mapping, data, o.compressionType);
  ctx.subscribe((r) => compressed.follow(r));
  const resize = new Resizer(ctx, alloc, mapping, zero);
  return {
    overlap,
    tables,
    alloc,
    mapping,
    shared,
    zeroCluster,
    data,
    dedup,
    zero,
    discard: new Discarder(ctx, mapping, zero),
    compressed,
    resize,
    makeEmpty: new MakeEmpty(ctx, tables, alloc, shared),
    zeroExpansion: new ZeroExpansion(ctx, tables, alloc, mapping),
    snapshots: new Snapshots(ctx, tables, alloc, resize, overlap, o.snapshots.entries, o.snapshots.tableBytes),
    bitmaps: new Bitmaps(ctx, alloc, overlap, o.faults),
    journal,
    writeback,
  };
}
