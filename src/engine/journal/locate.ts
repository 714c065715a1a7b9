/**
 * Finding an image's journal (journal-format.md) without trusting it:
 * the header extension, the area header and the chain of frames, checked
 * for structure only; and the read-only event-stream view that `qledger
 * journal dump` and the library's readJournal/dumpJournal give.
 */

import { UnsupportedError, hex } from '../../errors.ts';
import { u32 } from '../../format/bytes.ts';
import { AUTOCLEAR_JOURNAL, EXT_JOURNAL } from '../../format/features.ts';
import type { ParsedHeader } from '../../format/header.ts';
import { readAt, type BlockDevice } from '../../io/device.ts';
import { FileDevice } from '../../io/file-device.ts';
import {
  AREA_HEADER_SIZE,
  FRAME_ALIGN,
  FRAME_HEADER_SIZE,
  FRAME_MAGIC,
  decodeAreaHeader,
  decodeJournalExtension,
  scanFrames,
  type JournalExtension,
  type JournalTransaction,
  type ScanResult,
} from '../../journal/log.ts';
import { probeFormat } from '../open.ts';
import { loadQcow2 } from '../qcow2-layer.ts';

/** Default journal area: a write-back of up to ~4 MiB of records (~45,000 new clusters) fits. */
export const DEFAULT_JOURNAL_BYTES = 8 * 1024 * 1024;



export interface JournalView {
  readonly ext: JournalExtension;
  /** where the extension's type field is in the header cluster */
  readonly extAt: number;
  readonly generation: bigint;
  readonly appliedTx: number;
  readonly scan: ScanResult;
}

export type Located =
  | { readonly kind: 'absent' }
  | { readonly kind: 'invalid'; readonly reason: string; readonly ext?: JournalExtension | undefined }
  | ({ readonly kind: 'valid' } & JournalView);

/** Read the journal an image names, without trusting it: structure checks only. */
export async function locateJournal(dev: BlockDevice, parsed: ParsedHeader, fileSize: number): Promise<Located> {
  const e = parsed.extensions.find((x) => x.type === EXT_JOURNAL);
  if (!e) return { kind: 'absent' };
  let ext: JournalExtension;
  try {
    ext = decodeJournalExtension(e.data, e.offset);
  } catch (err) {
    return { kind: 'invalid', reason: (err as Error).message };
  }
  const cs = 2 ** parsed.header.clusterBits;
  if (ext.offset === 0 || ext.offset % cs !== 0 || ext.size % cs !== 0 || ext.size < 2 * AREA_HEADER_SIZE || ext.size > MAX_AREA || ext.offset + ext.size > fileSize) {
    return { kind: 'invalid', reason: `journal header extension at ${hex(e.offset)}: area ${hex(ext.offset)} of ${ext.size} bytes is not a cluster-aligned range inside the file`, ext };
  }
  // Read what the frames need, not the whole area: follow the chain of frame
  // headers (40 bytes each, one per 64 KiB of records), then read that extent once.
  let hdr;
  try {
    hdr = decodeAreaHeader(await readAt(dev, ext.offset, AREA_HEADER_SIZE), ext.offset);
  } catch (err) {
    return { kind: 'invalid', reason: (err as Error).message, ext };
  }
  if (hdr.size !== ext.size) return { kind: 'invalid', reason: `journal area header at ${hex(ext.offset)}: size ${hdr.size} differs from the extension's ${ext.size}`, ext };
  let end = AREA_HEADER_SIZE;
  while (end + FRAME_HEADER_SIZE <= ext.size) {
    const fh = await readAt(dev, ext.offset + end, FRAME_HEADER_SIZE);
    const len = u32(fh, 4);
    if (u32(fh, 0) !== FRAME_MAGIC || len % 8 !== 0 || end + FRAME_HEADER_SIZE + len > ext.size) break;
    end += Math.ceil((FRAME_HEADER_SIZE + len) / FRAME_ALIGN) * FRAME_ALIGN;
  }
  // one sector more, so that the scan sees where the chain stops
  const area = await readAt(dev, ext.offset, Math.min(ext.size, end + FRAME_ALIGN));
  const scan = scanFrames(area, hdr.generation);
  return { kind: 'valid', ext, extAt: e.offset, generation: hdr.generation, appliedTx: hdr.appliedTx, scan };
}

const MAX_AREA = 1024 * 1024 * 1024;

export interface JournalDump {
  readonly state: 'absent' | 'invalid' | 'valid' | 'v2';
  /** the autoclear bit is set: the journal is live */
  readonly live: boolean;
  /** why an invalid journal fails validation */
  readonly reason?: string | undefined;
  readonly area?: { readonly offset: number; readonly size: number; readonly generation: bigint; readonly appliedTx: number } | undefined;
  /** every transaction the scan accepted, in order, the last one possibly torn (committed false) */
  readonly transactions: ReadonlyArray<JournalTransaction & { readonly applied: boolean }>;
  /** where and why the scan stopped */
  readonly end?: { readonly at: number; readonly reason: string } | undefined;
}

/**
 * The journal of the qcow2 image at `path`, read-only: the library's view
 * of the event stream (each transaction with its records, committed or
 * torn, applied or not).
 *
 * @example
 * import { Image, readJournal, describeRecord } from 'qledger';
 * import { mkdtempSync } from 'node:fs';
 * import { tmpdir } from 'node:os';
 * import { join } from 'node:path';
 *
 * const path = join(mkdtempSync(join(tmpdir(), 'qledger-')), 'disk.qcow2');
 * await Image.create(path, { size: 16 << 20 });
 * const img = await Image.open(path, { write: true });
 * await img.write(0, new Uint8Array(4096).fill(7));
 * await img.flush();
 * await img.abandon(); // as a crash leaves it
 * const j = await readJournal(path);
 * console.log(j.state, j.live); // valid true
 * for (const t of j.transactions) for (const r of t.records) console.log(describeRecord(r));
 */
export async function readJournal(path: string): Promise<JournalDump> {
  const dev = await FileDevice.open(path, { readOnly: true });
  try {
    if ((await probeFormat(dev)) !== 'qcow2') throw new UnsupportedError(`${path}: not a qcow2 image; only qcow2 images have a journal`, { path });
    const { parsed, fileSize } = await loadQcow2(dev);
    return await dumpJournal(dev, parsed, fileSize);
  } finally {
    await dev.close();
  }
}

/** Read the journal of the qcow2 image on `dev` without changing anything. */
export async function dumpJournal(dev: BlockDevice, parsed: ParsedHeader, fileSize: number): Promise<JournalDump> {
  const h = parsed.header;
  const live = h.version === 3 && (h.autoclearFeatures & AUTOCLEAR_JOURNAL) !== 0n;
  if (h.version !== 3) return { state: 'v2', live: false, transactions: [] };
  const j = await locateJournal(dev, parsed, fileSize);
  if (j.kind === 'absent') return { state: 'absent', live, transactions: [] };
  if (j.kind === 'invalid') return { state: 'invalid', live, reason: j.reason, transactions: [] };
  return {
    state: 'valid',
    live,
    area: { offset: j.ext.offset, size: j.ext.size, generation: j.generation, appliedTx: j.appliedTx },
    transactions: j.scan.transactions.map((t) => ({ ...t, applied: t.tx <= j.appliedTx })),
    end: j.scan.end,
  };
}
