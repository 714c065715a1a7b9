/**
 * The qcow2 header (cluster 0) and its extensions.
 *
 *   Byte  0 -  3: magic                    "QFI\xfb"
 *         4 -  7: version                  2 or 3
 *         8 - 15: backing_file_offset      0 or offset of the name, inside cluster 0
 *        16 - 19: backing_file_size        length of the name, no NUL, at most 1023
 *        20 - 23: cluster_bits             9 ..= 21
 *        24 - 31: size                     virtual disk size in bytes
 *        32 - 35: crypt_method             0 none, 1 AES, 2 LUKS
 *        36 - 39: l1_size                  entries in the active L1 table
 *        40 - 47: l1_table_offset          cluster aligned
 *        48 - 55: refcount_table_offset    cluster aligned
 *        56 - 59: refcount_table_clusters
 *        60 - 63: nb_snapshots
 *        64 - 71: snapshots_offset         cluster aligned
 *   v3 only:
 *        72 - 79: incompatible_features
 *        80 - 87: compatible_features
 *        88 - 95: autoclear_features
 *        96 - 99: refcount_order           0 ..= 6; refcount_bits = 1 << refcount_order
 *       100 -103: header_length            >= 104, multiple of 8
 *       104     : compression_type         if header_length > 104
 *       105 -111: padding
 *
 * Extensions follow at header_length (72 for v2): { u32 type, u32 length,
 * data padded to 8 }, ended by type 0 or by the start of the backing file name.
 */

import { FormatError, UnsupportedError, hex } from '../errors.ts';
import { u32, u64, u64big, putU32, putU64 } from './bytes.ts';
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_DATA_FILE_RAW,
  COMPRESSION_DEFLATE,
  COMPRESSION_ZSTD,
  CRYPT_LUKS,
  CRYPT_NONE,
  EXT_BACKING_FORMAT,
  EXT_BITMAPS,
  EXT_CRYPTO_HEADER,
  EXT_DATA_FILE,
  EXT_END,
  EXT_FEATURE_TABLE,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2,
  INCOMPAT_KNOWN,
  KNOWN_FEATURE_NAMES,
  FEATURE_TYPE_INCOMPATIBLE,
} from './features.ts';
import * as L from './limits.ts';

export const QCOW2_MAGIC = 0x514649fb;

export interface Qcow2Header {
  readonly version: 2 | 3;
  readonly backingFileOffset: number;
  readonly backingFileSize: number;
  readonly clusterBits: number;
  readonly size: number;
  readonly cryptMethod: number;
  readonly l1Size: number;
  readonly l1TableOffset: number;
  readonly refcountTableOffset: number;
  readonly refcountTableClusters: number;
  readonly nbSnapshots: number;
  readonly snapshotsOffset: number;
  readonly incompatibleFeatures: bigint;
  readonly compatibleFeatures: bigint;
  readonly autoclearFeatures: bigint;
  readonly refcountOrder: number;
  readonly headerLength: number;
  readonly compressionType: number;
  /** Header bytes past the fields we know (header_length > 112), kept verbatim. */
  readonly extraHeaderBytes: Uint8Array;
}

export interface FeatureName {
  readonly type: number;
  readonly bit: number;
  readonly name: string;
}

export interface BitmapsExtension {
  readonly nbBitmaps: number;
  readonly directorySize: number;
  readonly directoryOffset: number;
}

export interface CryptoHeaderExtension {
  readonly offset: number;
  readonly length: number;
}

/** One header extension as found on disk; `offset` is where its type field starts. */
export interface HeaderExtension {
  readonly type: number;
  readonly offset: number;
  readonly data: Uint8Array;
}

export interface ParsedHeader {
  readonly header: Qcow2Header;
  /** Every extension in file order, known and unknown (unknown ones must survive a rewrite). */
  readonly extensions: readonly HeaderExtension[];
  readonly backingFile: string | undefined;
  readonly backingFormat: string | undefined;
  readonly featureNames: readonly FeatureName[];
  readonly bitmaps: BitmapsExtension | undefined;
  readonly cryptoHeader: CryptoHeaderExtension | undefined;
  readonly dataFile: string | undefined;
  /** Things QEMU would warn about but still open. */
  readonly warnings: readonly string[];
}

const S = 'qcow2 header';

function fail(field: string, offset: number, problem: string, data: Record<string, unknown> = {}): never {
  throw new FormatError(S, field, offset, problem, data);
}

const decoder = new TextDecoder('utf-8', { fatal: false });

/**
 * Decode and validate the header from the first bytes of the file (at least
 * min(file size, 2 MiB) so that all of cluster 0 is present).
 * `fileSize` bounds every table offset: a table that ends past the file is refused.
 */
export function decodeHeader(b: Uint8Array, fileSize: number): ParsedHeader {
  if (b.length < L.V2_HEADER_LENGTH) {
    fail('magic', 0, `file is too short to be a qcow2 image (${b.length} bytes)`);
  }
  const magic = u32(b, 0);
  if (magic !== QCOW2_MAGIC) fail('magic', 0, `not a qcow2 image (magic ${hex(magic)}, expected ${hex(QCOW2_MAGIC)})`);
  const version = u32(b, 4);
  if (version !== 2 && version !== 3) fail('version', 4, `unsupported qcow2 version ${version}`);
  const clusterBits = u32(b, 20);
  if (clusterBits < L.MIN_CLUSTER_BITS || clusterBits > L.MAX_CLUSTER_BITS) {
    fail('cluster_bits', 20, `${clusterBits} is outside ${L.MIN_CLUSTER_BITS}..${L.MAX_CLUSTER_BITS}`);
  }
  const clusterSize = 2 ** clusterBits;

  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let headerLength: number = L.V2_HEADER_LENGTH;
  let compressionType = COMPRESSION_DEFLATE;
  let extraHeaderBytes = new Uint8Array(0);
  if (version === 3) {
    if (b.length < L.V3_MIN_HEADER_LENGTH) fail('header_length', 100, 'file ends inside the v3 header');
    incompatibleFeatures = u64big(b, 72);
    compatibleFeatures = u64big(b, 80);
    autoclearFeatures = u64big(b, 88);
    refcountOrder = u32(b, 96);
    headerLength = u32(b, 100);
    if (headerLength < L.V3_MIN_HEADER_LENGTH) fail('header_length', 100, `${headerLength} is below the v3 minimum of 104`);
    if (headerLength % 8 !== 0) fail('header_length', 100, `${headerLength} is not a multiple of 8`);
    if (headerLength > clusterSize) fail('header_length', 100, `${headerLength} exceeds the cluster size ${clusterSize}`);
    if (headerLength > b.length) fail('header_length', 100, `${headerLength} runs past the end of the file`);
    if (headerLength > 104) compressionType = b[104]!;
    if (headerLength > L.V3_HEADER_LENGTH) extraHeaderBytes = b.slice(L.V3_HEADER_LENGTH, headerLength);
  }
  if (refcountOrder > 6) fail('refcount_order', 96, `${refcountOrder} is above 6 (refcounts wider than 64 bits)`);

  const unknownIncompat = incompatibleFeatures & ~INCOMPAT_KNOWN;
  // Names for unknown bits come from the image's own feature table, so read extensions first.
  const backingFileOffset = u64(b, 8);
  const backingFileSize = u32(b, 16);
  const size = u64(b, 24);
  const cryptMethod = u32(b, 32);
  const l1Size = u32(b, 36);
  const l1TableOffset = u64(b, 40);
  const refcountTableOffset = u64(b, 48);
  const refcountTableClusters = u32(b, 56);
  const nbSnapshots = u32(b, 60);
  const snapshotsOffset = u64(b, 64);

  if (backingFileOffset !== 0) {
    if (backingFileOffset > clusterSize) fail('backing_file_offset', 8, `${hex(u64big(b, 8))} lies outside cluster 0`);
    if (backingFileSize > Math.min(L.MAX_BACKING_FILE_NAME, clusterSize - backingFileOffset)) {
      fail('backing_file_size', 16, `backing file name of ${backingFileSize} bytes is too long`);
    }
    if (backingFileOffset + backingFileSize > b.length) fail('backing_file_offset', 8, 'backing file name runs past the end of the file');
  }

  const ext = decodeExtensions(b, headerLength, backingFileOffset !== 0 ? backingFileOffset : clusterSize, version);

  if (unknownIncompat !== 0n) {
    const names: string[] = [];
    for (let bit = 0n; bit < 64n; bit++) {
      if (!(unknownIncompat & (1n << bit))) continue;
      const named = ext.featureNames.find((f) => f.type === FEATURE_TYPE_INCOMPATIBLE && BigInt(f.bit) === bit);
      names.push(named ? `${named.name} (bit ${bit})` : `unknown incompatible feature bit ${bit}`);
    }
    throw new UnsupportedError(`qcow2 header: incompatible_features at offset 0x48: unsupported feature(s): ${names.join(', ')}`, {
      field: 'incompatible_features',
      offset: 0x48,
      bits: '0x' + unknownIncompat.toString(16),
    });
  }

  if (cryptMethod > CRYPT_LUKS) fail('crypt_method', 32, `unknown encryption method ${cryptMethod}`);
  if (cryptMethod !== CRYPT_NONE) {
    throw new UnsupportedError(
      `qcow2 header: crypt_method at offset 0x20: encrypted images (${cryptMethod === CRYPT_LUKS ? 'LUKS' : 'AES'}) are not supported`,
      { field: 'crypt_method', offset: 0x20, cryptMethod },
    );
  }
  // compared exactly: a JS number rounds 2^53 + 1 down to 2^53, which would pass
  const exactSize = u64big(b, 24);
  if (exactSize > BigInt(L.MAX_SUPPORTED_BYTES)) fail('size', 24, `virtual size ${exactSize} is above the supported 2^53 bytes`);

  if ((incompatibleFeatures & INCOMPAT_EXTL2) && clusterBits < L.MIN_EXTL2_CLUSTER_BITS) {
    fail('incompatible_features', 72, `extended L2 entries need clusters of at least 16 KiB (cluster_bits ${clusterBits})`);
  }
  if (compressionType !== COMPRESSION_DEFLATE && compressionType !== COMPRESSION_ZSTD) {
    fail('compression_type', 104, `unknown compression type ${compressionType}`);
  }
  if (compressionType === COMPRESSION_DEFLATE && (incompatibleFeatures & INCOMPAT_COMPRESSION)) {
    fail('incompatible_features', 72, 'compression type bit is set but compression_type is deflate');
  }
  if (compressionType !== COMPRESSION_DEFLATE && !(incompatibleFeatures & INCOMPAT_COMPRESSION)) {
    fail('compression_type', 104, 'compression_type is set but the compression type feature bit is not');
  }
  if ((autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) && !(incompatibleFeatures & INCOMPAT_DATA_FILE)) {
    fail('autoclear_features', 88, 'raw external data bit is set without an external data file');
  }

  // Tables: alignment, QEMU's size limits, and inside the file.
  const l2Entries = clusterSize / ((incompatibleFeatures & INCOMPAT_EXTL2) ? 16 : 8);
  const l1Needed = Math.ceil(size / (clusterSize * l2Entries));
  if (l1Size > L.MAX_L1_BYTES / 8) fail('l1_size', 36, `active L1 table of ${l1Size} entries is too large`);
  if (l1Size < l1Needed) fail('l1_size', 36, `L1 table of ${l1Size} entries is too small for a ${size}-byte disk (needs ${l1Needed})`);
  checkTable('l1_table_offset', 40, l1TableOffset, l1Size * 8, clusterSize, fileSize, S, u64big(b, 40));
  if (refcountTableClusters === 0) fail('refcount_table_clusters', 56, 'image has no refcount table');
  if (refcountTableClusters * clusterSize > L.MAX_REFTABLE_BYTES) {
    fail('refcount_table_clusters', 56, `refcount table of ${refcountTableClusters} clusters is too large`);
  }
  checkTable('refcount_table_offset', 48, refcountTableOffset, refcountTableClusters * clusterSize, clusterSize, fileSize, S, u64big(b, 48));
  if (nbSnapshots > L.MAX_SNAPSHOTS) fail('nb_snapshots', 60, `${nbSnapshots} snapshots is more than ${L.MAX_SNAPSHOTS}`);
  if (nbSnapshots > 0) checkTable('snapshots_offset', 64, snapshotsOffset, nbSnapshots * 40, clusterSize, fileSize, S, u64big(b, 64));
  // with no snapshots there is no table to find, but QEMU's open still refuses an unaligned offset,
  // and one past the largest file offset (2^63 - 1)
  else if (u64big(b, 64) % BigInt(clusterSize) !== 0n) fail('snapshots_offset', 64, `${hex(u64big(b, 64))} is not aligned to a cluster`);
  else if (u64big(b, 64) > 2n ** 63n - 1n) fail('snapshots_offset', 64, `${hex(u64big(b, 64))} is past the largest file offset`);

  let backingFile: string | undefined;
  if (backingFileOffset !== 0) backingFile = decoder.decode(b.subarray(backingFileOffset, backingFileOffset + backingFileSize));
  if ((incompatibleFeatures & INCOMPAT_DATA_FILE) && ext.dataFile === undefined) {
    fail('incompatible_features', 72, 'image needs an external data file but has no data file name extension');
  }

  const header: Qcow2Header = {
    version,
    backingFileOffset,
    backingFileSize,
    clusterBits,
    size,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    extraHeaderBytes,
  };
  const warnings = [...ext.warnings];
  let bitmaps = ext.bitmaps;
  if (bitmaps && !(autoclearFeatures & AUTOCLEAR_BITMAPS)) {
    // Another program wrote the image without knowing about bitmaps: they are stale.
    warnings.push('bitmaps extension present but the bitmaps autoclear bit is clear: bitmaps ignored');
    bitmaps = undefined;
  }
  // as QEMU: an extension the autoclear bit disowns is not looked into (qledger leaves one with no bitmaps while it adds the first)
  if (bitmaps) {
    const E = 'qcow2 header extension';
    const at = ext.bitmapsOffset;
    const raw = ext.extensions.find((e) => e.type === EXT_BITMAPS)!.data;
    if (u32(raw, 4) !== 0) throw new FormatError(E, 'bitmaps reserved', at + 4, 'reserved field is not zero');
    if (bitmaps.nbBitmaps > L.MAX_BITMAPS) throw new FormatError(E, 'nb_bitmaps', at, `${bitmaps.nbBitmaps} bitmaps is more than ${L.MAX_BITMAPS}`);
    if (bitmaps.nbBitmaps === 0) throw new FormatError(E, 'nb_bitmaps', at, 'bitmaps extension with no bitmaps');
    if (bitmaps.directorySize > L.MAX_BITMAP_DIRECTORY_BYTES) throw new FormatError(E, 'bitmap_directory_size', at + 8, `${u64big(raw, 8)} bytes is too large`);
    checkTable('bitmap_directory_offset', ext.bitmapsOffset + 16, bitmaps.directoryOffset, bitmaps.directorySize, clusterSize, fileSize, 'bitmaps extension', u64big(raw, 16));
  }
  return { header, ...ext, bitmaps, backingFile, warnings };
}

function checkTable(
  field: string,
  at: number,
  offset: number,
  bytes: number,
  clusterSize: number,
  fileSize: number,
  structure = S,
  /** the field's exact value: above 2^53 `offset` is rounded (2^60 + 1 would pass as aligned, and print wrong) */
  exact: bigint = BigInt(offset),
): void {
  if (exact % BigInt(clusterSize) !== 0n) throw new FormatError(structure, field, at, `${hex(exact)} is not aligned to a cluster`);
  if (bytes > 0 && offset === 0) throw new FormatError(structure, field, at, 'table would overlap the header at offset 0x0');
  if (offset + bytes > fileSize) {
    throw new FormatError(structure, field, at, `table at ${hex(exact)} (${bytes} bytes) ends past the end of the file (${hex(fileSize)})`);
  }
}

interface DecodedExtensions {
  extensions: HeaderExtension[];
  backingFormat: string | undefined;
  featureNames: FeatureName[];
  bitmaps: BitmapsExtension | undefined;
  bitmapsOffset: number;
  cryptoHeader: CryptoHeaderExtension | undefined;
  dataFile: string | undefined;
  warnings: string[];
}

function decodeExtensions(b: Uint8Array, start: number, end: number, version: number): DecodedExtensions {
  const out: DecodedExtensions = {
    extensions: [],
    backingFormat: undefined,
    featureNames: [],
    bitmaps: undefined,
    bitmapsOffset: 0,
    cryptoHeader: undefined,
    dataFile: undefined,
    warnings: [],
  };
  const limit = Math.min(end, b.length);
  let off = start;
  const E = 'qcow2 header extension';
  while (off < limit) {
    if (off + 8 > limit) throw new FormatError(E, 'type', off, 'extension header runs past the end of the header area');
    const type = u32(b, off);
    const len = u32(b, off + 4);
    // the length is checked before the type, as QEMU does: even the end marker's must fit
    if (len > limit - off - 8) throw new FormatError(E, 'length', off + 4, `extension ${hex(type)} of ${len} bytes runs past the end of the header area`);
    if (type === EXT_END) break;
    const data = b.slice(off + 8, off + 8 + len);
    out.extensions.push({ type, offset: off, data });
    switch (type) {
      case EXT_BACKING_FORMAT:
        if (len > L.MAX_BACKING_FORMAT_NAME) throw new FormatError(E, 'backing format length', off + 4, `${len} bytes is too long`);
        out.backingFormat = decoder.decode(data);
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= len; i += 48) {
          const raw = data.subarray(i + 2, i + 48);
          const nul = raw.indexOf(0);
          out.featureNames.push({ type: data[i]!, bit: data[i + 1]!, name: decoder.decode(nul < 0 ? raw : raw.subarray(0, nul)) });
        }
        break;
      case EXT_CRYPTO_HEADER:
        if (len !== 16) throw new FormatError(E, 'crypto header length', off + 4, `${len} bytes, expected 16`);
        out.cryptoHeader = { offset: u64(data, 0), length: u64(data, 8) };
        break;
      case EXT_BITMAPS: {
        if (version < 3) {
          out.warnings.push('bitmaps extension in a v2 image ignored');
          break;
        }
        if (len !== 24) throw new FormatError(E, 'bitmaps length', off + 4, `${len} bytes, expected 24`);
        // the rest is checked only when the autoclear bit owns the extension (decodeHeader), as QEMU does
        out.bitmaps = { nbBitmaps: u32(data, 0), directorySize: u64(data, 8), directoryOffset: u64(data, 16) };
        out.bitmapsOffset = off + 8;
        break;
      }
      case EXT_DATA_FILE:
        out.dataFile = decoder.decode(data);
        break;
      default:
        break; // unknown: kept verbatim in `extensions`
    }
    off += 8 + Math.ceil(len / 8) * 8;
  }
  return out;
}

export interface EncodeHeaderInput {
  readonly header: Qcow2Header;
  readonly extensions: readonly { type: number; data: Uint8Array }[];
  readonly backingFile?: string | undefined;
}

/**
 * Encode header, extensions and backing file name into one buffer that fits
 * in cluster 0. Extensions are written in the order given; the end marker is
 * added. The backing file name goes right after the extensions.
 */
export function encodeHeader(input: EncodeHeaderInput): Uint8Array {
  const h = input.header;
  const clusterSize = 2 ** h.clusterBits;
  const headerLength = h.version === 2 ? L.V2_HEADER_LENGTH : h.headerLength;
  let extBytes = 8;
  for (const e of input.extensions) extBytes += 8 + Math.ceil(e.data.length / 8) * 8;
  const name = input.backingFile !== undefined ? new TextEncoder().encode(input.backingFile) : undefined;
  const total = headerLength + extBytes + (name?.length ?? 0);
  if (total > clusterSize) throw new FormatError(S, 'header_length', 100, `header and extensions (${total} bytes) do not fit in one cluster`);
  const b = new Uint8Array(total);
  putU32(b, 0, QCOW2_MAGIC);
  putU32(b, 4, h.version);
  const backingOffset = name ? headerLength + extBytes : 0;
  putU64(b, 8, backingOffset);
  putU32(b, 16, name?.length ?? 0);
  putU32(b, 20, h.clusterBits);
  putU32(b, 32, h.cryptMethod);
  putU32(b, 60, h.nbSnapshots);
  putU64(b, 64, h.snapshotsOffset);
  putMutableFields(b, h.version, h);
  if (h.version === 3) {
    putU32(b, 96, h.refcountOrder);
    putU32(b, 100, headerLength);
    if (headerLength > 104) b[104] = h.compressionType;
    if (headerLength > L.V3_HEADER_LENGTH) b.set(h.extraHeaderBytes.subarray(0, headerLength - L.V3_HEADER_LENGTH), L.V3_HEADER_LENGTH);
  }
  let off = headerLength;
  for (const e of input.extensions) {
    putU32(b, off, e.type);
    putU32(b, off + 4, e.data.length);
    b.set(e.data, off + 8);
    off += 8 + Math.ceil(e.data.length / 8) * 8;
  }
  off += 8; // end marker: already zero
  if (name) b.set(name, off);
  return b;
}

/** The header fields a running image changes (size, tables, feature bits). */
export type MutableHeaderFields = Pick<
  Qcow2Header,
  'size' | 'l1Size' | 'l1TableOffset' | 'refcountTableOffset' | 'refcountTableClusters' | 'incompatibleFeatures' | 'compatibleFeatures' | 'autoclearFeatures'
> &
  Partial<Pick<Qcow2Header, 'nbSnapshots' | 'snapshotsOffset'>>;

/**
 * Bytes of the header's fixed fields: 72 for v2; for v3 the header_length
 * field, up to the 112 bytes this implementation knows (fields past them are
 * kept verbatim by whoever rewrites the header).
 */
export function fixedHeaderLength(version: 2 | 3, headerLength: number): number {
  return version === 2 ? 72 : Math.min(headerLength, 112);
}

/** Write the mutable fields into header bytes `b` (the feature words only for v3). */
export function putMutableFields(b: Uint8Array, version: 2 | 3, f: MutableHeaderFields): void {
  putU64(b, 24, f.size);
  putU32(b, 36, f.l1Size);
  putU64(b, 40, f.l1TableOffset);
  putU64(b, 48, f.refcountTableOffset);
  putU32(b, 56, f.refcountTableClusters);
  // the snapshot table's fields change only with the table (internal snapshots); unset: left as they are
  if (f.nbSnapshots !== undefined) putU32(b, 60, f.nbSnapshots);
  if (f.snapshotsOffset !== undefined) putU64(b, 64, f.snapshotsOffset);
  if (version === 3) {
    putU64(b, 72, f.incompatibleFeatures);
    putU64(b, 80, f.compatibleFeatures);
    putU64(b, 88, f.autoclearFeatures);
  }
}

/** The feature name table QEMU writes, as extension data. */
export function encodeFeatureTable(names: readonly FeatureName[] = KNOWN_FEATURE_NAMES): Uint8Array {
  const d = new Uint8Array(names.length * 48);
  names.forEach((f, i) => {
    d[i * 48] = f.type;
    d[i * 48 + 1] = f.bit;
    d.set(new TextEncoder().encode(f.name).subarray(0, 46), i * 48 + 2);
  });
  return d;
}

/** Derived geometry that every layer needs. */
export interface Geometry {
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly extendedL2: boolean;
  /** bytes per L2 entry: 8, or 16 with extended L2 */
  readonly l2EntrySize: number;
  readonly l2Entries: number;
  readonly l2Bits: number;
  readonly subclusterSize: number;
  readonly subclustersPerCluster: number;
  readonly refcountOrder: number;
  readonly refcountBits: number;
  readonly refcountBlockEntries: number;
}

/** The L1 entry that maps guest offset `off` (QEMU's offset_to_l1_index). */
export function l1IndexOf(g: Geometry, off: number): number {
  return Math.floor(off / (g.l2Entries * g.clusterSize));
}

/** The entry of its L2 table that maps guest offset `off` (QEMU's offset_to_l2_index). */
export function l2IndexOf(g: Geometry, off: number): number {
  return Math.floor(off / g.clusterSize) % g.l2Entries;
}

export function geometryOf(h: Qcow2Header): Geometry {
  const clusterSize = 2 ** h.clusterBits;
  const extendedL2 = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
  const l2EntrySize = extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / l2EntrySize;
  const subclustersPerCluster = extendedL2 ? 32 : 1;
  return {
    clusterBits: h.clusterBits,
    clusterSize,
    extendedL2,
    l2EntrySize,
    l2Entries,
    l2Bits: Math.log2(l2Entries),
    subclusterSize: clusterSize / subclustersPerCluster,
    subclustersPerCluster,
    refcountOrder: h.refcountOrder,
    refcountBits: 2 ** h.refcountOrder,
    refcountBlockEntries: (clusterSize * 8) / 2 ** h.refcountOrder,
  };
}


/** The bitmaps extension's fields as the metadata state keeps them: the extension's when the autoclear bit owns it, else 0. */
export function bitmapsFields(p: Pick<ParsedHeader, 'bitmaps'>): { nbBitmaps: number; bitmapDirectorySize: number; bitmapDirectoryOffset: number } {
  const b = p.bitmaps;
  return { nbBitmaps: b?.nbBitmaps ?? 0, bitmapDirectorySize: b?.directorySize ?? 0, bitmapDirectoryOffset: b?.directoryOffset ?? 0 };
}
