/**
 * The codecs of compressed clusters, both ways. qcow2 stores only a sector
 * count, so a stored stream is followed by up to 511 bytes of whatever; both
 * decoders stop once a whole cluster has been produced, as QEMU does. The
 * compressors use QEMU's parameters: raw deflate with a 4 KiB window, and one
 * zstd frame at zstd's default level.
 */

import { createRequire } from 'node:module';

// node:zlib (and the stream machinery it loads) only once a compressed cluster is read
let zlibModule: typeof import('node:zlib') | undefined;
const zlib = () => (zlibModule ??= createRequire(import.meta.url)('node:zlib') as typeof import('node:zlib'));
import { decompress as zstdFrame } from 'fzstd';
import { CorruptionError, hex } from '../errors.ts';
import { COMPRESSION_DEFLATE } from '../format/features.ts';
import { native } from '../io/native.ts';

/**
 * Compress one whole cluster for compression type `type`; undefined when the
 * result would not be smaller than the cluster (QEMU then writes the cluster
 * uncompressed: its compressors get a buffer of cluster_size - 1 bytes).
 */
export async function compressCluster(type: number, full: Uint8Array): Promise<Uint8Array | undefined> {
  let z: Uint8Array;
  if (type === COMPRESSION_DEFLATE) {
    // QEMU's deflateInit2: default level, window bits -12 (raw, 4 KiB), memLevel 9
    z = zlib().deflateRawSync(full, { windowBits: 12, memLevel: 9 });
  } else {
    z = (await zstdCompressor())(full);
  }
  return z.length < full.length ? z : undefined;
}

type Compress = (data: Uint8Array) => Uint8Array;
let zstdLoading: Promise<Compress> | undefined;

/**
 * zstd at level 3 (ZSTD_CLEVEL_DEFAULT, what QEMU's qcow2_zstd_compress
 * gets), one frame with its content size. node:zlib has a zstd compressor
 * from Node 22.15 on; on older Nodes, the system's libzstd through the
 * native helper (about three times as fast here), and without either,
 * libzstd built to WebAssembly
 * (@bokuweb/zstd-wasm: the module ships inside the package, no download),
 * loaded at the first compressed write (about 5 ms) so no other command
 * pays for it. It is required at run time, not bundled into the CLI: the
 * package reads its .wasm file from its own folder.
 */
function zstdCompressor(): Promise<Compress> {
  return (zstdLoading ??= (async (): Promise<Compress> => {
    const z = zlib() as typeof import('node:zlib') & { zstdCompressSync?: (d: Uint8Array, o: object) => Buffer };
    const level = (z.constants as unknown as Record<string, number>)['ZSTD_c_compressionLevel'];
    if (typeof z.zstdCompressSync === 'function' && level !== undefined) {
      const compress = z.zstdCompressSync;
      return (d) => compress(d, { params: { [level]: 3 } });
    }
    // the system's libzstd through the native helper (QEMU's own compressor), where both are there
    const sys = native?.zstdCompress;
    if (sys && sys(new Uint8Array(16), 3) !== undefined) return (d) => sys(d, 3)!;
    const wasm = createRequire(import.meta.url)('@bokuweb/zstd-wasm') as { init(): Promise<void>; compress(data: Uint8Array, level: number): Uint8Array };
    await wasm.init();
    return (d) => wasm.compress(d, 3);
  })());
}

export function decompressCluster(type: number, src: Uint8Array, clusterSize: number, where: number): Uint8Array {
  const out = type === COMPRESSION_DEFLATE ? inflate(src, clusterSize) : unzstd(src, clusterSize);
  if (!out || out.length < clusterSize) {
    throw new CorruptionError(`compressed cluster at host offset ${hex(where)} does not decompress to a full cluster`, { offset: where });
  }
  return out.length === clusterSize ? out : out.subarray(0, clusterSize);
}

function inflate(src: Uint8Array, clusterSize: number): Uint8Array | undefined {
  try {
    // Raw deflate (QEMU writes window bits -12); a sync flush tolerates the
    // trailing sector padding, and maxOutputLength bounds memory on bad input.
    return zlib().inflateRawSync(src, { finishFlush: zlib().constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize });
  } catch (e) {
    // Output that reached the cap means the cluster is complete: decode again stopping there.
    if ((e as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE') return inflateCapped(src, clusterSize);
    return undefined;
  }
}

function inflateCapped(src: Uint8Array, clusterSize: number): Uint8Array | undefined {
  try {
    return zlib().inflateRawSync(src, { finishFlush: zlib().constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize * 2 }).subarray(0, clusterSize);
  } catch {
    return undefined;
  }
}

/** zstd: one or more frames; decode frame by frame until the cluster is full. */
function unzstd(src: Uint8Array, clusterSize: number): Uint8Array | undefined {
  const out = new Uint8Array(clusterSize);
  let filled = 0;
  let pos = 0;
  while (filled < clusterSize) {
    const end = zstdFrameEnd(src, pos);
    if (end === undefined) return undefined;
    let part: Uint8Array;
    try {
      part = zstdFrame(src.subarray(pos, end));
    } catch {
      return undefined;
    }
    const n = Math.min(part.length, clusterSize - filled);
    out.set(part.subarray(0, n), filled);
    filled += n;
    pos = end;
    if (part.length === 0 && pos >= src.length) return undefined;
  }
  return out;
}

/** End offset of the zstd frame starting at `pos`, walking block headers (RFC 8878). */
export function zstdFrameEnd(b: Uint8Array, pos: number): number | undefined {
  if (pos + 4 > b.length) return undefined;
  const magic = (b[pos]! | (b[pos + 1]! << 8) | (b[pos + 2]! << 16) | (b[pos + 3]! << 24)) >>> 0;
  if ((magic & 0xffff_fff0) === 0x184d_2a50) {
    // skippable frame
    if (pos + 8 > b.length) return undefined;
    const len = (b[pos + 4]! | (b[pos + 5]! << 8) | (b[pos + 6]! << 16) | (b[pos + 7]! << 24)) >>> 0;
    return pos + 8 + len <= b.length ? pos + 8 + len : undefined;
  }
  if (magic !== 0xfd2f_b528) return undefined;
  let p = pos + 4;
  const fhd = b[p++];
  if (fhd === undefined) return undefined;
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictFlag = fhd & 3;
  p += single ? 0 : 1;
  p += [0, 1, 2, 4][dictFlag]!;
  p += [single ? 1 : 0, 2, 4, 8][fcsFlag]!;
  for (;;) {
    if (p + 3 > b.length) return undefined;
    const bh = b[p]! | (b[p + 1]! << 8) | (b[p + 2]! << 16);
    p += 3;
    const last = bh & 1;
    const type = (bh >> 1) & 3;
    const size = bh >>> 3;
    if (type === 3) return undefined;
    p += type === 1 ? 1 : size;
    if (p > b.length) return undefined;
    if (last) break;
  }
  p += checksum ? 4 : 0;
  return p <= b.length ? p : undefined;
}
