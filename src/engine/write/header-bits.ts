/**
 * The one place that writes the image header during a read-write session.
 * It owns the header's fixed fields as last read (a template patched on
 * every write) and the bits kept outside the metadata state: the dirty bit
 * while it is on disk (lazy refcounts), and the journal's autoclear bit.
 * Every header the write-back, the corrupt bit, the dirty bit, the journal
 * set-up and the clean close write is encoded here.
 */

import { AUTOCLEAR_JOURNAL, INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from '../../format/features.ts';
import { fixedHeaderLength, putMutableFields, type MutableHeaderFields, type Qcow2Header } from '../../format/header.ts';
import { readAt, type BlockDevice } from '../../io/device.ts';
import type { HeaderState } from '../../state/state.ts';
import type { Trace } from './trace.ts';

export class HeaderBits {
  /** header bytes 0 .. end of the fixed fields, as on disk */
  private readonly template: Uint8Array;
  /** INCOMPAT_DIRTY is on disk: it stays in every header until the refcounts are clean */
  dirtyOnDisk: boolean;
  /** AUTOCLEAR_JOURNAL is on disk (or about to be): every header carries it while set */
  journalBitOnDisk = false;
  /** the journal bit is not on disk yet: the first journalled flush writes it */
  private journalBitToWrite = false;

  constructor(
    /** the header cluster, through the overlap guard (extension changes write here too) */
    readonly dev: BlockDevice,
    private readonly version: 2 | 3,
    headerLength: number,
    dirty: boolean,
    private readonly trace: Trace,
  ) {
    this.template = new Uint8Array(fixedHeaderLength(version, headerLength));
    this.dirtyOnDisk = dirty;
  }

  /** Read the fixed fields from the disk again (after the journal's extension moved what follows them). */
  async reload(): Promise<void> {
    this.template.set(await readAt(this.dev, 0, this.template.length));
  }

  /** The header's fixed fields for state `h`, with the bits kept outside the state. */
  encode(h: HeaderState): Uint8Array {
    const b = this.template.slice();
    const incompatibleFeatures = this.dirtyOnDisk ? h.incompatibleFeatures | INCOMPAT_DIRTY : h.incompatibleFeatures;
    const autoclearFeatures = this.journalBitOnDisk ? h.autoclearFeatures | AUTOCLEAR_JOURNAL : h.autoclearFeatures;
    putMutableFields(b, this.version, { ...h, incompatibleFeatures, autoclearFeatures });
    return b;
  }

  private async put(h: HeaderState, what: string, flush: boolean): Promise<void> {
    const b = this.encode(h);
    await this.dev.write(0, b);
    this.trace.write(0, b.length, what);
    if (flush) {
      await this.dev.flush();
      this.trace.flush();
    }
  }

  /** QEMU's qcow2_signal_corruption: the corrupt bit, at once and flushed, outside the ordered stream. */
  markCorrupt(durable: HeaderState): Promise<void> {
    return this.put({ ...durable, incompatibleFeatures: durable.incompatibleFeatures | INCOMPAT_CORRUPT }, 'header (corrupt bit)', true);
  }

  /** Lazy refcounts: the dirty bit, flushed, before the first write-back that skips refcount ordering. */
  async markDirty(durable: HeaderState): Promise<void> {
    await this.put({ ...durable, incompatibleFeatures: durable.incompatibleFeatures | INCOMPAT_DIRTY }, 'header (dirty bit)', true);
    this.dirtyOnDisk = true;
  }

  /** The refcounts are exact on disk: the header without the dirty bit (the caller flushes). */
  async markClean(h: HeaderState): Promise<void> {
    this.dirtyOnDisk = false;
    await this.put({ ...h, incompatibleFeatures: h.incompatibleFeatures & ~INCOMPAT_DIRTY }, 'header (clean)', false);
  }

  /** The journal starts: every header from now on carries its bit; the next journalled flush writes it. */
  journalStarted(): void {
    if (this.journalBitOnDisk) return;
    this.journalBitOnDisk = true;
    this.journalBitToWrite = true;
  }

  /** The journal leaves the image: the header without its bit, flushed (the journal is stale from here on, never replayed). */
  async clearJournalBit(durable: HeaderState): Promise<void> {
    this.journalBitOnDisk = false;
    this.journalBitToWrite = false;
    await this.put(durable, 'header (journal bit cleared) [journal retired]', true);
  }

  /** Write the journal bit if it is not on disk yet (the caller's barrier makes it durable with the frames). */
  async writeJournalBit(durable: HeaderState): Promise<void> {
    if (!this.journalBitToWrite) return;
    this.journalBitToWrite = false;
    await this.put(durable, 'header (journal bit) [journal set-up]', false);
  }
}

/**
 * Change some of the header's mutable fields on `dev` outside a write
 * session (check's repair): the fixed fields are read, patched and written
 * back as one write inside sector 0, so the change is atomic. The caller
 * flushes.
 */
export async function patchHeader(dev: BlockDevice, h: Qcow2Header, change: Partial<MutableHeaderFields>): Promise<void> {
  const b = await readAt(dev, 0, fixedHeaderLength(h.version, h.headerLength));
  putMutableFields(b, h.version, { ...h, ...change });
  await dev.write(0, b);
}
