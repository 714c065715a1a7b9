/**
 * The write engine's options (writer.ts's Qcow2Writer.open): the image's
 * files and header as a read-only layer takes them, and how the session
 * writes (overlap check, journal, caches, zero detection, dedup, test
 * faults).
 */

import type { Fault } from './faults.ts';
import type { JournalPlan } from './journal/live.ts';
import type { Qcow2LayerOptions } from './qcow2-layer.ts';
import type { OverlapMode } from './write/overlap.ts';
import type { TraceEvent } from './write/trace.ts';

/** What a writer opens: the image's files and header, as a read-only layer takes them, plus options. */
export interface WriterOptions extends Pick<Qcow2LayerOptions, 'filename' | 'dev' | 'dataDev' | 'parsed' | 'fileSize' | 'snapshots' | 'backing'> {
  /** the snapshot table's size in bytes, as read at open (its entries are variable-sized) */
  readonly snapshotTableBytes?: number | undefined;
  /**
   * QEMU's overlap-check mode: which metadata kinds every write is checked
   * against (default 'all': QEMU's 'cached' plus the inactive L2 tables).
   */
  readonly overlapCheck?: OverlapMode | undefined;
  /** receives every record, device write and flush, in order */
  readonly trace?: TraceEvent[] | undefined;
  /**
   * Hold at most this many metadata records before writing them back
   * (a flush without the final barrier's guarantee to the caller).
   */
  readonly writebackRecords?: number | undefined;
  /** test-only: break one ordering rule (see FAULTS in faults.ts) */
  readonly fault?: Fault | undefined;
  /**
   * Keep a durable journal (journal/live.ts, write/journal-session.ts), started at the first write-back
   * that changes metadata, so that an open that writes nothing changes
   * nothing. None: QEMU's plain ordered write-back.
   */
  readonly journal?: JournalPlan | undefined;
  /** receives warnings (no room for the journal, say) */
  readonly onWarning?: ((message: string) => void) | undefined;
  /** test-only: stop a write-back after this many ordered phases, as a power cut would (the writer is dead afterwards) */
  readonly stopAfterPhase?: number | undefined;
  /** bytes of clean L2 tables and refcount blocks kept after a write-back (default 64 MiB) */
  readonly cacheBytes?: number | undefined;
  /**
   * QEMU's detect-zeroes: a data write whose payload is all zeros becomes a
   * zero write ('on'), one that may deallocate ('unmap', the default here:
   * zero writes are de-allocation hints), or stays a data write ('off').
   */
  readonly detectZeroes?: DetectZeroes | undefined;
  /**
   * Content dedup (write/dedup.ts): whole-cluster writes whose bytes a
   * stored cluster already holds map that cluster instead of writing one.
   * Refused with a warning (writes go on normally) where the image cannot
   * share clusters: 1-bit refcounts, an external data file.
   */
  readonly dedup?: boolean | undefined;
}

export type DetectZeroes = 'off' | 'on' | 'unmap';

export interface ZeroOptions {
  /** allow deallocation (qemu-io write -z -u) */
  readonly unmap?: boolean | undefined;
}

