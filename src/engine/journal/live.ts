/**
 * The live journal of a read-write session: starting it in its area (a
 * fresh generation, the header extension inserted so that the header is
 * valid after every write), appending one transaction per write-back, and
 * checkpoints; and where a session's journal will go, decided at open
 * without writing anything.
 */

import { randomBytes } from 'node:crypto';
import { EXT_JOURNAL } from '../../format/features.ts';
import { planExtensionInsert, planExtensionRemove } from '../../format/extension-insert.ts';
import type { ParsedHeader } from '../../format/header.ts';
import { readAt, type BlockDevice } from '../../io/device.ts';
import { AREA_HEADER_SIZE, EXT_JOURNAL_LENGTH, encodeAreaHeader, encodeJournalExtension, encodeTransaction, type JournalExtension } from '../../journal/log.ts';
import type { JournalRecord } from '../../journal/records.ts';
import { DEFAULT_JOURNAL_BYTES, type Located } from './locate.ts';

/** Mark transactions up to `tx` as entirely in place (the caller orders it with a flush). */
export async function checkpoint(dev: BlockDevice, ext: JournalExtension, generation: bigint, tx: number): Promise<void> {
  await dev.write(ext.offset, encodeAreaHeader({ generation, size: ext.size, appliedTx: tx }));
}

/**
 * A live journal: where it is, its generation, and the next frame and
 * transaction numbers. The writer appends one transaction per write-back.
 */
export class JournalLog {
  private seq = 1;
  private tx = 0;
  constructor(
    readonly dev: BlockDevice,
    readonly ext: JournalExtension,
    readonly generation: bigint,
  ) {}

  /** bytes available for a transaction's frames */
  get capacity(): number {
    return this.ext.size - AREA_HEADER_SIZE;
  }

  /**
   * Write `records` as the next transaction at the start of the frame
   * area; when they do not fit, write an 'unjournalled' transaction in
   * their place. Returns the transaction number and the bytes written. The
   * caller flushes before any in-place write.
   */
  async append(records: readonly JournalRecord[], metaRecords: number, atLeastBytes = 0): Promise<{ tx: number; bytes: number; fits: boolean }> {
    const tx = ++this.tx;
    // `atLeastBytes`: the records' encoded size as the caller counted it; past the capacity nothing is encoded
    const big = atLeastBytes > this.capacity;
    let enc = encodeTransaction(big ? [] : records, { generation: this.generation, tx, seq: this.seq });
    const fits = !big && enc.bytes.length <= this.capacity;
    if (!fits) enc = encodeTransaction([{ kind: 'unjournalled', records: metaRecords }], { generation: this.generation, tx, seq: this.seq });
    await this.dev.write(this.ext.offset + AREA_HEADER_SIZE, enc.bytes);
    this.seq = enc.nextSeq;
    return { tx, bytes: enc.bytes.length, fits };
  }

  /** The transaction is entirely in place; durable with the next flush. */
  checkpoint(tx: number): Promise<void> {
    return checkpoint(this.dev, this.ext, this.generation, tx);
  }
}

/**
 * Where a session's journal will go, decided at open without writing
 * anything: the area the extension names when its clusters are all still
 * free (QEMU may have allocated them since), else a new one the writer
 * places past everything it has allocated when the journal starts.
 */
export interface JournalPlan {
  readonly reuse: JournalExtension | undefined;
  /** the image already has a journal extension (it is updated rather than added) */
  readonly extPresent: boolean;
  /** size of a new area, in bytes */
  readonly bytes: number;
}

/** `found`: the journal as `locateJournal` found it (recovery changes its checkpoint only, never where it is). */
export async function planJournal(parsed: ParsedHeader, found: Located, bytes: number | undefined, refcount: (cluster: number) => Promise<number>): Promise<JournalPlan> {
  const cs = 2 ** parsed.header.clusterBits;
  const want = Math.max(2 * cs, Math.ceil((bytes ?? DEFAULT_JOURNAL_BYTES) / cs) * cs);
  let reuse: JournalExtension | undefined;
  if (found.kind === 'valid') {
    reuse = found.ext;
    for (let c = reuse.offset / cs; c < (reuse.offset + reuse.size) / cs; c++) {
      if ((await refcount(c)) !== 0) {
        reuse = undefined;
        break;
      }
    }
  }
  return { reuse, extPresent: found.kind !== 'absent' && parsed.extensions.some((e) => e.type === EXT_JOURNAL && e.data.length === EXT_JOURNAL_LENGTH), bytes: want };
}

/**
 * Start the journal in area `ext` (its clusters free and reserved by the
 * caller), in two steps that cost no flush of their own. `activateJournal`
 * writes a fresh area header (a new generation makes every older frame
 * invalid) and, for a new extension, its body beyond the end marker
 * (inactive); these become durable with the first transaction's frames.
 * Then `finish` (after that flush) makes the extension part of the header,
 * or rewrites a moved one. A reused area needs no `finish`. Returns
 * undefined when the header cluster has no room for the extension.
 */
export async function activateJournal(
  dev: BlockDevice,
  clusterSize: number,
  ext: JournalExtension,
  plan: JournalPlan,
  parsedExtensions: ParsedHeader['extensions'],
): Promise<{ log: JournalLog; finish: (() => Promise<void>) | undefined } | undefined> {
  if ((await dev.size()) < ext.offset + ext.size) await dev.truncate(ext.offset + ext.size);
  const generation = randomBytes(8).readBigUInt64BE() || 1n;
  await dev.write(ext.offset, encodeAreaHeader({ generation, size: ext.size, appliedTx: 0 }));
  const log = new JournalLog(dev, ext, generation);
  if (plan.reuse && plan.reuse.offset === ext.offset && plan.reuse.size === ext.size) return { log, finish: undefined };
  if (plan.extPresent) {
    const e = parsedExtensions.find((x) => x.type === EXT_JOURNAL);
    if (!e || e.data.length !== EXT_JOURNAL_LENGTH) return undefined;
    return { log, finish: () => dev.write(e.offset + 8, encodeJournalExtension(ext)) };
  }
  const finish = await insertExtension(dev, clusterSize, ext);
  return finish ? { log, finish } : undefined;
}

/**
 * Append the journal extension to the header's extension list (planned by
 * format/extension-insert.ts): a backing file name in the way moves first
 * (copy, flush, switch, flush: the old name stays valid until the field
 * moves), then the body goes beyond the end marker. The returned step
 * writes the marker that makes the extension part of the header.
 */
async function insertExtension(dev: BlockDevice, cs: number, ext: JournalExtension): Promise<(() => Promise<void>) | undefined> {
  return insertHeaderExtension(dev, cs, EXT_JOURNAL, encodeJournalExtension(ext));
}

/**
 * Insert header extension `type` with `body` as insertExtension does for the
 * journal (the dedup index's copy uses it too): the name moved if it is in
 * the way, the body written; the returned step writes the marker. Undefined
 * when the header cluster has no room.
 */
export async function insertHeaderExtension(dev: BlockDevice, cs: number, type: number, body: Uint8Array): Promise<(() => Promise<void>) | undefined> {
  const plan = planExtensionInsert(await readAt(dev, 0, cs), type, body);
  if (!plan) return undefined;
  if (plan.moveName) {
    await dev.write(plan.moveName.to, plan.moveName.bytes);
    await dev.flush();
    await dev.write(8, plan.moveName.field);
    await dev.flush();
  }
  await dev.write(plan.body.offset, plan.body.bytes);
  return () => dev.write(plan.marker.offset, plan.marker.bytes);
}

/**
 * Remove header extension `type` by the writes format/extension-insert.ts
 * plans, each flushed, so the list is valid after every one (`onStep` hears
 * of each write after it). Nothing is written when the extension is absent.
 */
export async function removeHeaderExtension(dev: BlockDevice, cs: number, type: number, onStep?: (offset: number, length: number) => void): Promise<void> {
  for (const w of planExtensionRemove(await readAt(dev, 0, cs), type) ?? []) {
    await dev.write(w.offset, w.bytes);
    await dev.flush();
    onStep?.(w.offset, w.bytes.length);
  }
}
