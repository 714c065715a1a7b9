/**
 * Compressed writes (qemu-io write -c): whole clusters, each into a guest
 * cluster that has no host cluster yet, deflate or zstd as the header's
 * compression type says (engine/compress.ts, QEMU's parameters), packed into shared host clusters as QEMU's qcow2_alloc_bytes does. A
 * cluster that does not compress below the cluster size is written
 * normally.
 */

import { l1IndexOf, l2IndexOf } from '../../format/header.ts';
import { QledgerError, hex } from '../../errors.ts';
import { encodeCompressedDescriptor, isCompressed, standardOffset } from '../../format/l2.ts';
import { maxRefcount } from '../../format/refcount.ts';
import { hostOf, type ClusterIndex, type GuestOffset, type HostOffset } from '../../format/offsets.ts';
import type { JournalRecord } from '../../journal/records.ts';
import { compressCluster } from '../compress.ts';
import type { Allocator } from './allocator.ts';
import type { WriteContext } from './context.ts';
import type { DataWriter } from './data-write.ts';
import type { Mapping } from './mapping.ts';

export class CompressedWriter {
  /** the host cluster compressed writes are packing into, and the bytes used */
  private tail: { cluster: ClusterIndex; used: number } | undefined;

  constructor(
    private readonly ctx: WriteContext,
    private readonly alloc: Allocator,
    private readonly mapping: Mapping,
    private readonly data: DataWriter,
    /** the header's compression type (format/features.ts) */
    private readonly compressionType: number,
  ) {}

  /**
   * Follow the record stream: once the packing cluster is freed (its last
   * compressed cluster discarded, the image emptied) it may be handed out
   * again, as data even, so nothing more is packed into it.
   */
  follow(r: JournalRecord): void {
    if (!this.tail) return;
    if (r.kind === 'refcount' && r.new === 0 && r.cluster === this.tail.cluster) this.tail = undefined;
    else if (r.kind === 'refcounts') {
      const E = this.ctx.geometry.refcountBlockEntries;
      for (let k = 0; k < r.index.length; k++) if (r.new[k] === 0 && r.rt * E + r.index[k]! === this.tail?.cluster) this.tail = undefined;
    }
  }

  /** the image's compression type */
  get type(): number {
    return this.compressionType;
  }

  /** @param pre the cluster's compressed stream made already (compress-pool.ts; undefined inside: it did not get smaller) */
  async writeCluster(guestOff: GuestOffset, piece: Uint8Array, pre?: { readonly z: Uint8Array | undefined }): Promise<void> {
    const ctx = this.ctx;
    const g = ctx.geometry;
    const cs = g.clusterSize;
    const l1Index = l1IndexOf(g, guestOff);
    const t = ctx.t();
    await this.mapping.l2ForWrite(l1Index);
    const table = t.l1TableOffset(l1Index);
    const index = l2IndexOf(g, guestOff);
    const e = this.mapping.entry(l1Index, index);
    await this.mapping.validate(e, table, index, guestOff);
    if (isCompressed(e) || standardOffset(e) !== 0) {
      // as QEMU: a compressed write never goes to a cluster that already holds data
      throw new QledgerError('E_IO', `${ctx.filename}: compressed write to guest offset ${hex(guestOff)}, which already has a host cluster`, { guestOff });
    }
    let full = piece;
    if (piece.length !== cs && !pre) {
      full = new Uint8Array(cs);
      full.set(piece);
    }
    const z = pre ? pre.z : await compressCluster(this.compressionType, full);
    if (!z) {
      await this.data.write(guestOff, piece);
      return;
    }
    // pack into the cluster the last compressed write used, while it has room (follow() forgets it once freed)
    let at: HostOffset;
    const tail = this.tail;
    const tailRefs = tail ? await this.alloc.refcount(tail.cluster) : 0;
    // a full refcount (narrow refcount_bits) starts a new cluster, as QEMU's qcow2_alloc_bytes does
    if (tail && tail.used + z.length <= cs && tailRefs > 0 && tailRefs < maxRefcount(g.refcountOrder)) {
      at = (hostOf(tail.cluster, cs) + tail.used) as HostOffset;
      await this.alloc.changeRefcount(tail.cluster, 1);
      tail.used += z.length;
    } else {
      const n = await this.alloc.allocate(1, 'data');
      at = hostOf(n, cs);
      this.tail = { cluster: n, used: z.length };
    }
    await this.data.deviceWrites([{ offset: at, data: new Uint8Array(z.buffer, z.byteOffset, z.length), length: z.length, what: 'compressed data' }]);
    this.mapping.set({ l1Index, index }, table, e, encodeCompressedDescriptor(at, z.length, g.clusterBits));
  }
}
