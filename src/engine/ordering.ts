/**
 * The ordering rules, in one place. Metadata changes accumulate as records
 * between flushes (a writeback cache, as QEMU's qcow2 caches are); at a
 * flush this module turns the records of the epoch into device writes in
 * phases separated by flush barriers:
 *
 *   phase -1 entries that lose COPIED and keep their cluster (a snapshot
 *            is about to share it): harmless while the refcount is still 1.
 *   barrier  an entry loses COPIED before its refcount goes past 1.
 *   phase 0  contents nothing points at yet: new L2 tables, new refcount
 *            blocks, a new L1 table or refcount table, and every refcount
 *            increment. (Guest and copy-on-write data went to fresh clusters
 *            before the flush began.)
 *   barrier  refcounts and data before the references that use them;
 *            a new table before the pointer that switches to it.
 *   phase 1  refcount-table entries that hook in new refcount blocks, and
 *            the header when the refcount table moved.
 *   barrier  a refcount block is reachable before anything it counts is referenced.
 *   phase 2  L2 entries, L1 entries, the header (L1 move, size, feature bits).
 *   barrier  the trees a new snapshot table names are counted first.
 *   phase 2b the header when the snapshot table changed (snapshot create,
 *            apply, delete); the bitmaps extension when the bitmap
 *            directory changed, its autoclear bit cleared a phase before
 *            when the extension's 24 bytes straddle two sectors (or the last
 *            bitmap goes) and set a phase after (or the first one comes).
 *   barrier  the change that drops a reference before the decrement that frees.
 *   phase 3  refcount decrements.
 *   barrier  a cluster's refcount is 1 on disk before an entry gains COPIED.
 *   phase 3b entries that gain COPIED (a snapshot deleted left one reference).
 *   barrier  the flush itself: everything is durable when it returns.
 *
 * A refcount block written in phase 0 holds, for each cluster, its durable
 * refcount plus every increment of the epoch (decrements held back). That
 * bound is at least the number of references in any mix of old and new
 * sectors a power cut can leave, so a crash leaks clusters at worst. Phase 3
 * then writes the exact values. Empty phases and their barriers are skipped.
 *
 * COPIED and the refcount are in different clusters, so no order keeps
 * them agreeing at every instant; phases -1 and 3b keep the only mismatch a
 * crash can leave the harmless one (COPIED clear on a cluster with one
 * reference: a write copies it first). QEMU's snapshot code can leave the
 * other one too; with the journal, recovery leaves neither.
 *
 * Tables are written by dirty 512-byte sector, compared with what is on the
 * disk, so an 8-byte change costs one sector write, not a 64 KiB table.
 *
 * Plans are built into PhaseLists (here for a write-back, by journal
 * replay for recovery) and run by the one executor, executePlan, which also
 * holds the journal's write-ahead rule and the barrier decisions. A test
 * fault (engine/faults.ts) has one hook here: it may rearrange the lists.
 */

import { hex } from '../errors.ts';
import { encodeBitmapsExtension } from '../format/bitmaps.ts';
import { AUTOCLEAR_BITMAPS } from '../format/features.ts';
import { host, type HostOffset } from '../format/offsets.ts';
import { maxRefcount, getRefcount, readRefcounts, setRefcount, writeRefcounts } from '../format/refcount.ts';
import type { MetaRecord, Word64 } from '../journal/records.ts';
import { PTrie } from '../state/ptrie.ts';
import { dirtySectors, mergeAdjacent, padSector } from './device-writes.ts';
import { OL_ACTIVE_L1, OL_ACTIVE_L2, OL_INACTIVE_L2, OL_MAIN_HEADER, OL_REFCOUNT_BLOCK, OL_REFCOUNT_TABLE } from './write/overlap.ts';
import { CHUNK_ENTRIES, l1Bytes, l1TableOffset, reftableBytes, reftableEntry, type HeaderState, type MetaState } from '../state/state.ts';

export interface DeviceWrite {
  readonly offset: HostOffset;
  readonly data: Uint8Array;
  /** what the bytes are, for traces: "l2 0x50000", "refblock 0x20000", ... */
  readonly what: string;
  /** the ordering phase the rules assign it to (traces show it; tests check barriers between them) */
  readonly category?: string | undefined;
  /**
   * The overlap kinds (write/overlap.ts, OL_*) the bytes are: the overlap
   * index refuses the write if it lands on anything else. Unset: guest data,
   * which may touch no metadata.
   */
  readonly kind?: number | undefined;
}

export interface Phase {
  readonly name: string;
  readonly writes: DeviceWrite[];
}

export interface PlanInput {
  readonly durable: MetaState;
  readonly current: MetaState;
  /** metadata records since the last flush, in order */
  readonly pending: readonly MetaRecord[];
  /** encodes the header's fixed fields for a state (one sector write) */
  readonly encodeHeader: (h: HeaderState) => Uint8Array;
  /** lazy refcounts: refcount blocks are not written (the dirty bit covers them) */
  readonly lazy: boolean;
  /** guest or COW data went to the device since the last flush */
  readonly dataWritten: boolean;
  /** test-only: a fault plan that breaks one ordering rule (engine/faults.ts) */
  readonly faults?: PhaseRearranger | undefined;
  /** where the bitmaps extension's body is in the header cluster (undefined: the header has none) */
  readonly bitmapsExt?: number | undefined;
}

/** A plan is phases; a barrier (device flush) goes after every phase that has writes, and at the end. */
export interface Plan {
  readonly phases: Phase[];
  /**
   * Lazy refcounts: refcount blocks that changed but were not written (the
   * dirty bit covers them), so the writer keeps their durable copies.
   */
  readonly lazySkipped: number[];
}

/** The four phases' writes while a plan is built, in the rules' order. */
export class PhaseLists {
  /** entries losing COPIED, before any refcount goes past 1 */
  readonly unshare: DeviceWrite[] = [];
  readonly allocate: DeviceWrite[] = [];
  readonly hook: DeviceWrite[] = [];
  readonly reference: DeviceWrite[] = [];
  /** the header with the bitmaps' autoclear bit cleared, before their extension changes in more than one sector */
  readonly disown: DeviceWrite[] = [];
  /** the header switching to a new snapshot table, the bitmaps extension to a new directory */
  readonly publish: DeviceWrite[] = [];
  /** the header with the bitmaps' autoclear bit set, once their extension is durable */
  readonly own: DeviceWrite[] = [];
  readonly free: DeviceWrite[] = [];
  /** entries gaining COPIED once the decrement that left one reference is durable */
  readonly settle: DeviceWrite[] = [];

  /**
   * The phases to run. The allocate phase is kept, empty, when guest data
   * must be made durable by its barrier; other empty phases are dropped
   * with their barriers.
   */
  phases(keepAllocate: boolean): Phase[] {
    const out: Phase[] = [];
    const add = (name: string, ws: DeviceWrite[], keep = false) => {
      if (ws.length || keep) out.push({ name, writes: ws });
    };
    add('clear COPIED', this.unshare);
    add('allocate', this.allocate, keepAllocate);
    add('hook refcount blocks', this.hook);
    add('reference', this.reference);
    add('disown bitmaps', this.disown);
    add('publish snapshot table', this.publish);
    add('own bitmaps', this.own);
    add('free', this.free);
    add('set COPIED', this.settle);
    return out;
  }

  /** Tag every write with the phase the rules assign it (before a fault may move it; traces show it). */
  tag(): void {
    const tag = (ws: DeviceWrite[], category: string) => ws.splice(0, ws.length, ...ws.map((w) => ({ ...w, category })));
    tag(this.unshare, 'clear COPIED');
    tag(this.allocate, 'allocate');
    tag(this.hook, 'hook refcount blocks');
    tag(this.reference, 'reference');
    tag(this.disown, 'disown bitmaps');
    tag(this.publish, 'publish snapshot table');
    tag(this.own, 'own bitmaps');
    tag(this.free, 'free');
    tag(this.settle, 'set COPIED');
  }
}

/** The one hook a test fault has into ordering: it may move writes between phases. */
export interface PhaseRearranger {
  rearrange(lists: PhaseLists, tablesMoved: boolean): void;
  /** fault 'moved-unshare-late': an entry that lost COPIED and moved on keeps COPIED on disk until its new value */
  readonly movedUnshareLate?: boolean | undefined;
}

/** What the executor does with a plan's writes. */
export interface PlanIO {
  write(w: DeviceWrite, phase: Phase): Promise<void>;
  /** a flush barrier: everything before it is durable before anything after it is written */
  barrier(): Promise<void>;
  /** before phase `done` (0-based) starts; may throw to stop the write-back there (a power cut in tests) */
  beforePhase?(done: number): void;
  /** after a phase's writes, before its barrier */
  afterPhase?(phase: Phase): Promise<void>;
  /** after the last phase, before the closing barrier and the checkpoint */
  afterPhases?(): Promise<void>;
}

/** The write-ahead step of a journalled write-back (engine/write/journal-session.ts). */
export interface WriteAhead {
  /** guest data went to the device since the last barrier */
  readonly dataPending: boolean;
  /** write the transaction's frames (and, the first time, the journal bit) */
  append(): Promise<void>;
  /** after the frames are durable: a step that needs its own barrier (the new header extension); true when it ran */
  afterDurable(): Promise<boolean>;
  /** mark the transaction applied (no flush of its own: replaying an applied transaction is harmless) */
  checkpoint(): Promise<void>;
}

/**
 * The writes of one phase: in order, or `concurrency` at a time (the writes
 * of a phase have no order among them). In order, writes that follow each
 * other on the device, of one kind and category, go as one request
 * (device-writes.ts): a snapshot's write-back changes every table of a tree,
 * thousands of adjacent clusters, and each request costs a system call and
 * an overlap check.
 */
async function runPhase(phase: Phase, io: PlanIO, concurrency: number): Promise<void> {
  if (concurrency <= 1) {
    for (const w of mergeAdjacent(phase.writes)) await io.write(w, phase);
    return;
  }
  for (let i = 0; i < phase.writes.length; i += concurrency) {
    await Promise.all(phase.writes.slice(i, i + concurrency).map((w) => io.write(w, phase)));
  }
}

/**
 * Run a plan, the one executor of the project. With a write-ahead step (a
 * journalled write-back): guest data is made durable before the
 * transaction that may map it, the transaction before any in-place write it
 * describes; guest data being durable already, an empty phase then needs
 * no barrier. Without one, a plan with no phase still ends in a barrier
 * (the flush itself), unless `skipEmpty` (journal replay: nothing to make
 * durable but its own writes). Returns the number of writes.
 */
export async function executePlan(phases: readonly Phase[], io: PlanIO, o: { writeAhead?: WriteAhead | undefined; concurrency?: number; skipEmpty?: boolean } = {}): Promise<number> {
  const wa = o.writeAhead;
  if (wa) {
    if (wa.dataPending) await io.barrier();
    await wa.append();
    await io.barrier();
    if (await wa.afterDurable()) await io.barrier();
  }
  const skipEmpty = (o.skipEmpty ?? false) || wa !== undefined;
  let done = 0;
  let writes = 0;
  for (const phase of phases) {
    if (skipEmpty && phase.writes.length === 0) continue;
    io.beforePhase?.(done);
    done++;
    await runPhase(phase, io, o.concurrency ?? 1);
    writes += phase.writes.length;
    await io.afterPhase?.(phase);
    await io.barrier();
  }
  await io.afterPhases?.();
  if (phases.length === 0 && !skipEmpty) await io.barrier();
  if (wa) await wa.checkpoint();
  return writes;
}

export function planFlush(p: PlanInput): Plan {
  const { durable, current, pending } = p;
  const g = current.geometry;
  const cs = g.clusterSize;
  const E = g.refcountBlockEntries;
  const lists = new PhaseLists();
  const phase0 = lists.allocate;
  const phase1 = lists.hook;
  const phase2 = lists.reference;
  const phase3 = lists.free;

  // What is new in this epoch, and the increments per refcount block.
  const newL2 = new Map<number, number>(); // slot -> offset
  const newBlocks = new Set<number>();
  // entries that gain COPIED without moving (a snapshot deleted or applied left one reference): slot -> indices
  const gainCopiedL2 = new Map<number, Chunks>();
  const gainCopiedL1: number[] = [];
  // ... and entries that lose it without moving (a snapshot created or applied will share them)
  const loseCopiedL2 = new Map<number, Chunks>();
  const loseCopiedL1: number[] = [];
  // L2 tables an L1 entry adopted (snapshot apply) and the epoch changed: slot -> table
  const changedL2 = new Map<number, number>();
  const increments = new Map<number, Map<number, number>>(); // rt -> (cluster -> sum of increments)
  const batches = new Map<number, Array<Extract<MetaRecord, { kind: 'refcounts' }>>>(); // rt -> its 'refcounts' records
  let decrements = false;
  for (const r of pending) {
    if (r.kind === 'table-new') {
      if (r.role === 'l2') newL2.set(r.slot, r.offset);
      else newBlocks.add(r.slot);
    } else if (r.kind === 'refcount') {
      if (r.new > r.old) {
        const rt = Math.floor(r.cluster / E);
        let m = increments.get(rt);
        if (!m) increments.set(rt, (m = new Map()));
        m.set(r.cluster, (m.get(r.cluster) ?? 0) + (r.new - r.old));
      } else if (r.new < r.old) decrements = true;
    } else if (r.kind === 'refcounts') {
      // applied from the record's arrays in phase 0 (a million entries need no map)
      let list = batches.get(r.rt);
      if (!list) batches.set(r.rt, (list = []));
      list.push(r);
      if (!decrements) decrements = anyDecrement(r.old, r.new);
    } else if (r.kind === 'l2s') {
      changedL2.set(r.l1Index, r.table);
      // the entries whose change is COPIED alone, by direction; a snapshot's record is all one or the other
      const { gain, lose } = copiedOnly(r.index, r.old, r.new);
      if (gain.length) pushChunk(gainCopiedL2, r.l1Index, gain);
      if (lose.length) pushChunk(loseCopiedL2, r.l1Index, lose);
    } else if (r.kind === 'l2') {
      changedL2.set(r.l1Index, r.table);
      // most records keep COPIED as it is: one test of the bit before the full comparison
      if (((r.old.hi ^ r.new.hi) & COPIED) === 0) continue;
      if (gainsCopied(r.old, r.new)) pushChunk(gainCopiedL2, r.l1Index, [r.index]);
      else if (gainsCopied(r.new, r.old)) pushChunk(loseCopiedL2, r.l1Index, [r.index]);
    } else if (r.kind === 'l1') {
      if (((r.old.hi ^ r.new.hi) & COPIED) === 0) continue;
      if (gainsCopied(r.old, r.new)) gainCopiedL1.push(r.index);
      else if (gainsCopied(r.new, r.old)) loseCopiedL1.push(r.index);
    }
  }

  const l1Moved = durable.header.l1TableOffset !== current.header.l1TableOffset;
  const reftableMoved = durable.header.refcountTableOffset !== current.header.refcountTableOffset;
  const lazySkipped: number[] = [];

  // ---- phase 0 ----
  for (const [slot, offset] of newL2) {
    const t = current.l2.get(slot);
    if (t && l1TableOffset(current, slot) === offset) phase0.push({ offset: host(offset), data: t, what: `new l2 ${hex(offset)}`, kind: OL_ACTIVE_L2 });
  }
  // An existing table an L1 entry now points at (a snapshot's, by apply) that the epoch changed (COPIED
  // cleared): written whole before the L1 entry that adopts it. Its other users are snapshots, whose
  // COPIED bits nothing judges, so the write is safe before the increments are durable too.
  for (const [slot, table] of changedL2) {
    const t = current.l2.get(slot);
    if (!t || newL2.has(slot) || l1TableOffset(current, slot) !== table || l1TableOffset(durable, slot) === table) continue;
    phase0.push({ offset: host(table), data: t, what: `l2 ${hex(table)} (adopted)`, kind: OL_ACTIVE_L2 | OL_INACTIVE_L2 });
  }
  // refcount blocks: durable value + increments (decrements wait for phase 3)
  const afterPhase0 = new Map<number, Uint8Array>();
  const max = maxRefcount(g.refcountOrder);
  for (const [rt, , cur] of PTrie.diff(durable.refblocks, current.refblocks)) {
    if (!cur) continue;
    const offset = reftableEntry(current, rt);
    if (offset === 0) continue;
    const isNew = newBlocks.has(rt) || reftableEntry(durable, rt) !== offset;
    const base = isNew ? undefined : durable.refblocks.get(rt);
    if (p.lazy && !isNew) {
      lazySkipped.push(rt);
      continue;
    }
    const view = base ? base.slice() : new Uint8Array(cs);
    for (const [cluster, inc] of increments.get(rt) ?? []) {
      const i = cluster % E;
      setRefcount(view, i, g.refcountOrder, Math.min(max, getRefcount(view, i, g.refcountOrder) + inc));
    }
    for (const b of batches.get(rt) ?? []) addIncrements(view, b.index, b.old, b.new, g.refcountOrder, max);
    if (p.lazy) view.set(cur); // a new block under lazy refcounts: its exact values, dirty bit covers it
    afterPhase0.set(rt, view);
    phase0.push(...dirtySectors(base, view, offset, `refblock ${hex(offset)}`, OL_REFCOUNT_BLOCK));
  }
  if (l1Moved) {
    const bytes = padSector(l1Bytes(current));
    phase0.push({ offset: host(current.header.l1TableOffset), data: bytes, what: `new l1 ${hex(current.header.l1TableOffset)}`, kind: OL_ACTIVE_L1 });
  }
  if (reftableMoved) {
    phase0.push({ offset: host(current.header.refcountTableOffset), data: reftableBytes(current), what: `new reftable ${hex(current.header.refcountTableOffset)}`, kind: OL_REFCOUNT_TABLE });
  }

  // ---- phase 1 ----
  const headerChanged = durable.header !== current.header;
  let headerWritten = false;
  const h = current.header;
  const snapshotsChanged = durable.header.nbSnapshots !== h.nbSnapshots || durable.header.snapshotsOffset !== h.snapshotsOffset;
  if (reftableMoved) {
    // the snapshot table switches later (phase 2b): here the header keeps the durable one
    // (and the bitmaps' autoclear bit follows their extension, phase 2b)
    const bm = bitmapsChanged(durable.header, h);
    let early = snapshotsChanged ? { ...h, nbSnapshots: durable.header.nbSnapshots, snapshotsOffset: durable.header.snapshotsOffset } : h;
    if (bm) early = { ...early, autoclearFeatures: (early.autoclearFeatures & ~AUTOCLEAR_BITMAPS) | (durable.header.autoclearFeatures & AUTOCLEAR_BITMAPS) };
    phase1.push({ offset: host(0), data: p.encodeHeader(early), what: 'header', kind: OL_MAIN_HEADER });
    headerWritten = !snapshotsChanged && !bm;
  } else {
    for (const [chunk, before, after] of PTrie.diff(durable.reftable, current.reftable)) {
      if (!after) continue;
      const start = chunk * CHUNK_ENTRIES * 8;
      const limit = current.header.refcountTableClusters * cs;
      if (start >= limit) continue;
      const n = Math.min(after.length, limit - start);
      phase1.push(...dirtySectors(before?.subarray(0, n) ?? new Uint8Array(n), after.subarray(0, n), host(current.header.refcountTableOffset + start), 'reftable', OL_REFCOUNT_TABLE));
    }
  }

  // ---- phase 2 ----
  for (const [slot, before, after] of PTrie.diff(durable.l2, current.l2)) {
    if (!after || newL2.has(slot) || !before) continue;
    const offset = l1TableOffset(current, slot);
    if (offset === 0 || offset !== l1TableOffset(durable, slot)) continue;
    stagedWrites(lists, before, after, loseCopiedL2.get(slot), gainCopiedL2.get(slot), g.l2EntrySize, offset, `l2 ${hex(offset)}`, OL_ACTIVE_L2, p.faults?.movedUnshareLate === true);
  }
  if (!l1Moved) {
    for (const [chunk, before, after] of PTrie.diff(durable.l1, current.l1)) {
      if (!after) continue;
      const start = chunk * CHUNK_ENTRIES * 8;
      const limit = current.header.l1Size * 8;
      if (start >= limit) continue;
      const n = Math.min(after.length, limit - start);
      // sector granularity inside the table; the table need not be sector-sized
      const prev = before?.subarray(0, n) ?? new Uint8Array(n);
      const next = after.subarray(0, n);
      const inChunk = (xs: number[]) => xs.filter((i) => Math.floor(i / CHUNK_ENTRIES) === chunk).map((i) => i % CHUNK_ENTRIES);
      stagedWrites(lists, prev, next, [inChunk(loseCopiedL1)], [inChunk(gainCopiedL1)], 8, host(current.header.l1TableOffset + start), 'l1', OL_ACTIVE_L1);
    }
  }
  if (headerChanged && !headerWritten && bitmapsChanged(durable.header, h)) headerWritten = planBitmapsSwitch(lists, p, durable.header, h);
  if (headerChanged && !headerWritten) (snapshotsChanged ? lists.publish : phase2).push({ offset: host(0), data: p.encodeHeader(h), what: 'header', kind: OL_MAIN_HEADER });

  // ---- phase 3 ----
  if (decrements && !p.lazy) {
    for (const [rt, view] of afterPhase0) {
      const cur = current.refblocks.get(rt)!;
      phase3.push(...dirtySectors(view, cur, reftableEntry(current, rt), `refblock ${hex(reftableEntry(current, rt))}`, OL_REFCOUNT_BLOCK));
    }
  }

  lists.tag();
  p.faults?.rearrange(lists, l1Moved || reftableMoved);
  const phases = lists.phases(p.dataWritten);
  return { phases, lazySkipped };
}

// The per-entry loops over a record's arrays are functions of their own: planFlush runs once per
// write-back, so in a fresh process its body stays unoptimised, while these, called once per record
// (thousands of times for a snapshot), are optimised early. Their arguments are the record's arrays,
// never the record: records come in many shapes, and a load through one per entry is slow.

/** whether any entry's new refcount is below its old one */
function anyDecrement(old: ArrayLike<number>, now: ArrayLike<number>): boolean {
  for (let k = 0; k < now.length; k++) if (now[k]! < old[k]!) return true;
  return false;
}

/** the indices of an `l2s` record whose entries change in their COPIED bit alone, by direction (entries as 4 words each) */
function copiedOnly(index: ArrayLike<number>, old: ArrayLike<number>, now: ArrayLike<number>): { gain: Uint32Array; lose: Uint32Array } {
  const gain = new Uint32Array(index.length);
  const lose = new Uint32Array(index.length);
  let g = 0;
  let l = 0;
  for (let k = 0; k < index.length; k++) {
    const oh = old[k * 4]!;
    const nh = now[k * 4]!;
    if (((oh ^ nh) & COPIED) === 0 || old[k * 4 + 1] !== now[k * 4 + 1] || ((oh ^ nh) & ~COPIED) !== 0) continue;
    if ((nh & COPIED) !== 0) gain[g++] = index[k]!;
    else lose[l++] = index[k]!;
  }
  return { gain: gain.subarray(0, g), lose: lose.subarray(0, l) };
}

/** a `refcounts` record's increments added to `view` in one read and one write of its entries (a decrement keeps the value) */
function addIncrements(view: Uint8Array, index: ArrayLike<number>, old: ArrayLike<number>, now: ArrayLike<number>, order: number, max: number): void {
  const vals = new Float64Array(index.length);
  readRefcounts(view, index, order, vals);
  for (let k = 0; k < vals.length; k++) {
    const inc = now[k]! - old[k]!;
    if (inc > 0) vals[k] = Math.min(max, vals[k]! + inc);
  }
  writeRefcounts(view, index, order, vals);
}

function bitmapsChanged(a: HeaderState, b: HeaderState): boolean {
  return a.nbBitmaps !== b.nbBitmaps || a.bitmapDirectorySize !== b.bitmapDirectorySize || a.bitmapDirectoryOffset !== b.bitmapDirectoryOffset || ((a.autoclearFeatures ^ b.autoclearFeatures) & AUTOCLEAR_BITMAPS) !== 0n;
}

/**
 * The bitmaps extension switched to a new directory (phase 2b). Its 24
 * bytes in one sector and the autoclear bit set before and after: one
 * write. Otherwise the bit is off on disk while the extension changes: the
 * header without it first (a phase of its own), then the extension, then
 * the header with it (unless the last bitmap went). QEMU ignores an
 * extension whose bit is clear, so no torn mix is ever read as bitmaps.
 * Returns whether the header was written (then nothing else writes it).
 */
function planBitmapsSwitch(lists: PhaseLists, p: PlanInput, old: HeaderState, h: HeaderState): boolean {
  const at = p.bitmapsExt;
  const fields = old.nbBitmaps !== h.nbBitmaps || old.bitmapDirectorySize !== h.bitmapDirectorySize || old.bitmapDirectoryOffset !== h.bitmapDirectoryOffset;
  if (at === undefined && !fields) return false; // the bit alone (an open clearing a bit that names no extension): a plain header write
  if (at === undefined) throw new Error('internal error: the bitmap directory changed but the header has no bitmaps extension');
  const ext: DeviceWrite = { offset: host(at), data: encodeBitmapsExtension(h.nbBitmaps, h.bitmapDirectorySize, h.bitmapDirectoryOffset), what: 'bitmaps extension', kind: OL_MAIN_HEADER };
  const wasOn = (old.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n;
  const on = (h.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n;
  const oneSector = Math.floor(at / 512) === Math.floor((at + 23) / 512);
  const header = (x: HeaderState, what: string): DeviceWrite => ({ offset: host(0), data: p.encodeHeader(x), what, kind: OL_MAIN_HEADER });
  if (wasOn && on && oneSector) {
    lists.publish.push(ext);
    const same = Buffer.from(p.encodeHeader(old)).equals(p.encodeHeader(h));
    if (!same) lists.publish.push(header(h, 'header'));
    return true;
  }
  if (wasOn) lists.disown.push(header({ ...h, autoclearFeatures: h.autoclearFeatures & ~AUTOCLEAR_BITMAPS }, 'header (bitmaps disowned)'));
  lists.publish.push(ext);
  if (on) lists.own.push(header(h, 'header (bitmaps owned)'));
  return true;
}

/** An entry gains COPIED and keeps its offset (the word's top bit is COPIED in L1 and L2 entries alike). */
function gainsCopied(old: Word64, next: Word64): boolean {
  return (old.hi & COPIED) === 0 && (next.hi & COPIED) !== 0 && (old.hi | COPIED) >>> 0 === next.hi >>> 0 && old.lo === next.lo;
}

const COPIED = 0x8000_0000;

/** Entry indices of one table, as the records gave them: arrays, not one array copied together. */
type Chunks = ArrayLike<number>[];

function pushChunk(m: Map<number, Chunks>, k: number, v: ArrayLike<number>): void {
  let xs = m.get(k);
  if (!xs) m.set(k, (xs = []));
  xs.push(v);
}

/**
 * The writes that take a table from `before` to `after` in up to three
 * stages: entries losing COPIED first (phase -1), everything else (phase
 * 2), entries gaining COPIED last (phase 3b). `lose` and `gain` are entry
 * indices within the tables that records named; a gain counts only if the
 * entry kept its cluster, a lose also when the entry moved on afterwards
 * (its durable value loses COPIED first).
 */
function stagedWrites(lists: PhaseLists, before: Uint8Array, after: Uint8Array, lose: Chunks | undefined, gain: Chunks | undefined, entrySize: number, base: HostOffset, what: string, kind: number, movedLate = false): void {
  const first = lose?.some((c) => c.length) ? withCopiedFrom(before, before, after, lose, entrySize, false, movedLate) : before;
  const mid = gain?.some((c) => c.length) ? withCopiedFrom(after, before, after, gain, entrySize, true) : after;
  if (first !== before) lists.unshare.push(...dirtySectors(before, first, base, `${what} (COPIED cleared)`, kind));
  lists.reference.push(...dirtySectors(first, mid, base, what, kind));
  if (mid !== after) lists.settle.push(...dirtySectors(mid, after, base, `${what} (COPIED set)`, kind));
}

/**
 * `table` (a copy when anything changes) with the COPIED bit of the
 * `indices` entries that go from `before` to `after` by COPIED alone taken
 * from `before` (gain: the bit kept off) or from `after` (lose: cleared early).
 */
function withCopiedFrom(table: Uint8Array, before: Uint8Array, after: Uint8Array, chunks: Chunks, entrySize: number, gain: boolean, movedLate = false): Uint8Array {
  let out: Uint8Array | undefined;
  for (const indices of chunks) {
    for (let k = 0; k < indices.length; k++) {
      const o = indices[k]! * entrySize;
      if (o + 8 > after.length || o + 8 > before.length) continue;
      const a = (after[o]! & 0x80) !== 0;
      const b = (before[o]! & 0x80) !== 0;
      if (!gain && !movedLate && b && (a || (after[o]! & 0x7f) !== (before[o]! & 0x7f) || !sameLow(before, after, o))) {
        // An entry lost COPIED during the epoch (its cluster became shared) and then moved on (a
        // write copied the shared cluster away). Its durable value still has COPIED while this
        // write-back raises the old cluster's refcount past 1: clear the bit there first all the
        // same. Clearing COPIED early is always the harmless mismatch.
        out ??= table.slice();
        out[o] = out[o]! & 0x7f;
        continue;
      }
      if (a === b || a !== gain || (after[o]! & 0x7f) !== (before[o]! & 0x7f)) continue;
      if (!sameLow(before, after, o)) continue; // the entry moved: a new mapping, ordered as one
      out ??= table.slice();
      out[o] = out[o]! & 0x7f;
    }
  }
  return out ?? table;
}

/** Bytes 1..7 of the entries at `o` agree (the offset's low bytes and flags). */
function sameLow(x: Uint8Array, y: Uint8Array, o: number): boolean {
  for (let k = 1; k < 8; k++) if (x[o + k] !== y[o + k]) return false;
  return true;
}
