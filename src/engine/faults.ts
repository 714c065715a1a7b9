/**
 * Test-only fault switches, behind one injected plan: each breaks one
 * ordering rule so that the crash harness can show it catches the breakage
 * (a harness that cannot fail proves nothing). Never set outside tests and
 * `crash-test --fault`. Production code holds one hook per rule: the
 * ordering planner calls `rearrange`, the allocator asks `reuseFreedAtOnce`,
 * the data path writes through `dataDevice` and the write-back calls
 * `afterPhase`.
 */

import type { BlockDevice } from '../io/device.ts';
import { HoldingDevice } from '../io/holding-device.ts';
import type { Phase, PhaseLists, PhaseRearranger } from './ordering.ts';

export const FAULTS = {
  'l2-before-refcount': 'L1/L2 entries are written with the refcount increments, no barrier between',
  'free-before-unmap': 'refcount decrements are written before the L2/L1 change that drops the reference',
  'header-before-table': 'the header switches to a new L1 or refcount table before the table is durable',
  'data-after-mapping': 'guest data reaches the device only after the L2 entry that maps it',
  'reuse-before-durable': 'a cluster freed since the last flush may be reallocated at once',
} as const;
export type Fault = keyof typeof FAULTS;

export class FaultPlan implements PhaseRearranger {
  private holding: HoldingDevice | undefined;

  constructor(readonly fault: Fault) {}

  /** Rule: a cluster freed in this epoch stays untouched until the epoch is durable. */
  get reuseFreedAtOnce(): boolean {
    return this.fault === 'reuse-before-durable';
  }

  /** Rules: refcounts before references, references dropped before the decrement, a table before the header that switches to it. */
  rearrange(p: PhaseLists, tablesMoved: boolean): void {
    if (this.fault === 'l2-before-refcount') {
      p.allocate.unshift(...p.reference.splice(0), ...p.hook.splice(0));
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
