/**
 * The write-back: the metadata records held since the last one become
 * device writes, planned and executed by ordering.ts (with the journal's
 * write-ahead step when the session is journalled), then the durable state
 * catches up, freed clusters are given back and the table cache is trimmed.
 * Also the lazy-refcount end of a session: exact refcount blocks, then the
 * header without the dirty bit.
 */

import { QledgerError, hex } from '../../errors.ts';
import { COMPAT_LAZY_REFCOUNTS } from '../../format/features.ts';
import type { JournalRecord, MetaRecord } from '../../journal/records.ts';
import { PTrie } from '../../state/ptrie.ts';
import { Transaction } from '../../state/state.ts';
import type { FaultPlan } from '../faults.ts';
import { executePlan, planFlush, type Phase, type PlanIO } from '../ordering.ts';
import type { Allocator } from './allocator.ts';
import type { WriteContext } from './context.ts';
import type { JournalSession } from './journal-session.ts';
import { OL_REFCOUNT_BLOCK, type OverlapIndex } from './overlap.ts';
import type { TableCache } from './tables.ts';

export class WriteBack {
  /** metadata records since the last write-back, in order */
  private pending: MetaRecord[] = [];

  constructor(
    private readonly ctx: WriteContext,
    private readonly alloc: Allocator,
    private readonly tables: TableCache,
    private readonly journal: JournalSession,
    private readonly overlap: OverlapIndex,
    private readonly faults: FaultPlan | undefined,
    /** hold at most this many records before writing them back */
    private readonly maxRecords: number,
    /** test-only: stop a write-back after this many phases, as a power cut would (the writer is dead afterwards) */
    public stopAfterPhase: number | undefined,
  ) {}

  /** Follow the record stream: every metadata record waits for the next write-back. */
  follow(r: JournalRecord): void {
    if (r.kind === 'refcount' || r.kind === 'refcounts' || r.kind === 'l2' || r.kind === 'l2s' || r.kind === 'l1' || r.kind === 'l1-swap' || r.kind === 'reftable' || r.kind === 'reftable-swap' || r.kind === 'table-new' || r.kind === 'header') {
      this.pending.push(r);
    }
  }

  get lazyRefcounts(): boolean {
    return (this.ctx.header().compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
  }

  /** Write back early when enough records wait (or the journal would overflow). */
  async maybe(): Promise<void> {
    if (this.pending.length >= this.maxRecords || this.journal.full()) await this.flush();
  }

  async barrier(): Promise<void> {
    const ctx = this.ctx;
    ctx.extent.barrierDone();
    await ctx.files.image.flush();
    if (ctx.files.data) await ctx.files.data.flush();
    ctx.trace.record({ kind: 'barrier' });
    ctx.trace.flush();
  }

  async flush(): Promise<void> {
    const ctx = this.ctx;
    if (ctx.closed) return;
    // before anything is planned: starting the journal may move the backing file name in the header
    await this.journal.prepare(this.pending.length);
    const lazy = this.lazyRefcounts;
    if (lazy && !ctx.headerBits.dirtyOnDisk && this.pending.some((r) => r.kind === 'refcount' || r.kind === 'refcounts')) await ctx.headerBits.markDirty(ctx.durable.header);
    const plan = planFlush({
      durable: ctx.durable,
      current: ctx.cur,
      pending: this.pending,
      encodeHeader: (h) => ctx.headerBits.encode(h),
      lazy,
      dataWritten: ctx.extent.dataWritten,
      faults: this.faults,
      bitmapsExt: ctx.bitmapsExt,
    });
    ctx.trace.record({ kind: 'begin', tx: 0, op: 'writeback' });
    // Every cluster an entry may point at must exist in the file.
    // (Nothing pending, or header fields only: nothing new points anywhere, and a file QEMU
    // left with a partial last cluster stays as it is: an open that writes nothing changes nothing.)
    const needed = ctx.extent.endCluster * ctx.geometry.clusterSize;
    if (this.pending.some((r) => r.kind !== 'header') && (await ctx.files.image.size()) < needed) {
      await ctx.files.image.truncate(needed);
      ctx.trace.truncate(needed);
    }
    const onHeld = (w: { offset: number; length: number }) => ctx.trace.write(w.offset, w.length, 'data (held back by fault)');
    const io: PlanIO = {
      write: async (w, phase: Phase) => {
        // checked against the overlap index as the kind of structure it is (guest data if unset)
        await ctx.files.image.writeAs(w.offset, w.data, w.kind ?? 0, w.what);
        ctx.trace.write(w.offset, w.data.length, `${w.what} [${w.category ?? phase.name}]`);
      },
      barrier: () => this.barrier(),
      beforePhase: (done) => {
        if (this.stopAfterPhase === undefined || done < this.stopAfterPhase) return;
        ctx.closed = true;
        throw new QledgerError('E_IO', `${ctx.filename}: write-back stopped after ${done} phases (stopAfterPhase)`);
      },
      afterPhase: async (phase) => this.faults?.afterPhase(phase, onHeld),
      afterPhases: async () => this.faults?.afterPhase(undefined, () => {}),
    };
    await executePlan(plan.phases, io, { writeAhead: this.journal.writeAhead(this.pending, ctx.durable.header, lazy) });
    this.journal.written();
    let durable = ctx.cur;
    if (plan.lazySkipped.length) {
      // not written: their durable copies stay what the disk holds
      const ed = durable.refblocks.edit();
      for (const rt of plan.lazySkipped) ed.set(rt, ctx.durable.refblocks.get(rt));
      durable = { ...durable, refblocks: ed.finish() };
    }
    ctx.durable = durable;
    ctx.trace.record({ kind: 'commit', tx: 0 });
    this.pending = [];
    ctx.extent.dataWritten = false;
    // what the disk no longer points at stops being metadata only now (before the freed space is given back)
    this.overlap.durable();
    await this.alloc.afterWriteback();
    this.tables.evictClean();
  }

  /** Lazy refcounts: write every refcount block exactly, then clear the dirty bit. */
  async cleanDirty(): Promise<void> {
    const ctx = this.ctx;
    const cs = ctx.geometry.clusterSize;
    let wrote = false;
    for (const [rt, , cur] of PTrie.diff(ctx.durable.refblocks, ctx.cur.refblocks)) {
      if (!cur) continue;
      const off = new Transaction(ctx.cur).reftableEntry(rt);
      if (!off) continue;
      await ctx.files.image.writeAs(off, cur, OL_REFCOUNT_BLOCK, `refblock ${hex(off)}`);
      ctx.trace.write(off, cs, `refblock ${hex(off)}`);
      wrote = true;
    }
    if (wrote) await this.barrier();
    ctx.durable = ctx.cur;
    this.overlap.durable();
    await ctx.headerBits.markClean(ctx.cur.header);
    await this.barrier();
  }
}
