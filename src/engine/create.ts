/**
 * Image creation with qemu-img's qcow2 options. Like QEMU, we first write a
 * minimal valid image (header, one refcount-table cluster, one refcount
 * block, no L1 table) and then grow it to its size through the write engine,
 * so the L1 table is placed by the same allocator and ordering as any other
 * growth; the image is valid at every step.
 */

import { UsageError, UnsupportedError } from '../errors.ts';
import { FileDevice } from '../io/file-device.ts';
import type { BlockDevice } from '../io/device.ts';
import { encodeHeader, encodeFeatureTable, type Qcow2Header } from '../format/header.ts';
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_DEFLATE,
  COMPRESSION_ZSTD,
  EXT_BACKING_FORMAT,
  EXT_DATA_FILE,
  EXT_FEATURE_TABLE,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2,
} from '../format/features.ts';
import { setRefcountTableEntry, setRefcount } from '../format/refcount.ts';
import { MAX_BACKING_FILE_NAME, MIN_CLUSTER_BITS, MAX_CLUSTER_BITS, MIN_EXTL2_CLUSTER_BITS } from '../format/limits.ts';
import { combinePath, openLayer } from './open.ts';

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

export interface CreateOptions {
  /** virtual size in bytes; may be omitted with a backing file (its size is used) */
  readonly size?: number | undefined;
  readonly clusterSize?: number | undefined;
  /** '0.10' (v2) or '1.1' (v3); QEMU's aliases v2 and v3 are accepted too */
  readonly compat?: string | undefined;
  readonly refcountBits?: number | undefined;
  readonly lazyRefcounts?: boolean | undefined;
  readonly extendedL2?: boolean | undefined;
  readonly compressionType?: 'zlib' | 'zstd' | undefined;
  readonly backingFile?: string | undefined;
  readonly backingFormat?: 'qcow2' | 'raw' | undefined;
  readonly dataFile?: string | undefined;
  readonly dataFileRaw?: boolean | undefined;
  readonly preallocation?: Preallocation | undefined;
}

/** The option names `create -o` accepts, as qemu-img spells them. */
export const CREATE_OPTION_NAMES = [
  'size',
  'cluster_size',
  'compat',
  'refcount_bits',
  'lazy_refcounts',
  'extended_l2',
  'compression_type',
  'backing_file',
  'backing_fmt',
  'data_file',
  'data_file_raw',
  'preallocation',
] as const;

function onOff(name: string, v: string): boolean {
  if (v === 'on' || v === 'true' || v === 'yes') return true;
  if (v === 'off' || v === 'false' || v === 'no') return false;
  throw new UsageError(`Parameter '${name}' expects 'on' or 'off'`);
}

/** Parse `-o` options (already split into a map) into CreateOptions. */
export function createOptionsFrom(map: ReadonlyMap<string, string>, parseSize: (t: string, what: string) => number): CreateOptions {
  const o: { -readonly [K in keyof CreateOptions]: CreateOptions[K] } = {};
  for (const [k, v] of map) {
    switch (k) {
      case 'size':
        o.size = parseSize(v, 'size');
        break;
      case 'cluster_size':
        o.clusterSize = parseSize(v, 'cluster_size');
        break;
      case 'compat':
        o.compat = v;
        break;
      case 'refcount_bits':
        o.refcountBits = Number(v);
        if (!Number.isInteger(o.refcountBits)) throw new UsageError(`Parameter 'refcount_bits' expects a number`);
        break;
      case 'lazy_refcounts':
        o.lazyRefcounts = onOff(k, v);
        break;
      case 'extended_l2':
        o.extendedL2 = onOff(k, v);
        break;
      case 'compression_type':
        if (v !== 'zlib' && v !== 'zstd') throw new UsageError(`Parameter 'compression_type' does not accept value '${v}'`);
        o.compressionType = v;
        break;
      case 'backing_file':
        o.backingFile = v;
        break;
      case 'backing_fmt':
        if (v !== 'qcow2' && v !== 'raw') throw new UsageError(`Unknown backing format '${v}' (qledger handles qcow2 and raw)`);
        o.backingFormat = v;
        break;
      case 'data_file':
        o.dataFile = v;
        break;
      case 'data_file_raw':
        o.dataFileRaw = onOff(k, v);
        break;
      case 'preallocation':
        if (v !== 'off' && v !== 'metadata' && v !== 'falloc' && v !== 'full') throw new UsageError(`Parameter 'preallocation' does not accept value '${v}'`);
        o.preallocation = v;
        break;
      case 'encryption':
      case 'encrypt.format':
        throw new UnsupportedError(`encryption is not supported`);
      default:
        throw new UsageError(`Invalid parameter '${k}'`);
    }
  }
  return o;
}

export interface CreatePlan {
  readonly header: Qcow2Header;
  readonly extensions: { type: number; data: Uint8Array }[];
  readonly size: number;
  readonly preallocation: Preallocation;
  /** qemu-img's "Formatting ..." line */
  readonly summary: string;
}

/** Validate options as qemu-img does (same messages) and lay out the header. */
export async function planCreate(path: string, o: CreateOptions): Promise<CreatePlan> {
  const cs = o.clusterSize ?? 65536;
  const bitsOf = Math.log2(cs);
  if (!Number.isInteger(bitsOf) || bitsOf < MIN_CLUSTER_BITS || bitsOf > MAX_CLUSTER_BITS) {
    throw new UsageError(`${path}: Cluster size must be a power of two between 512 and 2048k`);
  }
  const compat = o.compat ?? '1.1';
  let version: 2 | 3;
  if (compat === '0.10' || compat === 'v2') version = 2;
  else if (compat === '1.1' || compat === 'v3') version = 3;
  else throw new UsageError(`${path}: Parameter 'compat' does not accept value '${compat}'`);
  const rb = o.refcountBits ?? 16;
  const order = Math.log2(rb);
  if (!Number.isInteger(order) || order < 0 || order > 6) throw new UsageError(`${path}: Refcount width must be a power of two and may not exceed 64 bits`);
  if (version === 2 && rb !== 16) throw new UsageError(`${path}: Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)`);
  if (version === 2 && o.lazyRefcounts) throw new UsageError(`${path}: Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)`);
  if (o.extendedL2 && version === 2) throw new UsageError(`${path}: Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)`);
  if (o.extendedL2 && bitsOf < MIN_EXTL2_CLUSTER_BITS) throw new UsageError(`${path}: Extended L2 entries are only supported with cluster sizes of at least 16384 bytes`);
  if (o.compressionType === 'zstd' && version === 2) {
    throw new UsageError(`${path}: Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)`);
  }
  if (o.dataFile !== undefined && version === 2) throw new UsageError(`${path}: data-file is only supported with compatibility level 1.1 and above (use version=v3 or greater)`);
  if (o.dataFileRaw && o.dataFile === undefined) throw new UsageError(`${path}: data-file-raw requires data-file`);
  if (o.dataFile !== undefined && o.backingFile !== undefined && o.dataFileRaw) {
    throw new UsageError(`${path}: Backing file and data-file-raw cannot be used at the same time`);
  }
  if (o.backingFile !== undefined && o.backingFormat === undefined) throw new UsageError(`${path}: Backing file specified without backing format`);
  if (o.backingFile !== undefined && new TextEncoder().encode(o.backingFile).length > MAX_BACKING_FILE_NAME) {
    throw new UsageError(`${path}: backing file name is longer than ${MAX_BACKING_FILE_NAME} bytes`);
  }
  const prealloc = o.preallocation ?? 'off';
  if (prealloc !== 'off' && o.backingFile !== undefined && !o.extendedL2) throw new UsageError(`${path}: Backing file and preallocation can only be used at the same time if extended_l2 is on`);

  let size = o.size;
  if (size === undefined) {
    if (o.backingFile === undefined) throw new UsageError(`${path}: Image creation needs a size parameter`);
    const b = await openLayer(combinePath(path, o.backingFile), { format: o.backingFormat, noBacking: true });
    size = b.size;
    await b.close();
  }
  if (!Number.isSafeInteger(size) || size < 0) throw new UsageError(`${path}: Invalid image size specified`);
  size = Math.ceil(size / 512) * 512;

  let incompat = 0n;
  if (o.extendedL2) incompat |= INCOMPAT_EXTL2;
  if (o.compressionType === 'zstd') incompat |= INCOMPAT_COMPRESSION;
  if (o.dataFile !== undefined) incompat |= INCOMPAT_DATA_FILE;
  const header: Qcow2Header = {
    version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: bitsOf,
    size: 0,
    cryptMethod: 0,
    l1Size: 0,
    l1TableOffset: 0,
    refcountTableOffset: cs,
    refcountTableClusters: 1,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: incompat,
    compatibleFeatures: o.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: o.dataFileRaw ? AUTOCLEAR_DATA_FILE_RAW : 0n,
    refcountOrder: order,
    headerLength: version === 3 ? 112 : 72,
    compressionType: o.compressionType === 'zstd' ? COMPRESSION_ZSTD : COMPRESSION_DEFLATE,
    extraHeaderBytes: new Uint8Array(0),
  };
  const extensions: { type: number; data: Uint8Array }[] = [];
  if (o.backingFormat !== undefined && o.backingFile !== undefined) extensions.push({ type: EXT_BACKING_FORMAT, data: new TextEncoder().encode(o.backingFormat) });
  if (o.dataFile !== undefined) extensions.push({ type: EXT_DATA_FILE, data: new TextEncoder().encode(o.dataFile) });
  if (version === 3) extensions.push({ type: EXT_FEATURE_TABLE, data: encodeFeatureTable() });

  const parts = [`Formatting '${path}', fmt=qcow2 cluster_size=${cs} extended_l2=${o.extendedL2 ? 'on' : 'off'}`];
  if (prealloc !== 'off') parts.push(`preallocation=${prealloc}`);
  parts.push(`compression_type=${o.compressionType ?? 'zlib'} size=${size}`);
  if (o.backingFile !== undefined) parts.push(`backing_file=${o.backingFile} backing_fmt=${o.backingFormat}`);
  if (o.dataFile !== undefined) parts.push(`data_file=${o.dataFile}${o.dataFileRaw ? ' data_file_raw=on' : ''}`);
  if (version === 2) parts.push('compat=0.10');
  parts.push(`lazy_refcounts=${o.lazyRefcounts ? 'on' : 'off'} refcount_bits=${rb}`);
  return { header, extensions, size, preallocation: prealloc, summary: parts.join(' ') };
}

/**
 * Write the minimal image of a plan: cluster 0 header, cluster 1 refcount
 * table, cluster 2 the first refcount block, counting clusters 0-2. The
 * caller then grows it to its size with the write engine.
 */
export async function writeSkeleton(path: string, plan: CreatePlan, backingFile: string | undefined): Promise<void> {
  const dev = await FileDevice.open(path, { readOnly: false, create: true });
  try {
    await writeSkeletonTo(dev, plan, backingFile);
  } finally {
    await dev.close();
  }
}

/** The skeleton on any device (an empty one): the crash harness creates images in memory. */
export async function writeSkeletonTo(dev: BlockDevice, plan: CreatePlan, backingFile: string | undefined): Promise<void> {
  const h = plan.header;
  const cs = 2 ** h.clusterBits;
  const head = encodeHeader({ header: h, extensions: plan.extensions, backingFile });
  const image = new Uint8Array(3 * cs);
  image.set(head, 0);
  setRefcountTableEntry(image.subarray(cs, 2 * cs), 0, 2 * cs);
  const block = image.subarray(2 * cs, 3 * cs);
  for (let c = 0; c < 3; c++) setRefcount(block, c, h.refcountOrder, 1);
  await dev.write(0, image);
  await dev.flush();
}
