/**
 * Feature bits of the v3 header (bytes 72 - 95) and the header extension
 * magic numbers. Names follow QEMU's feature name table.
 */

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN =
  INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;

export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
/**
 * qledger's own autoclear bit: set while the journal named by the journal
 * header extension is live (journal-format.md). QEMU clears unknown
 * autoclear bits when it opens an image read-write, which is exactly how a
 * journal made stale by another program is recognised.
 */
export const AUTOCLEAR_JOURNAL = 1n << 63n;
/**
 * qledger's own autoclear bit: set while the persisted dedup index named by
 * its header extension matches the image (written at a dedup session's
 * clean close). Every read-write open clears it, QEMU's as unknown and
 * qledger's before anything is written, so a set bit means that no write
 * happened since the index was written.
 */
export const AUTOCLEAR_DEDUP_INDEX = 1n << 62n;
export const AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

export const FEATURE_TYPE_INCOMPATIBLE = 0;
export const FEATURE_TYPE_COMPATIBLE = 1;
export const FEATURE_TYPE_AUTOCLEAR = 2;

/** The names QEMU writes into the feature name table, by (type, bit). */
export const KNOWN_FEATURE_NAMES: ReadonlyArray<{ type: number; bit: number; name: string }> = [
  { type: FEATURE_TYPE_INCOMPATIBLE, bit: 0, name: 'dirty bit' },
  { type: FEATURE_TYPE_INCOMPATIBLE, bit: 1, name: 'corrupt bit' },
  { type: FEATURE_TYPE_INCOMPATIBLE, bit: 2, name: 'external data file' },
  { type: FEATURE_TYPE_INCOMPATIBLE, bit: 3, name: 'compression type' },
  { type: FEATURE_TYPE_INCOMPATIBLE, bit: 4, name: 'extended L2 entries' },
  { type: FEATURE_TYPE_COMPATIBLE, bit: 0, name: 'lazy refcounts' },
  { type: FEATURE_TYPE_AUTOCLEAR, bit: 0, name: 'bitmaps' },
  { type: FEATURE_TYPE_AUTOCLEAR, bit: 1, name: 'raw external data' },
];

export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_CRYPTO_HEADER = 0x0537be77;
export const EXT_BITMAPS = 0x23852875;
export const EXT_DATA_FILE = 0x44415441;
/** qledger journal location ("qljl"); unknown to QEMU, which keeps it verbatim */
export const EXT_JOURNAL = 0x716c6a6c;
/** qledger's persisted dedup index location ("qldx"); unknown to QEMU, which keeps it verbatim */
export const EXT_DEDUP_INDEX = 0x716c6478;

export const COMPRESSION_DEFLATE = 0;
export const COMPRESSION_ZSTD = 1;

export const CRYPT_NONE = 0;
export const CRYPT_AES = 1;
export const CRYPT_LUKS = 2;
