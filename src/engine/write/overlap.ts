/**
 * Which host clusters hold metadata, by kind, so that no write lands on
 * live metadata (QEMU's overlap checks). Kinds are a bitmask in the order
 * of QEMU's QCOW2_OL_* bits, plus qledger's journal area. The index follows
 * the record stream (new tables, table moves, clusters freed); what no
 * record describes (header, snapshot tables, the journal area) is reserved
 * explicitly. A lookup is one Map probe per cluster.
 */

import type { Geometry } from '../../format/header.ts';
import type { JournalRecord } from '../../journal/records.ts';
import { cluster, host, type ClusterIndex, type HostOffset } from '../../format/offsets.ts';

export const OL_MAIN_HEADER = 1 << 0;
export const OL_ACTIVE_L1 = 1 << 1;
export const OL_ACTIVE_L2 = 1 << 2;
export const OL_REFCOUNT_TABLE = 1 << 3;
export const OL_REFCOUNT_BLOCK = 1 << 4;
export const OL_SNAPSHOT_TABLE = 1 << 5;
export const OL_INACTIVE_L1 = 1 << 6;
export const OL_INACTIVE_L2 = 1 << 7;
export const OL_BITMAP_DIRECTORY = 1 << 8;
/** qledger's journal area: refcount 0 (QEMU must not count it), so the allocator skips it by this index */
export const OL_JOURNAL = 1 << 9;

const NAMES: ReadonlyArray<readonly [number, string]> = [
  [OL_MAIN_HEADER, 'header'],
  [OL_ACTIVE_L1, 'active L1 table'],
  [OL_ACTIVE_L2, 'active L2 table'],
  [OL_REFCOUNT_TABLE, 'refcount table'],
  [OL_REFCOUNT_BLOCK, 'refcount block'],
  [OL_SNAPSHOT_TABLE, 'snapshot table'],
  [OL_INACTIVE_L1, 'inactive L1 table'],
  [OL_INACTIVE_L2, 'inactive L2 table'],
  [OL_BITMAP_DIRECTORY, 'bitmap directory'],
  [OL_JOURNAL, 'journal'],
];

/** The name of the lowest kind in `kinds`, for messages ("overlaps the refcount block"). */
export function overlapName(kinds: number): string {
  for (const [bit, name] of NAMES) if (kinds & bit) return name;
  return 'metadata';
}

export class OverlapIndex {
  private readonly kinds = new Map<ClusterIndex, number>();
  private readonly cs: number;

  constructor(g: Geometry) {
    this.cs = g.clusterSize;
  }

  /** Mark the clusters of byte range [offset, offset + bytes) as holding `kind`. */
  reserve(offset: HostOffset, bytes: number, kind: number): void {
    if (bytes <= 0) return;
    for (let c = cluster(Math.floor(offset / this.cs)); c * this.cs < offset + bytes; c = cluster(c + 1)) this.kinds.set(c, (this.kinds.get(c) ?? 0) | kind);
  }

  /** The clusters of byte range [offset, offset + bytes) hold no metadata any more. */
  release(offset: HostOffset, bytes: number): void {
    for (let c = cluster(Math.floor(offset / this.cs)); c * this.cs < offset + bytes; c = cluster(c + 1)) this.kinds.delete(c);
  }

  /** The kinds of metadata in host cluster `cluster` (0: none). */
  at(c: ClusterIndex): number {
    return this.kinds.get(c) ?? 0;
  }

  has(c: ClusterIndex): boolean {
    return this.kinds.has(c);
  }

  /** Follow one record of the stream (the context's subscriber). */
  follow(r: JournalRecord): void {
    const cs = this.cs;
    switch (r.kind) {
      case 'table-new':
        this.reserve(host(r.offset), cs, r.role === 'l2' ? OL_ACTIVE_L2 : OL_REFCOUNT_BLOCK);
        break;
      case 'l1-swap':
        this.release(host(r.oldOffset), r.oldSize * 8);
        this.reserve(host(r.newOffset), r.newSize * 8, OL_ACTIVE_L1);
        break;
      case 'reftable-swap':
        this.release(host(r.oldOffset), r.oldClusters * cs);
        this.reserve(host(r.newOffset), r.newClusters * cs, OL_REFCOUNT_TABLE);
        break;
      case 'refcount':
        // a freed cluster holds nothing any more, whatever it held
        if (r.new === 0 && r.old > 0) this.kinds.delete(cluster(r.cluster));
        break;
      default:
        break;
    }
  }
}
