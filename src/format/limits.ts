/** Limits QEMU enforces when it opens an image (block/qcow2.h), and a few of our own. */

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** Extended L2 entries need clusters of at least 16 KiB (32 subclusters of 512 bytes). */
export const MIN_EXTL2_CLUSTER_BITS = 14;
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;
export const MAX_BACKING_FILE_NAME = 1023;
export const MAX_BACKING_FORMAT_NAME = 15;
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_BYTES = 64 * 1024 * 1024;
export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
/** The header length QEMU writes for v3 (it includes the compression type byte). */
export const V3_HEADER_LENGTH = 112;
/** qledger's own: every offset and size must be exact in a JS number. */
export const MAX_SUPPORTED_BYTES = 2 ** 53;
/** qledger's own: longest backing chain before we call it a loop. */
export const MAX_BACKING_CHAIN = 64;
