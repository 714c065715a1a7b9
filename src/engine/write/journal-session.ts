/**
 * The durable journal of one read-write session (journal-format.md): the
 * stream of records and operation markers since the last write-back (it
 * follows the context's record stream), starting the journal at the first
 * write-back that changes metadata, and the write-ahead step each
 * journalled write-back runs before its in-place phases.
 */

import { IoError } from '../../errors.ts';
import { encodedLength } from '../../journal/codec.ts';
import type { JournalRecord, MetaRecord } from '../../journal/records.ts';
import { l1Bytes, l1TableOffset, reftableBytes } from '../../state/state.ts';
import type { HeaderState } from '../../state/state.ts';
import { activateJournal, removeHeaderExtension, type JournalLog, type JournalPlan } from '../journal/live.ts';
import type { WriteAhead } from '../ordering.ts';
import type { FaultPlan } from '../faults.ts';
import { host } from '../../format/offsets.ts';
import { EXT_BITMAPS, EXT_JOURNAL } from '../../format/features.ts';
import { findExtension } from '../../format/extension-insert.ts';
import { readAt } from '../../io/device.ts';
import type { WriteContext } from './context.ts';
import { OL_JOURNAL, OL_MAIN_HEADER, type OverlapIndex } from './overlap.ts';

export class JournalSession {
  private log: JournalLog | undefined;
  /** the journal is started and its bit durable in the header: write-backs are journalled */
  private live = false;
  /** after the first transaction's flush: make the new extension part of the header */
  private finish: (() => Promise<void>) | undefined;
  private stream: JournalRecord[] = [];
  private streamBytes = 0;

  constructor(
    private readonly ctx: WriteContext,
    private readonly overlap: OverlapIndex,
    /** where the journal goes; undefined: no journal (v2, switched off, or no room for it) */
    private plan: JournalPlan | undefined,
    private readonly extensions: Parameters<typeof activateJournal>[4],
    private readonly onWarning: ((message: string) => void) | undefined,
    private readonly faults?: FaultPlan | undefined,
  ) {
    // the journal area has refcount 0 (QEMU must not count it): the allocator and overlap checks skip it by the index
    if (plan?.reuse) overlap.reserve(host(plan.reuse.offset), plan.reuse.size, OL_JOURNAL);
  }

  get journalled(): boolean {
    return this.live;
  }

  /** The journal will be kept: a plan exists (it may not have started yet). */
  get planned(): boolean {
    return this.plan !== undefined;
  }

  /** Run `fn` with the journal out of the way (a change too small to journal, made before it starts). */
  async without(fn: () => Promise<void>): Promise<void> {
    const plan = this.plan;
    this.plan = undefined;
    try {
      await fn();
    } finally {
      this.plan = plan;
    }
  }

  /** Follow the record stream: metadata records and operation markers, while a journal is planned. */
  follow(r: JournalRecord): void {
    if (!this.plan) return;
    if (r.kind === 'commit') {
      // an operation that changed no metadata leaves nothing in the stream
      const last = this.stream[this.stream.length - 1];
      if (last?.kind === 'begin' && last.tx === r.tx) {
        this.stream.pop();
        this.streamBytes -= encodedLength(last);
        return;
      }
    }
    this.stream.push(r);
    this.streamBytes += encodedLength(r);
  }

  /** A write-back must fit the journal: it goes at half the capacity (the images of moved tables come on top). */
  full(): boolean {
    const capacity = this.log?.capacity ?? (this.plan ? (this.plan.reuse?.size ?? this.plan.bytes) - 512 : Infinity);
    return this.streamBytes >= capacity / 2;
  }

  /** Before a write-back with metadata: start the journal if it is planned and not started. */
  async prepare(pending: number): Promise<void> {
    if (this.plan && !this.live && pending) await this.start();
  }

  /**
   * Start the journal: the area (reused, or new past every cluster
   * allocated so far) and its header, and the header extension's body; the
   * autoclear bit and the extension itself follow with the first
   * transaction. Before the bit is durable no transaction is trusted.
   */
  private async start(): Promise<void> {
    const ctx = this.ctx;
    const plan = this.plan!;
    const cs = ctx.geometry.clusterSize;
    let ext = plan.reuse;
    const extent = { endCluster: ctx.extent.endCluster, zeroFrom: ctx.extent.zeroFrom };
    if (!ext) {
      const at = Math.max(ctx.extent.endCluster, ctx.extent.zeroFrom / cs);
      ext = { offset: at * cs, size: plan.bytes };
      this.overlap.reserve(host(ext.offset), ext.size, OL_JOURNAL);
      ctx.extent.endCluster = at + plan.bytes / cs;
      ctx.extent.zeroFrom = Math.max(ctx.extent.zeroFrom, ext.offset + ext.size);
    }
    // the journal's view of the image: its area, and the header cluster for its extension
    const sizeBefore = await ctx.files.image.size();
    let started: Awaited<ReturnType<typeof activateJournal>>;
    try {
      started = await activateJournal(ctx.files.image.as(OL_JOURNAL | OL_MAIN_HEADER, 'journal'), cs, ext, plan, this.extensions);
    } catch (e) {
      // A full disk (or a failing one) must not cost the write-back the journal was to protect: every
      // write the guest was told is done would be lost with it. The session goes on without a journal;
      // what activation wrote is valid at every step (nothing names the area until the first transaction).
      if (!(e instanceof IoError)) throw e;
      this.plan = undefined;
      if (!plan.reuse) {
        this.overlap.unreserve(host(ext.offset), ext.size, OL_JOURNAL);
        ctx.extent.endCluster = extent.endCluster;
        // zeroFrom stays past the area: the failed write of its header may have reached the device in part,
        // so a data cluster placed there later must get its zeroes written, not assumed
      }
      this.onWarning?.(`${ctx.filename}: the journal could not start (${e.message}); writing without a journal`);
      return;
    }
    ctx.trace.write(ext.offset, 512, 'journal area header [journal set-up]');
    if (!started) {
      // nothing names the area: it goes again, and so does the file's growth to hold it
      this.plan = undefined;
      if (!plan.reuse) {
        this.overlap.unreserve(host(ext.offset), ext.size, OL_JOURNAL);
        ctx.extent.endCluster = extent.endCluster;
        ctx.extent.zeroFrom = extent.zeroFrom;
        // (only the area's part: what was allocated before it may lie past the old end, not written yet)
        const to = Math.max(sizeBefore, ext.offset);
        if ((await ctx.files.image.size()) > to) await ctx.files.image.truncate(to);
      }
      this.onWarning?.(`${ctx.filename}: no room for the journal header extension in the header cluster; writing without a journal`);
      return;
    }
    // the extension may have moved the backing file name: the header template follows
    await ctx.headerBits.reload();
    this.log = started.log;
    this.finish = started.finish;
    // every header written from now on carries the bit (this write-back's plan included)
    ctx.headerBits.journalStarted();
    this.live = true;
  }

  /** The write-ahead step for a write-back of `pending` records, or undefined when it is not journalled. */
  writeAhead(pending: readonly MetaRecord[], durableHeader: HeaderState, lazy = false): WriteAhead | undefined {
    const log = this.log;
    if (!log || !this.live || pending.length === 0) return undefined;
    const ctx = this.ctx;
    let tx = 0;
    // Data since the last barrier may share the frames' flush (journal-format.md, "Write protocol"):
    // written into clusters this transaction allocates (recovery then sees whether the refcount
    // increments, written after that flush, reached the disk), or else every byte of it checksummed
    // (recovery drops a transaction whose data does not read back). Test faults: 'unsummed-data'
    // shares the flush with neither; 'fresh-data-any' takes any data as written into new clusters.
    const ranges = ctx.extent.dataSinceBarrier ? ctx.extent.dataRanges : [];
    const fresh = !lazy && ranges !== undefined && ranges.length > 0 && (this.faults?.freshDataAny === true || allocatedHere(ranges, pending, ctx.geometry.clusterSize, ctx.geometry.refcountBlockEntries));
    const sums = ctx.extent.dataSinceBarrier ? ctx.extent.dataSums : [];
    const unsummed = this.faults?.unsummedData === true;
    const shared = unsummed || fresh || sums !== undefined;
    const carried = unsummed ? [] : fresh ? ranges : (sums ?? []);
    return {
      dataPending: ctx.extent.dataSinceBarrier && !shared,
      append: async () => {
        const r = await log.append([...this.stream, ...this.tableImages(pending), ...carried], pending.length, this.streamBytes + carried.length * 24);
        tx = r.tx;
        ctx.trace.write(log.ext.offset, r.bytes, `journal tx ${r.tx}${r.fits ? '' : ' (unjournalled: too big)'} [journal]`);
        // The first transaction carries the autoclear bit in the same flush: a bit
        // without frames, or frames without the new area header (so of another
        // generation), or without the extension, replay nothing, and no in-place
        // write has started.
        await ctx.headerBits.writeJournalBit(durableHeader);
      },
      afterDurable: async () => {
        if (!this.finish) return false;
        // a new extension becomes part of the header only now that the bit, the
        // area header, the extension's body and the frames are durable
        await this.finish();
        ctx.trace.write(0, 8, 'header extension (journal) [journal set-up]');
        this.finish = undefined;
        return true;
      },
      checkpoint: async () => {
        await log.checkpoint(tx);
        ctx.trace.write(log.ext.offset, 512, `journal checkpoint tx ${tx} [checkpoint]`);
      },
    };
  }

  /**
   * Take the journal out of the image, so that the file can be cut below
   * its area (make_empty, when the area is what keeps the file long). The
   * caller's write-back is flushed: the journal holds nothing that is not
   * in place; its checkpoint is made durable. The autoclear bit goes next, flushed: from then on the
   * journal is stale and never replayed. Then the extension leaves the
   * header's list by writes that keep the list valid after each, flushed
   * (format/extension-insert.ts); only after that may the file be cut. The
   * next write-back that changes metadata starts a new journal past
   * everything in use. Either order of the two steps would be safe (a bit
   * without an extension names nothing; an extension without the bit is
   * stale); the file cut must come after both are durable, or a crash
   * leaves a live journal whose area lies past the end of the file.
   */
  async retire(durable: HeaderState, faults?: { cut?: (() => Promise<void>) | undefined; noCheckpoint?: boolean }): Promise<boolean> {
    const log = this.log;
    if (!log || !this.live || !this.plan) return false;
    const ctx = this.ctx;
    const faultCut = faults?.cut;
    // the last write-back's checkpoint (written without a flush) durable first: a journal whose bit is
    // clear and that still holds a committed transaction past its checkpoint reads as stale
    if (!faults?.noCheckpoint) {
      await ctx.files.image.flush();
      ctx.trace.flush();
    }
    if (faultCut) {
      // test fault 'cut-before-journal-retired': the area given up, and the file cut, first
      this.overlap.unreserve(host(log.ext.offset), log.ext.size, OL_JOURNAL);
      await faultCut();
    }
    await ctx.headerBits.clearJournalBit(durable);
    const dev = ctx.files.image.as(OL_MAIN_HEADER, 'journal');
    await removeHeaderExtension(dev, ctx.geometry.clusterSize, EXT_JOURNAL, (offset, length) => {
      ctx.trace.write(offset, length, 'header extension list (journal removed) [journal retired]');
      ctx.trace.flush();
    });
    await ctx.headerBits.reload();
    // the extensions after the journal's moved down: the bitmaps extension's body is elsewhere now
    if (ctx.bitmapsExt !== undefined) {
      const b = findExtension(await readAt(dev, 0, ctx.geometry.clusterSize), EXT_BITMAPS);
      ctx.bitmapsExt = b && b.length === 24 ? b.offset + 8 : undefined;
    }
    if (!faultCut) this.overlap.unreserve(host(log.ext.offset), log.ext.size, OL_JOURNAL);
    this.log = undefined;
    this.live = false;
    this.finish = undefined;
    this.plan = { reuse: undefined, extPresent: false, bytes: this.plan.bytes };
    return true;
  }

  /** The journal's area, while it is started. */
  get area(): { readonly offset: number; readonly size: number } | undefined {
    return this.log?.ext;
  }

  /** A write-back is done: the stream starts again. */
  written(): void {
    this.stream = [];
    this.streamBytes = 0;
  }

  /** A clean close: the frames are no longer needed, their space goes back to the file system. */
  async close(): Promise<void> {
    if (this.log) await this.ctx.files.image.as(OL_JOURNAL, 'journal').discard(this.log.ext.offset + 512, this.log.ext.size - 512);
  }

  /**
   * What recovery cannot read back from the image safely: the final content
   * of a moved L1 or refcount table (the old one may be reused once freed)
   * and of an L2 table copied from a snapshot's.
   */
  private tableImages(pending: readonly MetaRecord[]): JournalRecord[] {
    const out: JournalRecord[] = [];
    const cur = this.ctx.cur;
    if (pending.some((r) => r.kind === 'l1-swap')) out.push({ kind: 'image', role: 'l1', offset: cur.header.l1TableOffset, bytes: l1Bytes(cur) });
    if (pending.some((r) => r.kind === 'reftable-swap')) out.push({ kind: 'image', role: 'reftable', offset: cur.header.refcountTableOffset, bytes: reftableBytes(cur) });
    for (const r of pending) {
      if (r.kind !== 'table-new' || r.role !== 'l2' || r.copyOf === 0 || l1TableOffset(cur, r.slot) !== r.offset) continue;
      const t = cur.l2.get(r.slot);
      if (t) out.push({ kind: 'image', role: 'l2', offset: r.offset, bytes: t });
    }
    return out;
  }
}

/**
 * Whether every cluster of `ranges` is one the pending records allocate:
 * its first refcount record starts from 0 and its last ends above 0.
 */
function allocatedHere(ranges: readonly { readonly host: number; readonly length: number }[], pending: readonly MetaRecord[], cs: number, blockEntries: number): boolean {
  const first = new Map<number, number>();
  const last = new Map<number, number>();
  for (const r of pending) {
    if (r.kind === 'refcount') {
      if (!first.has(r.cluster)) first.set(r.cluster, r.old);
      last.set(r.cluster, r.new);
    } else if (r.kind === 'refcounts') {
      const { index, old, new: now } = r;
      for (let k = 0; k < index.length; k++) {
        const c = r.rt * blockEntries + index[k]!;
        if (!first.has(c)) first.set(c, old[k]!);
        last.set(c, now[k]!);
      }
    }
  }
  for (const r of ranges) {
    for (let c = Math.floor(r.host / cs); c <= Math.floor((r.host + r.length - 1) / cs); c++) {
      if (first.get(c) !== 0 || !((last.get(c) ?? 0) > 0)) return false;
    }
  }
  return true;
}
