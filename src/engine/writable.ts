/**
 * Opening a qcow2 image for writing, and creating one. The backing chain
 * stays read-only; an external data file opens read-write with the image.
 */

import { NotFoundError, QledgerError, UnsupportedError } from '../errors.ts';
import { FileDevice } from '../io/file-device.ts';
import type { BlockDevice } from '../io/device.ts';
import { INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, AUTOCLEAR_DATA_FILE_RAW } from '../format/features.ts';
import { loadQcow2 } from './qcow2-layer.ts';
import { combinePath, openLayer, probeFormat, type ImageFormat } from './open.ts';
import { Qcow2Writer, type DetectZeroes, type TraceEvent } from './writer.ts';
import { countReferences } from './check.ts';
import { planCreate, writeSkeleton, writeSkeletonTo, type CreateOptions } from './create.ts';
import type { Fault } from './ordering.ts';
import type { Layer } from './layer.ts';
import { RawLayer } from './raw-layer.ts';
import { MemoryDevice } from '../io/memory-device.ts';

export interface WritableOpenOptions {
  readonly format?: ImageFormat | undefined;
  readonly trace?: TraceEvent[] | undefined;
  readonly writebackRecords?: number | undefined;
  /** test-only: break one ordering rule (the crash harness must catch it) */
  readonly fault?: Fault | undefined;
  readonly detectZeroes?: DetectZeroes | undefined;
  /** bytes of clean tables kept in memory between write-backs (default 64 MiB) */
  readonly cacheBytes?: number | undefined;
}

/**
 * Open a qcow2 image on any device for writing (the crash harness uses
 * in-memory recording devices). `backing` is the already opened backing
 * layer, if the image has one.
 */
export async function openWriterOnDevice(dev: BlockDevice, name: string, opts: WritableOpenOptions & { backing?: Layer | undefined } = {}): Promise<Qcow2Writer> {
  const { parsed, fileSize, snapshots } = await loadQcow2(dev);
  const writer = await Qcow2Writer.open({ filename: name, dev, parsed, fileSize, snapshots, backing: opts.backing, trace: opts.trace, writebackRecords: opts.writebackRecords, fault: opts.fault, detectZeroes: opts.detectZeroes, cacheBytes: opts.cacheBytes });
  await repairIfDirty(writer, dev, name, parsed.header.incompatibleFeatures);
  return writer;
}

/**
 * A crash under lazy refcounts leaves the dirty bit: refcounts are rebuilt
 * from the references, counted as the checker counts them, before anything
 * else is written, as QEMU does on open. The open has just cleared the
 * bitmaps' autoclear bit, so their clusters are no longer references.
 */
async function repairIfDirty(writer: Qcow2Writer, dev: BlockDevice, name: string, incompatible: bigint): Promise<void> {
  if ((incompatible & INCOMPAT_DIRTY) === 0n) return;
  const refs = await countReferences(dev, name, { bitmaps: false });
  await writer.applyRefcounts(refs.get, refs.endCluster);
  await writer.markClean();
}

/**
 * Create a qcow2 image on an empty device. A backing file, if named, must
 * be given as raw bytes (`backing`); data files are not supported here.
 */
export async function createOnDevice(dev: BlockDevice, name: string, o: CreateOptions, backing?: Uint8Array | Layer): Promise<void> {
  if (o.dataFile !== undefined) throw new UnsupportedError('in-memory images take no data file');
  if ((o.backingFile !== undefined) !== (backing !== undefined)) throw new UnsupportedError('an in-memory image names a backing file exactly when its bytes are given');
  const layer = backing instanceof Uint8Array ? new RawLayer(o.backingFile!, new MemoryDevice(o.backingFile!, backing, { readOnly: true }), backing.length) : backing;
  const plan = await planCreate(name, { ...o, size: o.size ?? layer?.size });
  await writeSkeletonTo(dev, plan, o.backingFile);
  const w = await openWriterOnDevice(dev, name, { backing: layer });
  if (plan.size > 0) await w.truncate(plan.size, true);
  if (plan.preallocation !== 'off') await w.preallocate(plan.preallocation);
  await w.close();
}

export async function openWriter(path: string, opts: WritableOpenOptions = {}): Promise<Qcow2Writer> {
  const dev = await FileDevice.open(path, { readOnly: false });
  let dataDev: BlockDevice | undefined;
  let backing: Layer | undefined;
  try {
    const format = opts.format ?? (await probeFormat(dev));
    if (format !== 'qcow2') throw new UnsupportedError(`${path}: writing is supported for qcow2 images only (this one is ${format})`, { path });
    const { parsed, fileSize, snapshots } = await loadQcow2(dev);
    const h = parsed.header;
    if ((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n && parsed.dataFile !== undefined) {
      const dataPath = combinePath(path, parsed.dataFile);
      dataDev = await FileDevice.open(dataPath, { readOnly: false }).catch((e: unknown) => {
        throw new NotFoundError(`${path}: could not open external data file '${dataPath}': ${(e as Error).message}`, { path, dataFile: dataPath });
      });
    }
    if (parsed.backingFile !== undefined) {
      const bfmt = parsed.backingFormat;
      if (bfmt !== undefined && bfmt !== 'qcow2' && bfmt !== 'raw') throw new UnsupportedError(`${path}: backing file format '${bfmt}' is not supported`, { path });
      backing = await openLayer(combinePath(path, parsed.backingFile), { format: bfmt as ImageFormat | undefined });
    }
    const writer = await Qcow2Writer.open({ filename: path, dev, dataDev, parsed, fileSize, snapshots, backing, trace: opts.trace, writebackRecords: opts.writebackRecords, fault: opts.fault, detectZeroes: opts.detectZeroes, cacheBytes: opts.cacheBytes });
    await repairIfDirty(writer, dev, path, h.incompatibleFeatures);
    return writer;
  } catch (e) {
    await backing?.close();
    await dataDev?.close();
    await dev.close();
    throw e;
  }
}

export interface CreateResult {
  readonly summary: string;
}

/** qemu-img create -f qcow2: write the skeleton, grow it to its size, preallocate. */
export async function createImage(path: string, o: CreateOptions, trace?: TraceEvent[]): Promise<CreateResult> {
  const plan = await planCreate(path, o);
  if (o.dataFile !== undefined) {
    const d = await FileDevice.open(combinePath(path, o.dataFile), { readOnly: false, create: true });
    try {
      if ((plan.header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n) await d.truncate(plan.size);
    } finally {
      await d.close();
    }
  }
  await writeSkeleton(path, plan, o.backingFile);
  const w = await openWriter(path, { trace });
  try {
    if (plan.size > 0) await w.truncate(plan.size, true);
    if (plan.preallocation !== 'off') await w.preallocate(plan.preallocation);
    await w.close();
  } catch (e) {
    await w.abandon().catch(() => undefined);
    if (e instanceof QledgerError) throw e;
    throw e;
  }
  return { summary: plan.summary };
}
