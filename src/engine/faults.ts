/**
 * Test-only fault switches, behind one injected plan: each breaks one
 * ordering rule so that the crash harness can show it catches the breakage
 * (a harness that cannot fail proves nothing). Never set outside tests and
 * `crash-test --fault`. Production code holds one hook per rule: the
 * ordering planner calls `rearrange`, the allocator asks `reuseFreedAtOnce`,
 * `reuseFreedMetadata` and `wrongCluster`, the data path writes through
 * `dataDevice` and the write-back calls `afterPhase`. The last four faults
 * (OVERLAP_FAULTS) reproduce real allocator and cache bugs that the
 * overlap index must refuse before they reach the disk.
 */

import type { BlockDevice } from '../io/device.ts';
import { HoldingDevice } from '../io/holding-device.ts';
import type { Phase, PhaseLists, PhaseRearranger } from './ordering.ts';

export const FAULTS = {
  'l2-before-refcount': 'L1/L2 entries are written with the refcount increments, no barrier between',
  'free-before-unmap': 'refcount decrements are written before the L2/L1 change that drops the reference',
  'header-before-table': 'the header switches to a new L1 or refcount table before the table is durable',
  'data-after-mapping': 'guest data reaches the device only after the L2 entry that maps it',
  'unsummed-data': "guest data shares the journal transaction's flush without its checksums in the transaction",
  'fresh-data-any': "guest data shares the journal transaction's flush as if written into clusters it allocates, wherever it went",
  'unshare-with-increment': 'entries lose COPIED with the refcount increments that make their clusters shared, no barrier between',
  'snapshot-before-refcounts': 'the header switches to a new snapshot table with the refcount increments for its tree, no barrier between',
  'copied-before-free': 'entries gain COPIED with the refcount decrement that leaves one reference, no barrier between',
  'moved-unshare-late': 'an entry that lost COPIED (a dedup share) and moved on in the same write-back keeps COPIED on disk while its old cluster gets a second reference',
  'refcount-switch-early': 'amend refcount_bits: the header switches to the new refcount structure in the flush that writes it, no barrier between',
  'bitmaps-before-refcounts': 'the bitmaps extension switches to a new directory with the refcount increments for its clusters, no barrier between',
  'bitmaps-in-use-late': 'guest data reaches the disk before the enabled bitmaps are marked in use there',
  'reuse-before-durable': 'a cluster freed since the last flush may be reallocated at once',
  'cut-before-journal-retired': 'make_empty cuts the file below the journal area before the journal has left the header',
  'retire-before-checkpoint': "make_empty clears the journal's bit before the last transaction's checkpoint is durable",
  'empty-switch-early': 'the O(1) make_empty switches the header to its new refcount structure before the structure is durable',
  'commit-empty-early': "commit empties the top before the data it wrote into the backing file is durable",
  'rebase-switch-early': "safe rebase switches the header to the new backing file before the differences it copies into the image are durable",
  'alloc-live-l2': 'the allocator hands out a live L2 table as a data cluster',
  'alloc-cluster-zero': 'the allocator hands out cluster 0 (the header) once',
  'stale-l2-offset': 'a stale cached table offset: an L2 table is written over a refcount block',
  'reuse-freed-metadata': 'a metadata cluster freed since the last flush (an old L1 or refcount table, an L2 table) is reused at once, while the disk still points at it',
} as const;
export type Fault = keyof typeof FAULTS;

/** The faults the overlap index must stop before the write reaches the device (write/overlap-guard.ts). */
export const OVERLAP_FAULTS: readonly Fault[] = ['alloc-live-l2', 'alloc-cluster-zero', 'stale-l2-offset', 'reuse-freed-metadata'];

export class FaultPlan implements PhaseRearranger {
  private holding: HoldingDevice | undefined;
  private handedOutZero = false;

  constructor(readonly fault: Fault) {}

  /** Rule: an entry that lost COPIED and then moved on loses COPIED on disk before its old cluster's refcount passes 1. */
  get movedUnshareLate(): boolean {
    return this.fault === 'moved-unshare-late';
  }

  /** Rule (journal): data that shares the frames' flush is in the transaction with its checksums. */
  get unsummedData(): boolean {
    return this.fault === 'unsummed-data';
  }

  /** Rule (journal): data shares the frames' flush without checksums only when every cluster it went to is one the transaction allocates. */
  get freshDataAny(): boolean {
    return this.fault === 'fresh-data-any';
  }

  /** Rule: the enabled bitmaps are in use on disk before the first guest write of a session. */
  get inUseLate(): boolean {
    return this.fault === 'bitmaps-in-use-late';
  }

  /** Rule (make_empty): the file is cut below the journal area only once the journal's bit and extension are gone on disk. */
  get cutBeforeJournalRetired(): boolean {
    return this.fault === 'cut-before-journal-retired';
  }

  /** Rule (commit): the data written into the backing file is durable before the top is emptied. */
  get commitEmptyEarly(): boolean {
    return this.fault === 'commit-empty-early';
  }

  /** Rule (safe rebase): the copied differences are durable before the header names the new backing file. */
  get rebaseSwitchEarly(): boolean {
    return this.fault === 'rebase-switch-early';
  }

  /** Rule (O(1) make_empty): the new refcount structure is durable before the header names it. */
  get emptySwitchEarly(): boolean {
    return this.fault === 'empty-switch-early';
  }

  /** Rule (make_empty): the journal's last checkpoint is durable before its bit is cleared. */
  get retireBeforeCheckpoint(): boolean {
    return this.fault === 'retire-before-checkpoint';
  }

  /** Rule: a cluster freed in this epoch stays untouched until the epoch is durable. */
  get reuseFreedAtOnce(): boolean {
    return this.fault === 'reuse-before-durable';
  }

  /** Rule (amend refcount_bits): the new refcount structure is durable before the header names it. */
  get refcountSwitchEarly(): boolean {
    return this.fault === 'refcount-switch-early';
  }

  /** Rule: a metadata cluster freed in this epoch is not reused before the free is durable (the allocator skips what the overlap index still holds). */
  get reuseFreedMetadata(): boolean {
    return this.fault === 'reuse-freed-metadata';
  }

  /**
   * Rule: the allocator hands out free clusters only. The faults return a
   * wrong one instead: a live L2 table for data (`liveL2`), or cluster 0
   * once. Undefined: allocate normally.
   */
  wrongCluster(n: number, purpose: 'data' | 'table', liveL2: () => number | undefined): number | undefined {
    if (n !== 1) return undefined;
    if (this.fault === 'alloc-live-l2' && purpose === 'data') return liveL2();
    if (this.fault === 'alloc-cluster-zero' && !this.handedOutZero) {
      this.handedOutZero = true;
      return 0;
    }
    return undefined;
  }

  /** Rules: refcounts before references, references dropped before the decrement, a table before the header that switches to it. */
  rearrange(p: PhaseLists, tablesMoved: boolean): void {
    if (this.fault === 'stale-l2-offset') {
      // the first L2 table write goes where a refcount block is, as a stale cached offset would send it
      const lists = [p.unshare, p.allocate, p.hook, p.reference, p.disown, p.publish, p.own, p.free, p.settle];
      const block = lists.flat().find((w) => w.what.startsWith('refblock'));
      for (const list of lists) {
        const i = list.findIndex((w) => /^(new )?l2 /.test(w.what));
        if (i < 0 || !block) continue;
        list[i] = { ...list[i]!, offset: block.offset, what: `${list[i]!.what} (stale offset)` };
        return;
      }
    } else if (this.fault === 'l2-before-refcount') {
      p.allocate.unshift(...p.reference.splice(0), ...p.hook.splice(0));
    } else if (this.fault === 'unshare-with-increment' && p.unshare.length) {
      p.allocate.push(...p.unshare.splice(0));
    } else if (this.fault === 'snapshot-before-refcounts' && p.publish.length) {
      p.allocate.push(...p.publish.splice(0));
    } else if (this.fault === 'bitmaps-before-refcounts' && p.publish.some((w) => w.what === 'bitmaps extension')) {
      p.allocate.push(...p.disown.splice(0), ...p.publish.splice(0), ...p.own.splice(0));
    } else if (this.fault === 'copied-before-free' && p.settle.length) {
      p.free.push(...p.settle.splice(0));
    } else if (this.fault === 'free-before-unmap' && p.free.length) {
      p.allocate.unshift(...p.free.splice(0));
    } else if (this.fault === 'header-before-table' && tablesMoved) {
      const at = [...p.hook, ...p.reference].find((w) => w.what === 'header');
      if (!at) return;
      for (const list of [p.hook, p.reference]) {
        const i = list.indexOf(at);
        if (i >= 0) list.splice(i, 1);
      }
      p.allocate.unshift(at);
    }
  }

  /** Rule: guest data is durable before the entry that maps it. The fault holds data back (reads still see it). */
  dataDevice(dev: BlockDevice): BlockDevice {
    if (this.fault !== 'data-after-mapping') return dev;
    return (this.holding ??= new HoldingDevice(dev));
  }

  /** The held data goes to the disk after the references (the 'reference' phase), or at the end of a write-back. */
  async afterPhase(phase: Phase | undefined, onWrite: (w: { offset: number; length: number }) => void): Promise<void> {
    if (!this.holding) return;
    if (phase === undefined || phase.name === 'reference') await this.holding.release(onWrite);
  }
}

export function faultPlan(fault: Fault | undefined): FaultPlan | undefined {
  return fault ? new FaultPlan(fault) : undefined;
}
