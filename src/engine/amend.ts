/**
 * qemu-img amend's changes that qledger makes: compat=1.1 (a v2 image
 * becomes v3 by a header rewrite that is valid after every write) and
 * lazy_refcounts=on|off (one header field, through the write engine, the
 * refcounts made exact first when they go off), compat=0.10 (zero clusters
 * expanded through the write engine, then a v2 header in one sector). The
 * rest of amend (refcount_bits, data_file, size) is refused by the CLI.
 */

import { UsageError } from '../errors.ts';
import { EXT_BITMAPS, EXT_DATA_FILE, EXT_FEATURE_TABLE, EXT_JOURNAL, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY } from '../format/features.ts';
import { insertHeaderExtension, removeHeaderExtension } from './journal/live.ts';
import { u32 } from '../format/bytes.ts';
import { entryOffset } from '../format/l1.ts';
import { L2E_COMPRESSED_HI, L2E_ZERO_LO } from '../format/l2.ts';
import { encodeFeatureTable, encodeHeader, type Qcow2Header } from '../format/header.ts';
import { readAt, type BlockDevice } from '../io/device.ts';
import { FileDevice } from '../io/file-device.ts';
import { loadQcow2 } from './qcow2-layer.ts';

const SECTOR = 512;

/**
 * Make a v2 image v3, as QEMU's qcow2_upgrade does: version 3, header
 * length 112, refcount order 4 (v2's only one), no feature bits, the
 * feature name table added. The new header goes out so that the file is a
 * valid image after every write: whole when it fits in the first sector
 * (a sector write is atomic); otherwise its sectors past the first go out
 * first, into bytes the v2 header does not use, and the first sector last.
 * Returns false when the image already is v3.
 */
export async function upgradeToV3(target: string | BlockDevice): Promise<boolean> {
  const dev = typeof target === 'string' ? await FileDevice.open(target, { readOnly: false }) : target;
  const path = dev.name;
  try {
    const { parsed } = await loadQcow2(dev);
    const h = parsed.header;
    if (h.version === 3) return false;
    const header: Qcow2Header = { ...h, version: 3, headerLength: 112, refcountOrder: 4, incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 0n, compressionType: 0, extraHeaderBytes: new Uint8Array(0) };
    const extensions = [...parsed.extensions.filter((e) => e.type !== EXT_FEATURE_TABLE).map((e) => ({ type: e.type, data: e.data })), { type: EXT_FEATURE_TABLE, data: encodeFeatureTable() }];
    const next = encodeHeader({ header, extensions, backingFile: parsed.backingFile });
    const old = await readAt(dev, 0, Math.max(next.length, SECTOR));
    // the bytes the v2 header uses: its fields, extensions and the backing file name
    let used = 72;
    for (const e of parsed.extensions) used = Math.max(used, e.offset + e.data.length);
    if (parsed.backingFile !== undefined) used = Math.max(used, h.backingFileOffset + h.backingFileSize);
    if (next.length > SECTOR) {
      if (used > SECTOR) throw new UsageError(`${path}: the v2 header and its extensions pass the first sector; upgrading it in place is not supported yet`);
      await dev.write(SECTOR, next.subarray(SECTOR));
      await dev.flush();
    }
    const first = old.slice(0, SECTOR);
    first.fill(0);
    first.set(next.subarray(0, Math.min(SECTOR, next.length)));
    await dev.write(0, first);
    await dev.flush();
    return true;
  } finally {
    if (typeof target === 'string') await dev.close();
  }
}

/** Why a v3 image cannot become v2 here, in qemu-img's words where it has them; undefined when it can. */
export async function downgradeRefusal(target: string | BlockDevice): Promise<{ message: string; notYet?: boolean } | undefined> {
  const dev = typeof target === 'string' ? await FileDevice.open(target, { readOnly: true }) : target;
  try {
    const { parsed, snapshots } = await loadQcow2(dev);
    const h = parsed.header;
    if (h.version === 2) return undefined;
    if ((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n) return { message: 'Cannot downgrade an image with a data file' };
    if (h.refcountOrder !== 4) return { message: 'compat=0.10 requires refcount_bits=16' };
    const blocking = h.incompatibleFeatures & ~INCOMPAT_DIRTY;
    if (blocking !== 0n) return { message: `Cannot downgrade an image with incompatible features 0x${blocking.toString(16)} set` };
    // qemu-img 7.2 drops them (their clusters leak, and QEMU warns of a v2 image with bitmaps at every open): refused instead
    if (parsed.bitmaps) return { message: "Cannot downgrade an image with persistent bitmaps: remove them first with 'qledger bitmap --remove'" };
    // zero clusters in a snapshot's tree: QEMU expands them in place; qledger does the active tree only
    const cs = 2 ** h.clusterBits;
    for (const sn of snapshots) {
      const l1 = await readAt(dev, sn.l1TableOffset, sn.l1Size * 8);
      for (let i = 0; i < sn.l1Size; i++) {
        const T = entryOffset(u32(l1, i * 8), u32(l1, i * 8 + 4));
        if (T === 0) continue;
        const t = await readAt(dev, T, cs);
        for (let j = 0; j < cs / 8; j++) if ((u32(t, j * 8) & L2E_COMPRESSED_HI) === 0 && (u32(t, j * 8 + 4) & L2E_ZERO_LO) !== 0) {
          return { message: `amend: compat=0.10 of an image whose snapshot '${sn.name}' holds zero clusters is not supported yet`, notYet: true };
        }
      }
    }
    if (v2Header(parsed).length > SECTOR) return { message: 'amend: compat=0.10 of an image whose v2 header passes the first sector is not supported yet', notYet: true };
    return undefined;
  } finally {
    if (typeof target === 'string') await dev.close();
  }
}

/** The v2 header a v3 image's becomes: the fields, the extensions v2 keeps (not the feature table, the journal or bitmaps), the backing file name. */
function v2Header(parsed: Awaited<ReturnType<typeof loadQcow2>>['parsed']): Uint8Array {
  const h = parsed.header;
  const header: Qcow2Header = { ...h, version: 2, headerLength: 72, refcountOrder: 4, incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 0n, compressionType: 0, extraHeaderBytes: new Uint8Array(0) };
  const drop = new Set([EXT_FEATURE_TABLE, EXT_JOURNAL, EXT_BITMAPS]);
  const extensions = parsed.extensions.filter((e) => !drop.has(e.type)).map((e) => ({ type: e.type, data: e.data }));
  return encodeHeader({ header, extensions, backingFile: parsed.backingFile });
}

/**
 * Make a v3 image v2 once its zero clusters are expanded and its
 * refcounts exact (the caller did both through the write engine): the v2
 * header, which downgradeRefusal made sure fits the first sector, in one
 * sector write. Returns false when the image already is v2.
 */
export async function downgradeToV2(target: string | BlockDevice): Promise<boolean> {
  const dev = typeof target === 'string' ? await FileDevice.open(target, { readOnly: false }) : target;
  try {
    const { parsed } = await loadQcow2(dev);
    if (parsed.header.version === 2) return false;
    const next = v2Header(parsed);
    const first = new Uint8Array(SECTOR);
    first.set(next);
    await dev.write(0, first);
    await dev.flush();
    return true;
  } finally {
    if (typeof target === 'string') await dev.close();
  }
}

/**
 * qemu-img amend -o data_file=NAME: the external data file's name changes,
 * valid at every instant. The new name goes in as a second data-file
 * extension after the others (the last one wins, in QEMU as here: the
 * switch is the single write that makes it part of the list), then the old
 * one is removed (format/extension-insert.ts). The caller checked that the
 * image has a data file.
 */
export async function renameDataFile(target: string | BlockDevice, name: string): Promise<void> {
  const dev = typeof target === 'string' ? await FileDevice.open(target, { readOnly: false }) : target;
  try {
    const { parsed } = await loadQcow2(dev);
    if (parsed.dataFile === name) return;
    const cs = 2 ** parsed.header.clusterBits;
    const finish = await insertHeaderExtension(dev, cs, EXT_DATA_FILE, new TextEncoder().encode(name));
    if (!finish) throw new UsageError(`${dev.name}: the header cluster has no room for the new data file name`);
    await dev.flush();
    await finish();
    await dev.flush();
    await removeHeaderExtension(dev, cs, EXT_DATA_FILE);
  } finally {
    if (typeof target === 'string') await dev.close();
  }
}
