/**
 * Opening a qcow2 image for writing, and creating one. The backing chain
 * stays read-only; an external data file opens read-write with the image.
 */

import { NotFoundError, QledgerError, UnsupportedError } from '../errors.ts';
import { FileDevice } from '../io/file-device.ts';
import { imagePermissions, LockedError } from '../io/image-lock.ts';
import type { BlockDevice } from '../io/device.ts';
import { INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, AUTOCLEAR_DATA_FILE_RAW } from '../format/features.ts';
import { getRefcount } from '../format/refcount.ts';
import { u64 } from '../format/bytes.ts';
import { readAt } from '../io/device.ts';
import type { SnapshotEntry } from '../format/snapshot.ts';
import type { ParsedHeader } from '../format/header.ts';
import { locateJournal } from './journal/locate.ts';
import { planJournal, type JournalPlan } from './journal/live.ts';
import { recoverJournal, type RecoveryReport } from './journal/replay.ts';
import { loadQcow2 } from './qcow2-layer.ts';
import { checkUntrusted, combinePath, openLayer, probeFormat, type ImageFormat } from './open.ts';
import { allowedDirOf } from './untrusted.ts';
import { Qcow2Writer, type DetectZeroes, type TraceEvent } from './writer.ts';
import { countReferences } from './check/count.ts';
import { planCreate, writeSkeleton, writeSkeletonTo, type CreateOptions } from './create.ts';
import type { Fault } from './faults.ts';
import type { Layer } from './layer.ts';
import type { OverlapMode } from './write/overlap.ts';
import { RawLayer } from './raw-layer.ts';
import { MemoryDevice } from '../io/memory-device.ts';

export interface WritableOpenOptions {
  readonly format?: ImageFormat | undefined;
  /** false: the untrusted-image policy (engine/untrusted.ts) */
  readonly trusted?: boolean | undefined;
  /** with `trusted: false`: where referenced files may be (default: the image's directory) */
  readonly allowedDir?: string | undefined;
  /** receives every metadata record, device write and flush, in order */
  readonly trace?: TraceEvent[] | undefined;
  readonly writebackRecords?: number | undefined;
  /** test-only: break one ordering rule (the crash harness must catch it) */
  readonly fault?: Fault | undefined;
  /** all-zero data writes become zero writes: 'unmap' (default), 'on', or 'off' (QEMU's default) */
  readonly detectZeroes?: DetectZeroes | undefined;
  /** bytes of clean tables kept in memory between write-backs (default 64 MiB) */
  readonly cacheBytes?: number | undefined;
  /**
   * Keep a durable journal (v3 images; default on). Off gives QEMU's plain
   * ordered write-back: a crash leaves leaked clusters. A live journal
   * found on open is recovered either way.
   */
  readonly journal?: boolean | undefined;
  /** size of a new journal area in bytes (default 8 MiB) */
  readonly journalBytes?: number | undefined;
  /** receives warnings (a journal ignored as stale or invalid, say) */
  readonly onWarning?: ((message: string) => void) | undefined;
  /** test-only: a write-back stops after this many phases, as a power cut would */
  readonly stopAfterPhase?: number | undefined;
  /** QEMU's overlap-check: none, constant, cached or all (the default) */
  readonly overlapCheck?: OverlapMode | undefined;
  /** content dedup of whole-cluster writes (write/dedup.ts; default off) */
  readonly dedup?: boolean | undefined;
  /**
   * QEMU's cache=unsafe (qemu-img convert's default for its output): no
   * flush reaches the file, the ordering barriers included, so a crash may
   * leave the image in any state (path opens only)
   */
  readonly unsafe?: boolean | undefined;
}

export interface OpenedWriter {
  readonly writer: Qcow2Writer;
  readonly recovery: RecoveryReport;
}

/**
 * Open a qcow2 image on any device for writing (the crash harness uses
 * in-memory recording devices). `backing` is the already opened backing
 * layer, if the image has one.
 */
export async function openWriterOnDevice(dev: BlockDevice, name: string, opts: WritableOpenOptions & { backing?: Layer | undefined } = {}): Promise<Qcow2Writer> {
  return (await openSession(dev, undefined, name, opts.backing, opts)).writer;
}

/**
 * The read-write open: journal recovery, journal set-up, the writer, then
 * the refcount rebuild a dirty image (or an unjournalled write-back) needs.
 * Nothing is written before the header has been validated.
 */
export async function openSession(dev: BlockDevice, dataDev: BlockDevice | undefined, name: string, backing: Layer | undefined, opts: WritableOpenOptions): Promise<OpenedWriter> {
  let loaded = await loadQcow2(dev);
  const h0 = loaded.parsed.header;
  let recovery: RecoveryReport = { action: 'none', writes: 0, warnings: [] };
  let journal: JournalPlan | undefined;
  if ((h0.incompatibleFeatures & INCOMPAT_CORRUPT) === 0n) {
    // read once: recovery may move the checkpoint, never the area or the extension
    const located = await locateJournal(dev, loaded.parsed, loaded.fileSize);
    recovery = await recoverJournal(dev, name, loaded.parsed, loaded.fileSize, located, { entries: loaded.snapshots, tableBytes: loaded.snapshotTableBytes });
    for (const w of recovery.warnings) opts.onWarning?.(w);
    if (recovery.writes) loaded = await loadQcow2(dev);
    // nothing is written here: the journal starts with the first write-back that changes metadata
    if (opts.journal !== false && h0.version === 3) journal = await planJournal(loaded.parsed, located, opts.journalBytes, diskRefcounts(dev, loaded.parsed));
  }
  const { parsed, fileSize, snapshots, snapshotTableBytes } = loaded;
  const writer = await Qcow2Writer.open({ filename: name, dev, dataDev, parsed, fileSize, snapshots: snapshots as SnapshotEntry[], snapshotTableBytes, overlapCheck: opts.overlapCheck, backing, trace: opts.trace, writebackRecords: opts.writebackRecords, fault: opts.fault, detectZeroes: opts.detectZeroes, cacheBytes: opts.cacheBytes, journal, onWarning: opts.onWarning, stopAfterPhase: opts.stopAfterPhase, dedup: opts.dedup });
  // overlapping metadata: nothing is written, the rebuild included
  if (!writer.refusal) await rebuildRefcounts(writer, dev, name, parsed.header.incompatibleFeatures, recovery.action === 'scan');
  return { writer, recovery };
}

/** Stored refcounts, read block by block from the header's refcount table (for placing the journal). */
function diskRefcounts(dev: BlockDevice, parsed: ParsedHeader): (cluster: number) => Promise<number> {
  const h = parsed.header;
  const cs = 2 ** h.clusterBits;
  const E = (cs * 8) / 2 ** h.refcountOrder;
  let table: Uint8Array | undefined;
  const blocks = new Map<number, Uint8Array>();
  return async (c) => {
    table ??= await readAt(dev, h.refcountTableOffset, h.refcountTableClusters * cs);
    const rt = Math.floor(c / E);
    if ((rt + 1) * 8 > table.length) return 0;
    const off = u64(table, rt * 8) - (u64(table, rt * 8) % 512);
    if (off === 0) return 0;
    let b = blocks.get(off);
    if (!b) blocks.set(off, (b = await readAt(dev, off, cs)));
    return getRefcount(b, c % E, h.refcountOrder);
  };
}

/**
 * A crash under lazy refcounts leaves the dirty bit, and a crash in a
 * write-back too big for the journal leaves an 'unjournalled' transaction:
 * either way refcounts are rebuilt from the references, counted as the
 * checker counts them, before anything else is written, as QEMU does on
 * open. Persistent bitmaps the open kept count as references; those it
 * dropped (their autoclear bit cleared) no longer do.
 */
async function rebuildRefcounts(writer: Qcow2Writer, dev: BlockDevice, name: string, incompatible: bigint, unjournalled: boolean): Promise<void> {
  const dirty = (incompatible & INCOMPAT_DIRTY) !== 0n;
  if (!dirty && !unjournalled) return;
  const refs = await countReferences(dev, name, { bitmaps: writer.bitmaps.any });
  await writer.applyRefcounts(refs.get, refs.endCluster);
  if (dirty) await writer.markClean();
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
  // creation is not journalled: a crash during it leaves no image worth recovering
  const w = await openWriterOnDevice(dev, name, { backing: layer, journal: false });
  if (plan.size > 0) await w.truncate(plan.size, true);
  if (plan.preallocation !== 'off') await w.preallocate(plan.preallocation);
  await w.close();
}

export async function openWriter(path: string, opts: WritableOpenOptions = {}): Promise<Qcow2Writer> {
  return (await openWriterSession(path, opts)).writer;
}

/** openWriter, with the report of the journal recovery the open ran. */
export async function openWriterSession(path: string, opts: WritableOpenOptions = {}): Promise<OpenedWriter> {
  const dev = await FileDevice.open(path, { readOnly: false, unsafe: opts.unsafe });
  try {
    return await openWriterSessionOn(dev, path, opts);
  } catch (e) {
    await dev.close();
    throw e;
  }
}

/**
 * The read-write open of the qcow2 image on `dev` (a file, the memory
 * device or a caller's own device), named `path` in messages; a data file
 * or backing file it names resolves against that name. On failure the
 * caller keeps `dev`.
 */
export async function openWriterSessionOn(dev: BlockDevice, path: string, opts: WritableOpenOptions = {}): Promise<OpenedWriter> {
  if (dev.readOnly) throw new QledgerError('E_READ_ONLY', `${path}: the device is read-only; it cannot be opened for writing`);
  let dataDev: BlockDevice | undefined;
  let backing: Layer | undefined;
  try {
    const format = opts.format ?? (await probeFormat(dev));
    if (format !== 'qcow2') throw new UnsupportedError(`${path}: writing is supported for qcow2 images only (this one is ${format})`, { path });
    const loaded = await loadQcow2(dev);
    const { parsed } = loaded;
    const h = parsed.header;
    const fence = opts.trusted === false ? allowedDirOf(path, opts) : undefined;
    // an untrusted image: what it names is checked before anything is opened or written
    if (fence !== undefined) checkUntrusted(path, loaded, fence, true);
    if ((h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n && parsed.dataFile !== undefined) {
      const dataPath = combinePath(path, parsed.dataFile);
      dataDev = await FileDevice.open(dataPath, { readOnly: false, unsafe: opts.unsafe, lock: imagePermissions({ readOnly: false, dataFile: true }) }).catch((e: unknown) => {
        if (e instanceof LockedError) throw e;
        throw new NotFoundError(`${path}: could not open external data file '${dataPath}': ${(e as Error).message}`, { path, dataFile: dataPath });
      });
    }
    if (parsed.backingFile !== undefined) {
      const bfmt = parsed.backingFormat;
      if (bfmt !== undefined && bfmt !== 'qcow2' && bfmt !== 'raw') throw new UnsupportedError(`${path}: backing file format '${bfmt}' is not supported`, { path });
      backing = await openLayer(combinePath(path, parsed.backingFile), { format: bfmt as ImageFormat | undefined, trusted: opts.trusted, allowedDir: fence });
    }
    return await openSession(dev, dataDev, path, backing, opts);
  } catch (e) {
    await backing?.close();
    await dataDev?.close();
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
  const w = await openWriter(path, { trace, journal: false });
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
