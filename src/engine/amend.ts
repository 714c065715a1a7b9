/**
 * qemu-img amend's changes that qledger makes: compat=1.1 (a v2 image
 * becomes v3 by a header rewrite that is valid after every write) and
 * lazy_refcounts=on|off (one header field, through the write engine, the
 * refcounts made exact first when they go off). The rest of amend
 * (compat=0.10, refcount_bits, data_file, size) is refused by the CLI.
 */

import { UsageError } from '../errors.ts';
import { EXT_FEATURE_TABLE } from '../format/features.ts';
import { encodeFeatureTable, encodeHeader, type Qcow2Header } from '../format/header.ts';
import { readAt } from '../io/device.ts';
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
export async function upgradeToV3(path: string): Promise<boolean> {
  const dev = await FileDevice.open(path, { readOnly: false });
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
    await dev.close();
  }
}
