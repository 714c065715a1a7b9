/**
 * qledger: a qcow2 engine for Node.
 *
 *   import { Image } from 'qledger';
 *   const img = await Image.open('disk.qcow2');
 *   const bytes = await img.read(0, 4096);
 *   for await (const e of img.map()) console.log(e);
 *   await img.close();
 */

export { Image } from './engine/image.ts';
export type { OpenOptions, ImageFormat } from './engine/open.ts';
export type { MapEntry } from './engine/map.ts';
export type { ImageInfo, SnapshotInfo, Qcow2SpecificInfo } from './engine/info.ts';
export { convertToRaw, compareImages, type CompareResult } from './engine/convert.ts';
export * from './errors.ts';
export type { BlockDevice } from './io/device.ts';
export { FileDevice } from './io/file-device.ts';
export { MemoryDevice } from './io/memory-device.ts';
export * as format from './format/index.ts';
