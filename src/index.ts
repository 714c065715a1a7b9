/**
 * qledger: a qcow2 engine for Node.
 *
 *   import { Image } from 'qledger';
 *   await Image.create('disk.qcow2', { size: 1 << 30 });
 *   const img = await Image.open('disk.qcow2', { write: true });
 *   await img.write(0, new Uint8Array(4096).fill(1));
 *   const bytes = await img.read(0, 4096);
 *   for await (const e of img.map()) console.log(e);
 *   await img.close();
 */

export { Image, type ImageOpenOptions } from './engine/image.ts';
export { ImageSnapshots } from './engine/image-snapshots.ts';
export { ImageBitmaps } from './engine/image-bitmaps.ts';
export type { BitmapInfo } from './engine/write/bitmaps.ts';
export { DirtyBitmap } from './engine/bitmaps/dirty-bitmap.ts';
export { serveNbd, type NbdServeOptions, type NbdServerHandle } from './server/nbd-server.ts';
export { loadTlsCredentials, type NbdTls, type NbdTlsSpec } from './server/nbd-tls.ts';
export type { SnapshotFields } from './engine/write/snapshots.ts';
export type { SnapshotEntry, SnapshotExactFields } from './format/snapshot.ts';
export type { CreateOptions, Preallocation } from './engine/create.ts';
export type { TraceEvent } from './engine/writer.ts';
export type { ZeroOptions, DetectZeroes } from './engine/writer-options.ts';
export { checkImage, type CheckOptions } from './engine/check/check.ts';
export type { CheckReport, CheckFinding, RepairMode } from './engine/check/report.ts';
export { crashTest, type GuestOp, type CrashTestOptions, type CrashTestResult } from './harness/crash-harness.ts';
export type { JournalRecord, MetaRecord, MarkerRecord, LogRecord, L2Word, Word64, HeaderField } from './journal/records.ts';
export { describe as describeRecord } from './journal/records.ts';
export { encodeRecord, decodeRecord } from './journal/codec.ts';
export { readJournal, dumpJournal, type JournalDump } from './engine/journal/locate.ts';
export type { RecoveryReport } from './engine/journal/replay.ts';
export type { JournalTransaction } from './journal/log.ts';
export { apply, applyAll, type MetaState, type HeaderState } from './state/state.ts';
export type { OpenOptions, ImageFormat } from './engine/open.ts';
export type { MapEntry } from './engine/map.ts';
export type { ImageInfo, SnapshotInfo, Qcow2SpecificInfo } from './engine/info.ts';
export { convertToRaw, compareImages, type CompareResult } from './engine/convert.ts';
export { convertToQcow2, type Qcow2ConvertOptions } from './engine/convert-qcow2.ts';
export { measure, type MeasureTarget, type MeasureInput, type Measurement } from './engine/measure.ts';
export type { OverlapMode } from './engine/write/overlap.ts';
export * from './errors.ts';
export type { BlockDevice } from './io/device.ts';
export { FileDevice, type FileLocking } from './io/file-device.ts';
export { LockedError, imagePermissions, type LockPermissions } from './io/image-lock.ts';
export { MemoryDevice } from './io/memory-device.ts';
export * as format from './format/index.ts';
