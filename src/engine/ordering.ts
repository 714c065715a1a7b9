/**
 * The ordering rules, in one place. Metadata changes accumulate as records
 * between flushes (a writeback cache, as QEMU's qcow2 caches are); at a
 * flush this module turns the records of the epoch into device writes in
 * phases separated by flush barriers:
 *
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
 *   barrier  the change that drops a reference before the decrement that frees.
 *   phase 3  refcount decrements.
 *   barrier  the flush itself: everything is durable when it returns.
 *
 * A refcount block written in phase 0 holds, for each cluster, its durable
 * refcount plus every increment of the epoch (decrements held back). That
 * bound is at least the number of references in any mix of old and new
 * sectors a power cut can leave, so a crash leaks clusters at worst. Phase 3
 * then writes the exact values. Empty phases and their barriers are skipped.
 *
 * Tables are written by dirty 512-byte sector, compared with what is on the
 * disk, so an 8-byte change costs one sector write, not a 64 KiB table.
 */

import { maxRefcount, getRefcount, setRefcount } from '../format/refcount.ts';
import type { MetaRecord } from '../journal/records.ts';
import { PTrie } from '../state/ptrie.ts';
import { CHUNK_ENTRIES, l1Bytes, l1TableOffset, reftableBytes, reftableEntry, type HeaderState, type MetaState } from '../state/state.ts';

/**
 * Test-only fault switches: each breaks one ordering rule, so the crash
 * harness can show it catches the breakage (a harness that cannot fail
 * proves nothing). Never set outside tests and `crash-test --fault`.
 */
export const FAULTS = {
  'l2-before-refcount': 'L1/L2 entries are written with the refcount increments, no barrier between',
  'free-before-unmap': 'refcount decrements are written before the L2/L1 change that drops the reference',
  'header-before-table': 'the header switches to a new L1 or refcount table before the table is durable',
  'data-after-mapping': 'guest data reaches the device only after the L2 entry that maps it',
  'reuse-before-durable': 'a cluster freed since the last flush may be reallocated at once',
} as const;
export type Fault = keyof typeof FAULTS;

export interface DeviceWrite {
  readonly offset: number;
  readonly data: Uint8Array;
  /** what the bytes are, for traces: "l2 0x50000", "refblock 0x20000", ... */
  readonly what: string;
  /** the ordering phase the rules assign it to (traces show it; tests check barriers between them) */
  readonly category?: string | undefined;
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
  readonly fault?: Fault | undefined;
}

/** A plan is phases; a barrier (device flush) goes after every phase that has writes, and at the end. */
export interface Plan {
  readonly phases: Phase[];
  /** refcount blocks as written (exact values), so the writer can mark them durable */
  readonly lazySkipped: number[];
}

const SECTOR = 512;

/** Writes for the sectors of `next` that differ from `prev` (all of them when prev is undefined). */
export function dirtySectors(prev: Uint8Array | undefined, next: Uint8Array, base: number, what: string): DeviceWrite[] {
  if (!prev) return [{ offset: base, data: next, what }];
  const out: DeviceWrite[] = [];
  const a = Buffer.from(prev.buffer, prev.byteOffset, prev.byteLength);
  let runStart = -1;
  for (let o = 0; o < next.length; o += SECTOR) {
    const end = Math.min(next.length, o + SECTOR);
    const differs = end > prev.length || a.compare(next, o, end, o, end) !== 0;
    if (differs && runStart < 0) runStart = o;
    if (!differs && runStart >= 0) {
      out.push({ offset: base + runStart, data: next.subarray(runStart, o), what });
      runStart = -1;
    }
  }
  if (runStart >= 0) out.push({ offset: base + runStart, data: next.subarray(runStart), what });
  return out;
}

export function planFlush(p: PlanInput): Plan {
  const { durable, current, pending } = p;
  const g = current.geometry;
  const cs = g.clusterSize;
  const E = g.refcountBlockEntries;
  const phase0: DeviceWrite[] = [];
  const phase1: DeviceWrite[] = [];
  const phase2: DeviceWrite[] = [];
  const phase3: DeviceWrite[] = [];

  // What is new in this epoch, and the increments per refcount block.
  const newL2 = new Map<number, number>(); // slot -> offset
  const newBlocks = new Set<number>();
  const increments = new Map<number, Map<number, number>>(); // rt -> (cluster -> sum of increments)
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
    }
  }

  const l1Moved = durable.header.l1Offset !== current.header.l1Offset;
  const reftableMoved = durable.header.reftableOffset !== current.header.reftableOffset;
  const lazySkipped: number[] = [];

  // ---- phase 0 ----
  for (const [slot, offset] of newL2) {
    const t = current.l2.get(slot);
    if (t && l1TableOffset(current, slot) === offset) phase0.push({ offset, data: t, what: `new l2 ${hex(offset)}` });
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
    if (p.lazy) view.set(cur); // a new block under lazy refcounts: its exact values, dirty bit covers it
    afterPhase0.set(rt, view);
    phase0.push(...dirtySectors(base, view, offset, `refblock ${hex(offset)}`));
  }
  if (l1Moved) {
    const bytes = padSector(l1Bytes(current));
    phase0.push({ offset: current.header.l1Offset, data: bytes, what: `new l1 ${hex(current.header.l1Offset)}` });
  }
  if (reftableMoved) {
    phase0.push({ offset: current.header.reftableOffset, data: reftableBytes(current), what: `new reftable ${hex(current.header.reftableOffset)}` });
  }

  // ---- phase 1 ----
  const headerChanged = durable.header !== current.header;
  let headerWritten = false;
  if (reftableMoved) {
    phase1.push({ offset: 0, data: p.encodeHeader(current.header), what: 'header' });
    headerWritten = true;
  } else {
    for (const [chunk, before, after] of PTrie.diff(durable.reftable, current.reftable)) {
      if (!after) continue;
      const start = chunk * CHUNK_ENTRIES * 8;
      const limit = current.header.reftableClusters * cs;
      if (start >= limit) continue;
      const n = Math.min(after.length, limit - start);
      phase1.push(...dirtySectors(before?.subarray(0, n) ?? new Uint8Array(n), after.subarray(0, n), current.header.reftableOffset + start, 'reftable'));
    }
  }

  // ---- phase 2 ----
  for (const [slot, before, after] of PTrie.diff(durable.l2, current.l2)) {
    if (!after || newL2.has(slot) || !before) continue;
    const offset = l1TableOffset(current, slot);
    if (offset === 0 || offset !== l1TableOffset(durable, slot)) continue;
    phase2.push(...dirtySectors(before, after, offset, `l2 ${hex(offset)}`));
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
      phase2.push(...dirtySectors(prev, after.subarray(0, n), current.header.l1Offset + start, 'l1'));
    }
  }
  if (headerChanged && !headerWritten) phase2.push({ offset: 0, data: p.encodeHeader(current.header), what: 'header' });

  // ---- phase 3 ----
  if (decrements && !p.lazy) {
    for (const [rt, view] of afterPhase0) {
      const cur = current.refblocks.get(rt)!;
      phase3.push(...dirtySectors(view, cur, reftableEntry(current, rt), `refblock ${hex(reftableEntry(current, rt))}`));
    }
  }

  const tag = (ws: DeviceWrite[], category: string) => ws.splice(0, ws.length, ...ws.map((w) => ({ ...w, category })));
  tag(phase0, 'allocate');
  tag(phase1, 'hook refcount blocks');
  tag(phase2, 'reference');
  tag(phase3, 'free');
  if (p.fault === 'l2-before-refcount') {
    phase0.unshift(...phase2.splice(0), ...phase1.splice(0));
  } else if (p.fault === 'free-before-unmap' && phase3.length) {
    phase0.unshift(...phase3.splice(0));
  } else if (p.fault === 'header-before-table' && (l1Moved || reftableMoved)) {
    const at = [...phase1, ...phase2].find((w) => w.what === 'header');
    if (at) {
      for (const list of [phase1, phase2]) {
        const i = list.indexOf(at);
        if (i >= 0) list.splice(i, 1);
      }
      phase0.unshift(at);
    }
  }
  const phases: Phase[] = [];
  if (phase0.length || p.dataWritten) phases.push({ name: 'allocate', writes: phase0 });
  if (phase1.length) phases.push({ name: 'hook refcount blocks', writes: phase1 });
  if (phase2.length) phases.push({ name: 'reference', writes: phase2 });
  if (phase3.length) phases.push({ name: 'free', writes: phase3 });
  return { phases, lazySkipped };
}

/** `b` zero-padded to whole 512-byte sectors (an L1 table need not be sector-sized). */
export function padSector(b: Uint8Array): Uint8Array {
  const n = Math.ceil(b.length / SECTOR) * SECTOR;
  if (n === b.length) return b;
  const out = new Uint8Array(n);
  out.set(b);
  return out;
}

function hex(n: number): string {
  return '0x' + n.toString(16);
}
