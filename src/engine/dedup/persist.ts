/**
 * The persisted dedup index (format/dedup-index-area.ts): loading it at a
 * dedup session's open when the autoclear bit says it matches the image,
 * and writing it at a clean close, so that a new session need not read and
 * fingerprint every cluster again. It is an optimisation only: every
 * answer the index gives is still checked against the live entry, the
 * refcount and the bytes, so a stale, damaged or forged copy can cost
 * missed shares and reads, never wrong data; anything that fails its
 * checks is ignored with a warning and the index is rebuilt from the image.
 */

import { FormatError, hex } from '../../errors.ts';
import { AUTOCLEAR_DEDUP_INDEX, EXT_DEDUP_INDEX } from '../../format/features.ts';
import { decodeHeader, type ParsedHeader } from '../../format/header.ts';
import { planExtensionInsert } from '../../format/extension-insert.ts';
import { areaLength, decodeArea, decodeDedupExtension, encodeArea, encodeDedupExtension, type DedupIndexExtension } from '../../format/dedup-index-area.ts';
import { readAt, type BlockDevice } from '../../io/device.ts';
import { insertHeaderExtension } from '../journal/live.ts';
import { crc32 } from '../../journal/log.ts';
import { DedupIndex } from './dedup-index.ts';


export interface LoadedIndex {
  /** the index, when the copy was current and sound */
  readonly index?: DedupIndex | undefined;
  /** where the copy was, when the bit said it was current (its clusters can be given back) */
  readonly area?: DedupIndexExtension | undefined;
  /** why a copy the bit called current was not used */
  readonly warning?: string | undefined;
}

export async function loadDedupIndex(dev: BlockDevice, name: string, parsed: ParsedHeader, fileSize: number): Promise<LoadedIndex> {
  if ((parsed.header.autoclearFeatures & AUTOCLEAR_DEDUP_INDEX) === 0n) return {};
  const e = parsed.extensions.find((x) => x.type === EXT_DEDUP_INDEX);
  const rebuilt = (why: string) => `${name}: the persisted dedup index ${why}; it is rebuilt from the image`;
  if (!e) return { warning: rebuilt('is named by the autoclear bit but has no header extension') };
  try {
    const ext = decodeDedupExtension(e.data, e.offset + 8);
    const cs = 2 ** parsed.header.clusterBits;
    const most = areaLength(24, Math.ceil(fileSize / cs));
    if (ext.offset % cs !== 0 || ext.offset < cs || ext.length > most || ext.offset + ext.length > fileSize) {
      return { warning: rebuilt(`at ${hex(ext.offset)} (${ext.length} bytes) lies outside the file or off a cluster boundary`) };
    }
    const a = decodeArea(await readAt(dev, ext.offset, ext.length), ext.offset, crc32);
    return { index: DedupIndex.fromArrays(a), area: ext };
  } catch (err) {
    if (err instanceof FormatError) return { warning: rebuilt(`fails its checks (${err.message})`) };
    throw err;
  }
}

/**
 * Write `index` at `at` (clusters past everything the image uses) and name
 * it in the header extension, each step flushed; the caller then sets the
 * autoclear bit. `area` writes the area, `header` the header cluster.
 * Returns false when the header cluster has no room for the extension.
 */
export async function writeDedupIndex(index: DedupIndex, at: number, dev: { area: BlockDevice; header: BlockDevice }, fileSize: number, cs: number): Promise<{ written: boolean; length: number; movedName: boolean }> {
  const bytes = encodeArea(index.arrays(), crc32);
  await dev.area.write(at, bytes);
  await dev.area.flush();
  const body = encodeDedupExtension({ offset: at, length: bytes.length });
  const head = await readAt(dev.header, 0, cs);
  const e = decodeHeader(head, fileSize).extensions.find((x) => x.type === EXT_DEDUP_INDEX);
  if (e && e.data.length === body.length) {
    await dev.header.write(e.offset + 8, body);
    await dev.header.flush();
    return { written: true, length: bytes.length, movedName: false };
  }
  if (e) return { written: false, length: bytes.length, movedName: false };
  const movedName = planExtensionInsert(head, EXT_DEDUP_INDEX, body)?.moveName !== undefined;
  const finish = await insertHeaderExtension(dev.header, cs, EXT_DEDUP_INDEX, body);
  if (!finish) return { written: false, length: bytes.length, movedName: false };
  await dev.header.flush();
  await finish();
  await dev.header.flush();
  return { written: true, length: bytes.length, movedName };
}
