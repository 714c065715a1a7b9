/**
 * One qcow2 image as a read-only layer: header, active (or snapshot) L1
 * table, L2 tables on demand through a bounded cache, and the guest -> host
 * translation of QEMU's qcow2_get_host_offset().
 */

import { CorruptionError, hex } from '../errors.ts';
import type { BlockDevice } from '../io/device.ts';
import { readAt } from '../io/device.ts';
import { zeroRun } from '../io/holes.ts';
import { decodeHeader, geometryOf, type Geometry, type ParsedHeader } from '../format/header.ts';
import { l1Offset } from '../format/l1.ts';
import {
  compressedDescriptor,
  readL2Entry,
  standardOffset,
  subclusterType,
  type RawL2Entry,
} from '../format/l2.ts';
import { AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DATA_FILE } from '../format/features.ts';
import { decodeSnapshotTable, type SnapshotEntry } from '../format/snapshot.ts';
import { decodeBitmapDirectory, type BitmapDirectoryEntry } from '../format/bitmaps.ts';
import { refcountTableEntry, getRefcount } from '../format/refcount.ts';
import { decompressCluster } from './compress.ts';
import { guest, host, type GuestOffset, type HostOffset, type Layer, type LayerStatus } from './layer.ts';

/** Bytes of L2 tables kept in memory per image. */
const L2_CACHE_BYTES = 32 * 1024 * 1024;

export interface Qcow2LayerOptions {
  readonly filename: string;
  readonly dev: BlockDevice;
  /** the external data file, when the image has one */
  readonly dataDev?: BlockDevice | undefined;
  readonly parsed: ParsedHeader;
  readonly fileSize: number;
  readonly snapshots: readonly SnapshotEntry[];
  readonly l1: Uint8Array;
  readonly l1Size: number;
  readonly size: number;
  readonly backing: Layer | undefined;
  /** A writable image supplies its live tables instead of the on-disk L1 (see writer.ts). */
  readonly source?: TableSource | undefined;
}

/** Live metadata for a layer whose tables change under it (the write engine). */
export interface TableSource {
  l1Size(): number;
  /** L2 table offset of L1 entry `index`, or 0. */
  l1Offset(index: number): number;
  l2Table(l2Offset: number, l1Index: number): Promise<Uint8Array>;
  fileSize(): number;
}

export class Qcow2Layer implements Layer {
  readonly format = 'qcow2' as const;
  readonly filename: string;
  /** virtual size; the write engine changes it on truncate */
  size: number;
  readonly backing: Layer | undefined;
  readonly parsed: ParsedHeader;
  readonly geometry: Geometry;
  /** the snapshot table (a read-write session replaces it when it creates or deletes one) */
  snapshots: readonly SnapshotEntry[];
  readonly dev: BlockDevice;
  /** where the tables come from: the file (read-only), or the write engine's live state */
  private readonly source: TableSource;
  /** the tables change under the layer (the write engine's): nothing derived from them is cached */
  private readonly live: boolean;
  readonly dataDev: BlockDevice | undefined;
  private readonly hasDataFile: boolean;
  private readonly dataFileRaw: boolean;
  /** a v2 image has no zero flag: an entry with it set is corrupt (QEMU's read fails on it) */
  private readonly preV3: boolean;
  private lastCompressed: { offset: number; data: Uint8Array } | undefined;
  private readonly scratch: RawL2Entry = { hi: 0, lo: 0, bitmapHi: 0, bitmapLo: 0 };

  constructor(o: Qcow2LayerOptions) {
    this.filename = o.filename;
    this.dev = o.dev;
    this.dataDev = o.dataDev;
    this.parsed = o.parsed;
    this.geometry = geometryOf(o.parsed.header);
    this.live = o.source !== undefined;
    this.source = o.source ?? new OnDiskTables(o.filename, o.dev, o.l1, o.l1Size, o.fileSize, this.geometry.clusterSize);
    this.snapshots = o.snapshots;
    // QEMU counts a disk in 512-byte sectors: a header size past the last whole sector is cut there
    this.size = Math.floor(o.size / 512) * 512;
    this.backing = o.backing;
    this.hasDataFile = (o.parsed.header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
    this.dataFileRaw = (o.parsed.header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
    this.preV3 = o.parsed.header.version < 3;
  }

  get fileSize(): number {
    return this.source.fileSize();
  }

  /** L1 entries (of the live state, for a writer's layer). */
  l1Count(): number {
    return this.source.l1Size();
  }

  /** The L2 table offset of L1 entry `index` (0: none). */
  l1At(index: number): number {
    return this.source.l1Offset(index);
  }

  get header() {
    return this.parsed.header;
  }

  async status(offset: GuestOffset, bytes: number): Promise<LayerStatus> {
    const at = this.spanAt(offset, bytes);
    if (at.l2Offset === 0) return { length: at.maxLen, type: 'unallocated-plain', hostOffset: undefined };
    return this.runAt(await this.l2Table(at.l2Offset, at.l1Index), at.l2Offset, offset, at.maxLen);
  }

  /**
   * Every run from `offset` to the end of its L2 table's span (at most
   * `bytes`), in order: what status() would answer run after run, with one
   * table lookup instead of one per run (map walks a million extents).
   */
  async statusRuns(offset: GuestOffset, bytes: number): Promise<LayerStatus[]> {
    const at = this.spanAt(offset, bytes);
    if (at.l2Offset === 0) return [{ length: at.maxLen, type: 'unallocated-plain', hostOffset: undefined }];
    const table = await this.l2Table(at.l2Offset, at.l1Index);
    const runs: LayerStatus[] = [];
    for (let done = 0; done < at.maxLen; ) {
      const st = this.runAt(table, at.l2Offset, guest(offset + done), at.maxLen - done);
      runs.push(st);
      done += st.length;
    }
    return runs;
  }

  /** The L1 entry of `offset` and how far its status may reach (to the end of its L2 span, the disk, `bytes`). */
  private spanAt(offset: GuestOffset, bytes: number): { l1Index: number; l2Offset: number; maxLen: number } {
    const g = this.geometry;
    const cs = g.clusterSize;
    const l1Index = Math.floor(Math.floor(offset / cs) / g.l2Entries);
    const l2Span = g.l2Entries * cs;
    const maxLen = Math.min(bytes, (l1Index + 1) * l2Span - offset, this.size - offset);
    if (l1Index >= this.l1Count()) return { l1Index, l2Offset: 0, maxLen };
    const l2Offset = this.l1At(l1Index);
    if (l2Offset % cs !== 0) {
      throw new CorruptionError(`${this.filename}: L2 table offset ${hex(l2Offset)} unaligned (L1 index: ${hex(l1Index)})`, { l1Index, l2Offset });
    }
    return { l1Index, l2Offset, maxLen };
  }

  /** The run at `offset` (at most `maxLen`, inside the span of `table`, the L2 table at `l2Offset`). */
  private runAt(table: Uint8Array, l2Offset: number, offset: GuestOffset, maxLen: number): LayerStatus {
    const g = this.geometry;
    const cs = g.clusterSize;
    const clusterIndex = Math.floor(offset / cs);
    const l2Index = clusterIndex % g.l2Entries;
    const scSize = g.subclusterSize;
    const e = readL2Entry(table, l2Index, g, this.scratch);
    const inCluster = offset % cs;
    const sc = Math.floor(inCluster / scSize);
    const type = subclusterType(e, sc, g, this.hasDataFile);
    if (type === 'invalid') {
      throw new CorruptionError(`${this.filename}: invalid cluster entry found (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(l2Index)})`, { l2Offset, l2Index });
    }
    if (this.preV3 && (type === 'zero-plain' || type === 'zero-alloc')) {
      throw new CorruptionError(`${this.filename}: Zero cluster entry found in pre-v3 image (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(l2Index)})`, { l2Offset, l2Index });
    }
    if (type === 'compressed') {
      return { length: Math.min(maxLen, cs - inCluster), type, hostOffset: undefined };
    }
    const hasOffset = type === 'normal' || type === 'zero-alloc' || type === 'unallocated-alloc';
    let hostStart = 0;
    if (hasOffset) {
      const hc = standardOffset(e);
      this.checkHostCluster(hc, l2Offset, l2Index, clusterIndex);
      hostStart = hc + inCluster;
    }
    // Extend the run over following subclusters and clusters of the same type
    // (and, where there is a host offset, contiguous on the host).
    let end = (sc + 1) * scSize - inCluster; // bytes covered so far
    let idx = l2Index;
    let s = sc + 1;
    while (end < maxLen) {
      if (s === g.subclustersPerCluster) {
        idx++;
        s = 0;
        if (idx >= g.l2Entries) break;
        readL2Entry(table, idx, g, e);
      }
      const t = subclusterType(e, s, g, this.hasDataFile);
      if (t !== type) break;
      if (hasOffset) {
        const hc = standardOffset(e);
        if (hc + s * scSize !== hostStart - inCluster + (idx - l2Index) * cs + s * scSize) break;
        if (s === 0) this.checkHostCluster(hc, l2Offset, idx, clusterIndex + (idx - l2Index));
      }
      end += scSize;
      s++;
    }
    return { length: Math.min(end, maxLen), type, hostOffset: hasOffset ? host(hostStart) : undefined };
  }

  private checkHostCluster(hc: number, l2Offset: number, l2Index: number, guestCluster: number): void {
    const cs = this.geometry.clusterSize;
    if (hc % cs !== 0) {
      throw new CorruptionError(
        `${this.filename}: cluster allocation offset ${hex(hc)} unaligned (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(l2Index)})`,
        { l2Offset, l2Index, hostOffset: hc },
      );
    }
    if (this.dataFileRaw && hc !== guestCluster * cs) {
      throw new CorruptionError(
        `${this.filename}: external data file host cluster offset ${hex(hc)} does not match guest cluster offset ${hex(guestCluster * cs)}`,
        { hostOffset: hc },
      );
    }
  }

  async readOwn(st: LayerStatus, offset: GuestOffset, out: Uint8Array): Promise<void> {
    if (st.type === 'normal') {
      await (this.dataDev ?? this.dev).readInto(out, st.hostOffset!);
      return;
    }
    if (st.type !== 'compressed') throw new Error(`readOwn on ${st.type}`);
    const cs = this.geometry.clusterSize;
    const clusterStart = offset - (offset % cs);
    const data = await this.compressedCluster(guest(clusterStart));
    const from = offset - clusterStart;
    out.set(data.subarray(from, from + out.length));
  }

  private async compressedCluster(clusterStart: GuestOffset): Promise<Uint8Array> {
    const g = this.geometry;
    const clusterIndex = clusterStart / g.clusterSize;
    const l1Index = Math.floor(clusterIndex / g.l2Entries);
    const l2Offset = this.l1At(l1Index);
    const table = await this.l2Table(l2Offset, l1Index);
    const e = readL2Entry(table, clusterIndex % g.l2Entries, g, { hi: 0, lo: 0, bitmapHi: 0, bitmapLo: 0 });
    const d = compressedDescriptor(e, g.clusterBits);
    if (this.lastCompressed?.offset === d.offset && !this.live) return this.lastCompressed.data;
    if (d.offset + d.length > this.fileSize + 512 || d.offset < this.geometry.clusterSize) {
      throw new CorruptionError(`${this.filename}: compressed cluster at host offset ${hex(d.offset)} lies outside the image`, { hostOffset: d.offset });
    }
    const raw = await readAt(this.dev, d.offset, d.length);
    const data = decompressCluster(this.header.compressionType, raw, g.clusterSize, d.offset);
    this.lastCompressed = { offset: d.offset, data };
    return data;
  }

  /** The L2 table at `l2Offset` (of L1 index `l1Index`). */
  l2Table(l2Offset: number, l1Index: number): Promise<Uint8Array> {
    return this.source.l2Table(l2Offset, l1Index);
  }

  private metadataPrealloc: Promise<boolean> | undefined;

  /**
   * QEMU's qcow2_detect_metadata_preallocation(): an image with many more
   * clusters in use (by refcount) than the file really occupies was
   * preallocated with metadata only, so its data clusters may be holes.
   */
  isMetadataPreallocated(): Promise<boolean> {
    this.metadataPrealloc ??= (async () => {
      const g = this.geometry;
      const allocated = await this.dev.allocatedBytes();
      if (allocated === undefined) return false;
      const realClusters = Math.floor(allocated / g.clusterSize);
      const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
      const h = this.header;
      const reftable = await readAt(this.dev, h.refcountTableOffset, h.refcountTableClusters * g.clusterSize);
      const endCluster = Math.ceil(this.fileSize / g.clusterSize);
      const per = g.refcountBlockEntries;
      // a block at a time (one read, then a plain loop over its entries: an await per cluster had
      // cost a million promise rounds on a 4 GiB image with 4 KiB clusters); as refcount() reads them
      let count = 0;
      for (let first = 0; first < endCluster && count < threshold; first += per) {
        const rtIndex = first / per;
        if (rtIndex * 8 >= reftable.length) break;
        const { offset } = refcountTableEntry(reftable, rtIndex);
        if (offset === 0 || offset + g.clusterSize > this.fileSize) continue;
        const block = await readAt(this.dev, offset, g.clusterSize);
        const n = Math.min(per, endCluster - first);
        for (let k = 0; k < n && count < threshold; k++) if (getRefcount(block, k, g.refcountOrder) !== 0) count++;
      }
      return count >= threshold;
    })();
    return this.metadataPrealloc;
  }

  async hostZeroRun(hostOffset: HostOffset, bytes: number): Promise<{ zero: boolean; length: number }> {
    return zeroRun(this.dataDev ?? this.dev, hostOffset, bytes);
  }

  async bitmapDirectory(): Promise<BitmapDirectoryEntry[]> {
    const b = this.parsed.bitmaps;
    if (!b) return [];
    const dir = await readAt(this.dev, b.directoryOffset, b.directorySize);
    return decodeBitmapDirectory(dir, b.nbBitmaps, b.directoryOffset);
  }

  async close(): Promise<void> {
    await this.backing?.close();
    await this.dataDev?.close();
    await this.dev.close();
  }
}

/** A read-only image's tables: its L1 table as read at open, L2 tables read on demand through a bounded LRU cache. */
class OnDiskTables implements TableSource {
  private readonly cache = new Map<number, Promise<Uint8Array>>();
  private readonly max: number;

  constructor(
    private readonly filename: string,
    private readonly dev: BlockDevice,
    private readonly l1: Uint8Array,
    private readonly entries: number,
    private readonly size: number,
    private readonly cs: number,
  ) {
    this.max = Math.max(16, Math.floor(L2_CACHE_BYTES / cs));
  }

  l1Size(): number {
    return this.entries;
  }

  l1Offset(index: number): number {
    return l1Offset(this.l1, index);
  }

  fileSize(): number {
    return this.size;
  }

  /** the table returned last: a walk asks for the same one for every extent of its span */
  private last: { offset: number; table: Promise<Uint8Array> } | undefined;

  l2Table(l2Offset: number, l1Index: number): Promise<Uint8Array> {
    if (this.last?.offset === l2Offset) return this.last.table;
    const table = this.lookup(l2Offset, l1Index);
    this.last = { offset: l2Offset, table };
    table.catch(() => {
      if (this.last?.table === table) this.last = undefined;
    });
    return table;
  }

  private lookup(l2Offset: number, l1Index: number): Promise<Uint8Array> {
    const hit = this.cache.get(l2Offset);
    if (hit) {
      this.cache.delete(l2Offset);
      this.cache.set(l2Offset, hit);
      return hit;
    }
    const cs = this.cs;
    if (l2Offset + cs > this.size) {
      return Promise.reject(
        new CorruptionError(`${this.filename}: L2 table at ${hex(l2Offset)} (L1 index: ${hex(l1Index)}) lies past the end of the file`, { l2Offset, l1Index }),
      );
    }
    if (l2Offset < cs) {
      return Promise.reject(new CorruptionError(`${this.filename}: L2 table at ${hex(l2Offset)} (L1 index: ${hex(l1Index)}) overlaps the header`, { l2Offset, l1Index }));
    }
    const p = readAt(this.dev, l2Offset, cs);
    this.cache.set(l2Offset, p);
    p.catch(() => this.cache.delete(l2Offset));
    if (this.cache.size > this.max) this.cache.delete(this.cache.keys().next().value as number);
    return p;
  }
}

/** Read and validate everything a Qcow2Layer needs, short of opening its backing file. */
export async function loadQcow2(dev: BlockDevice) {
  const fileSize = await dev.size();
  // The header cluster only: a read of more would pull data clusters into the page cache, and a
  // file system then reports their unwritten (fallocated) extents as data, not holes, to every
  // later SEEK_HOLE (QEMU's block status, qemu-img measure's and map's holes, would differ).
  const first = await readAt(dev, 0, Math.min(fileSize, 4096));
  const bits = first.length >= 24 ? ((first[20]! << 24) | (first[21]! << 16) | (first[22]! << 8) | first[23]!) >>> 0 : 0;
  const headBytes = bits >= 9 && bits <= 21 ? 2 ** bits : 2 * 1024 * 1024;
  const head = headBytes <= first.length ? first : await readAt(dev, 0, Math.min(fileSize, headBytes));
  const parsed = decodeHeader(head, fileSize);
  const h = parsed.header;
  const cs = 2 ** h.clusterBits;
  let snapshots: SnapshotEntry[] = [];
  let snapshotTableBytes = 0;
  if (h.nbSnapshots > 0) {
    // Entries are variable-sized: read a generous window, bounded by the file.
    const window = Math.min(fileSize - h.snapshotsOffset, h.nbSnapshots * (40 + 1024 + 65535 * 2 + 8));
    const raw = await readAt(dev, h.snapshotsOffset, window);
    const table = decodeSnapshotTable(raw, h.nbSnapshots, h.snapshotsOffset, cs, fileSize);
    snapshots = table.entries;
    snapshotTableBytes = table.size;
  }
  return { parsed, fileSize, snapshots, snapshotTableBytes };
}

/**
 * Open the qcow2 image on `dev` as a read-only layer: the header, the
 * snapshot table and the active L1 table, or a snapshot's L1 and size
 * (`view`). The caller opened the backing layer and data file, if any.
 */
export async function openQcow2Layer(
  dev: BlockDevice,
  filename: string,
  o: {
    backing?: Layer | undefined;
    dataDev?: BlockDevice | undefined;
    /** what loadQcow2 returned, when the caller needed it first */
    loaded?: Awaited<ReturnType<typeof loadQcow2>> | undefined;
    /** a snapshot's L1 table and size instead of the active ones */
    view?: { l1TableOffset: number; l1Size: number; size: number } | undefined;
  } = {},
): Promise<Qcow2Layer> {
  const { parsed, fileSize, snapshots } = o.loaded ?? (await loadQcow2(dev));
  const h = parsed.header;
  const v = o.view ?? { l1TableOffset: h.l1TableOffset, l1Size: h.l1Size, size: h.size };
  const l1 = await readAt(dev, v.l1TableOffset, v.l1Size * 8);
  return new Qcow2Layer({ filename, dev, dataDev: o.dataDev, parsed, fileSize, snapshots, l1, l1Size: v.l1Size, size: v.size, backing: o.backing });
}
