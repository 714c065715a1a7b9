/**
 * The write path's trace: every record, device write, flush and truncate, in
 * order, for tests and the crash harness. A session without a trace array
 * pays one branch per event.
 */

import type { JournalRecord } from '../../journal/records.ts';

export type TraceEvent =
  | { readonly type: 'record'; readonly record: JournalRecord }
  | { readonly type: 'write'; readonly offset: number; readonly length: number; readonly what: string }
  | { readonly type: 'flush' }
  | { readonly type: 'truncate'; readonly size: number };

export class Trace {
  constructor(private out: TraceEvent[] | undefined) {}

  /** Send the events from now on to `out` (tests attach a trace to an open writer). */
  redirect(out: TraceEvent[] | undefined): void {
    this.out = out;
  }

  record(record: JournalRecord): void {
    this.out?.push({ type: 'record', record });
  }
  write(offset: number, length: number, what: string): void {
    this.out?.push({ type: 'write', offset, length, what });
  }
  flush(): void {
    this.out?.push({ type: 'flush' });
  }
  truncate(size: number): void {
    this.out?.push({ type: 'truncate', size });
  }
}
