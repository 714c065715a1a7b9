/**
 * Opening an image and its backing chain, read-only. Backing names resolve
 * as QEMU's path_combine() does: relative names against the directory of the
 * image that names them. A chain that revisits a file, or is deeper than
 * MAX_BACKING_CHAIN, is an error rather than a hang.
 */

import { realpath } from 'node:fs/promises';
import { FormatError, NotFoundError, QledgerError, UnsupportedError, UsageError } from '../errors.ts';
import { FileDevice } from '../io/file-device.ts';
import { imagePermissions, LockedError } from '../io/image-lock.ts';
import type { BlockDevice } from '../io/device.ts';
import { readAt } from '../io/device.ts';
import { QCOW2_MAGIC } from '../format/header.ts';
import { u32 } from '../format/bytes.ts';
import { MAX_BACKING_CHAIN } from '../format/limits.ts';
import { INCOMPAT_DATA_FILE } from '../format/features.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';
import { loadQcow2, openQcow2Layer } from './qcow2-layer.ts';
import type { ParsedHeader } from '../format/header.ts';
import { UNTRUSTED_MAX_DEPTH, UntrustedError, allowedDirOf, checkMetadataSize, checkReference } from './untrusted.ts';
import { RawLayer } from './raw-layer.ts';
import type { Layer } from './layer.ts';

export type ImageFormat = 'qcow2' | 'raw';

export interface OpenOptions {
  /** the format; probed from the magic when absent */
  readonly format?: ImageFormat | undefined;
  /** open the content of this internal snapshot (by id, then by name) instead of the active state */
  readonly snapshot?: string | undefined;
  /** do not open backing files (info without --backing-chain needs none) */
  readonly noBacking?: boolean | undefined;
  /**
   * share every permission with other users of the files, as qemu-img -U
   * (read-only opens only): opens an image another program is writing,
   * whose content may then change underneath
   */
  readonly forceShare?: boolean | undefined;
  /**
   * lock the top image as a writer would although it is read here (qemu-io
   * opens read-write unless -r, so it refuses an image in use for writing)
   */
  readonly lockAsWriter?: boolean | undefined;
  /**
   * false: the image came from somewhere else (engine/untrusted.ts): its
   * backing and data files must lie in `allowedDir` and a backing file must
   * name its format; the chain and the tables are bounded. Default true.
   */
  readonly trusted?: boolean | undefined;
  /** with `trusted: false`: where referenced files may be (default: the image's directory) */
  readonly allowedDir?: string | undefined;
}

/** The untrusted policy's directory, fixed by the top image (undefined: trusted). */
type Fence = string | undefined;

/** QEMU's path_combine(): a relative name is taken relative to the directory of `base`. */
export function combinePath(base: string, name: string): string {
  if (name.startsWith('/') || /^[a-z][a-z0-9+.-]*:/i.test(name)) return name;
  const slash = base.lastIndexOf('/');
  return slash < 0 ? name : base.slice(0, slash + 1) + name;
}

export async function probeFormat(dev: BlockDevice): Promise<ImageFormat> {
  const head = await readAt(dev, 0, 4);
  return u32(head, 0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
}

export async function openLayer(path: string, opts: OpenOptions = {}): Promise<Layer> {
  return openAt(path, opts, new Set(), 0, opts.trusted === false ? allowedDirOf(path, opts) : undefined);
}

async function openAt(path: string, opts: OpenOptions, seen: Set<string>, depth: number, fence: Fence): Promise<Layer> {
  if (depth > MAX_BACKING_CHAIN) throw new UnsupportedError(`${path}: backing chain is deeper than ${MAX_BACKING_CHAIN} images`, { path });
  if (fence !== undefined && depth > UNTRUSTED_MAX_DEPTH) throw new UntrustedError(`${path}: backing chain is deeper than ${UNTRUSTED_MAX_DEPTH} images, the untrusted limit`, { path });
  const real = await realpath(path).catch(() => path);
  if (seen.has(real)) throw new FormatError('backing chain', 'backing_file_offset', 8, `${path} is its own backing file (chain loop)`, { path });
  seen.add(real);

  const dev = await FileDevice.open(path, { readOnly: true, lock: imagePermissions({ readOnly: !opts.lockAsWriter, forceShare: opts.forceShare }) });
  try {
    return await layerOn(dev, path, opts, seen, depth, fence);
  } catch (e) {
    await dev.close();
    if (e instanceof QledgerError && !e.message.includes(path)) {
      // Name the file in messages from deeper in the chain.
      Object.defineProperty(e, 'message', { value: `${path}: ${e.message}` });
    }
    throw e;
  }
}

/**
 * The layer of the image on `dev` (named `path` in messages; a backing file
 * or data file it names resolves against that name, as for files).
 */
async function layerOn(dev: BlockDevice, path: string, opts: OpenOptions, seen: Set<string>, depth: number, fence: Fence): Promise<Layer> {
  const format = opts.format ?? (await probeFormat(dev));
  if (format === 'raw') {
    if (opts.snapshot !== undefined) throw new UsageError(`${path}: raw images have no snapshots`);
    return new RawLayer(path, dev, await dev.size());
  }
  const loaded = await loadQcow2(dev);
  const { parsed, snapshots } = loaded;
  const h = parsed.header;
  if (fence !== undefined) checkUntrusted(path, loaded, fence, !opts.noBacking);
  let view: { l1TableOffset: number; l1Size: number; size: number } | undefined;
  if (opts.snapshot !== undefined) {
    const sn = findSnapshot(snapshots, opts.snapshot);
    if (!sn) throw new NotFoundError(`${path}: no snapshot with id or name '${opts.snapshot}'`, { path, snapshot: opts.snapshot });
    view = { l1TableOffset: sn.l1TableOffset, l1Size: sn.l1Size, size: sn.diskSize ?? h.size };
  }

  let dataDev: BlockDevice | undefined;
  if ((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n && parsed.dataFile !== undefined) {
    const dataPath = combinePath(path, parsed.dataFile);
    dataDev = await FileDevice.open(dataPath, { readOnly: true, lock: imagePermissions({ readOnly: !opts.lockAsWriter, dataFile: true, forceShare: opts.forceShare }) }).catch((e: unknown) => {
      if (e instanceof LockedError) throw e;
      throw new NotFoundError(`${path}: could not open external data file '${dataPath}': ${(e as Error).message}`, { path, dataFile: dataPath });
    });
  }

  let backing: Layer | undefined;
  if (parsed.backingFile !== undefined && !opts.noBacking) {
    const bpath = combinePath(path, parsed.backingFile);
    const bfmt = parsed.backingFormat;
    if (bfmt !== undefined && bfmt !== 'qcow2' && bfmt !== 'raw') {
      throw new UnsupportedError(`${path}: backing file format '${bfmt}' is not supported (qcow2 and raw are)`, { path, backingFormat: bfmt });
    }
    try {
      backing = await openAt(bpath, { format: bfmt as ImageFormat | undefined, forceShare: opts.forceShare }, seen, depth + 1, fence);
    } catch (e) {
      await dataDev?.close();
      if (e instanceof NotFoundError && e.data['path'] === bpath) {
        throw new NotFoundError(`${path}: could not open backing file '${bpath}': no such file`, { path, backingFile: bpath });
      }
      throw e;
    }
  }
  try {
    return await openQcow2Layer(dev, path, { loaded, backing, dataDev, view });
  } catch (e) {
    await dataDev?.close();
    await backing?.close();
    throw e;
  }
}

/**
 * Open the image on a caller's device (the memory device, or a user's
 * own), read-only, with its backing chain resolved against `dev.name`. The
 * caller keeps the device: it is closed with the layer, not on failure.
 */
export async function openDeviceLayer(dev: BlockDevice, opts: OpenOptions = {}): Promise<Layer> {
  return layerOn(dev, dev.name, opts, new Set(), 0, opts.trusted === false ? allowedDirOf(dev.name, opts) : undefined);
}

/** The untrusted policy's checks of one image of a chain, before anything it names is opened. */
export function checkUntrusted(path: string, loaded: { parsed: ParsedHeader; snapshotTableBytes: number }, fence: string, backingToo: boolean): void {
  const { parsed } = loaded;
  checkMetadataSize(path, parsed, loaded.snapshotTableBytes);
  if ((parsed.header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n && parsed.dataFile !== undefined) checkReference(path, 'data file', parsed.dataFile, combinePath(path, parsed.dataFile), fence);
  if (backingToo && parsed.backingFile !== undefined) checkReference(path, 'backing file', parsed.backingFile, combinePath(path, parsed.backingFile), fence, parsed.backingFormat);
}

/** QEMU's lookup for -l: by id first, then by name. */
export function findSnapshot(list: readonly SnapshotEntry[], key: string): SnapshotEntry | undefined {
  return list.find((s) => s.id === key) ?? list.find((s) => s.name === key);
}
