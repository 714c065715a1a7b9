/**
 * qemu-img commit: `commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-q]
 * IMG`. What the top image allocates (data, and zero clusters as zeroes) is
 * written into its backing file through the backing file's own engine
 * (qcow2, journalled) or as its bytes (raw), the backing file grown first
 * when the top is larger; then, unless -d, the top is emptied in one
 * transaction (QEMU's make_empty, by its path that works for every image
 * kind). "Image committed." A crash at any point leaves the chain reading
 * the top's content: until the top is emptied it still maps it, and
 * afterwards the base holds it. -b names any image of the chain below the
 * top (found as qemu-img finds it): what the images above it allocate goes
 * into it, and, as qemu-img does, no image is emptied and no backing link
 * changes.
 */

import { resolve } from 'node:path';
import { NotFoundError, UnsupportedError, UsageError } from '../errors.ts';
import { FileDevice } from '../io/file-device.ts';
import { copyRange, type BlockDevice } from '../io/device.ts';
import { RawLayer } from '../engine/raw-layer.ts';
import { guest, type Layer, type LayerStatus } from '../engine/layer.ts';
import { uninitialized } from '../format/bytes.ts';
import { Image } from '../engine/image.ts';
import { combinePath, probeFormat, type ImageFormat } from '../engine/open.ts';
import { Qcow2Layer } from '../engine/qcow2-layer.ts';
import { allowedDirOf } from '../engine/untrusted.ts';
import { makeEmptyFast } from '../engine/make-empty-fast.ts';
import { CACHE_MODES, getopt } from './args.ts';
import { progressPrinter } from './io-format.ts';
import type { Output } from './output.ts';

const CHUNK = 4 << 20;
/** the longest run copied at once (progress is shown between runs) */
const RUN = 64 << 20;

export async function runCommit(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'ftbr', flags: 'dpqh', long: { 'image-opts': false, object: true, untrusted: false } }, 'commit');
  const last = (k: string) => p.opts.filter(([x]) => x === k).at(-1)?.[1];
  if (p.positional.length !== 1) throw new UsageError("Expecting one image file name\nTry 'qledger --help' for more information");
  const path = p.positional[0]!;
  const quiet = last('q') === true;
  const progress = last('p') === true && !quiet;
  // qemu-img empties the top only when the base is implied: -b keeps every image as it is
  const drop = last('d') !== true && last('b') === undefined;
  const cache = last('t') ?? 'writeback';
  if (!CACHE_MODES.includes(String(cache))) throw new UsageError(`Invalid cache option: ${String(cache)}`);
  if (last('r') !== undefined) throw new UnsupportedError('commit: -r (rate limit) is not supported');
  // --untrusted (qledger's own): the whole chain checked by the policy first, every open under it, fenced by the top's directory
  const policy = p.opts.some(([k]) => k === 'untrusted') ? { trusted: false, allowedDir: allowedDirOf(path, {}) } : {};
  if ('trusted' in policy) await (await Image.open(path, { format: last('f') as ImageFormat | undefined, ...policy })).close();

  // what to commit, and where: with -b, any image of the chain below the top; else the top's backing file
  const b = last('b');
  const format = last('f') as ImageFormat | undefined;
  let basePath: string;
  let baseFormat: ImageFormat | undefined;
  /** the images above the base (the top first), opened alone: an extent is read from the one that supplies it */
  const sources: Image[] = [];
  const extents: Array<{ start: number; length: number; zero: boolean; depth: number }> = [];
  {
    const chain = await Image.open(path, { format, noBacking: b === undefined, ...policy });
    try {
      const layer = chain.top;
      const backing = layer instanceof Qcow2Layer ? layer.parsed.backingFile : undefined;
      if (backing === undefined) throw new UsageError('Image does not have a backing file');
      let k = 1;
      if (b === undefined) {
        basePath = combinePath(path, backing);
        baseFormat = (layer as Qcow2Layer).parsed.backingFormat as ImageFormat | undefined;
      } else {
        // qemu-img's bdrv_find_backing_image: the name as a layer's header gives it, or the same file
        const layers = chain.chain;
        k = layers.findIndex((l, i) => i > 0 && (resolve(String(b)) === resolve(l.filename) || (layers[i - 1] instanceof Qcow2Layer && (layers[i - 1] as Qcow2Layer).parsed.backingFile === String(b))));
        if (k < 1) throw new UsageError(`Did not find '${String(b)}' in the backing chain of '${path}'`);
        basePath = layers[k]!.filename;
        baseFormat = layers[k]!.format;
      }
      for await (const e of chain.map()) if (e.present && e.depth < k) extents.push({ start: e.start, length: e.length, zero: !e.data, depth: e.depth });
      const names = chain.chain.slice(0, k).map((l) => [l.filename, l.format] as const);
      await chain.close();
      for (const [f, fmt] of names) sources.push(await Image.open(f, { format: fmt, noBacking: true, ...policy }));
    } catch (e) {
      await chain.close().catch(() => undefined);
      for (const x of sources) await x.close();
      throw e;
    }
  }
  const top = sources[0]!;
  const total = extents.reduce((n, e) => n + e.length, 0);
  let done = 0;
  const printer = progress ? progressPrinter(io) : undefined;
  const show = () => printer?.(done, total);
  show();
  try {
    const size = top.size;
    const fmt = baseFormat ?? (await probe(basePath));
    if (fmt === 'qcow2') {
      const base = await Image.open(basePath, { format: 'qcow2', write: true, ...policy });
      try {
        // QEMU's commit grows a smaller base to the top's size
        if (base.size < size) await base.truncate(Math.ceil(size / 512) * 512);
        await copy(
          sources,
          extents,
          { data: (at, b) => base.write(at, b), from: (at, n, src) => base.writeFrom(at, n, src), zero: (at, n) => base.writeZeroes(at, n, { unmap: true }) },
          (n) => ((done += n), show()),
        );
      } finally {
        await base.close();
      }
    } else {
      const base = await FileDevice.open(basePath, { readOnly: false });
      try {
        if ((await base.size()) < size) await base.truncate(size);
        await copy(
          sources,
          extents,
          { data: (at, b) => base.write(at, b), from: (at, n, src) => copyRange(base, src.device, src.offset, at, n), zero: (at, n) => base.writeZeroes(at, n, true) },
          (n) => ((done += n), show()),
        );
        await base.flush();
      } finally {
        await base.close();
      }
    }
  } finally {
    for (const x of sources) await x.close();
  }
  if (progress) io.out('\n');
  if (drop) {
    // O(1) for an image whose refcounts count only its active tree (engine/make-empty-fast.ts); the session's
    // O(metadata) make_empty for the rest (snapshots, bitmaps, a data file, a journal with work left)
    const dev = await FileDevice.open(path, { readOnly: false });
    let done: boolean;
    try {
      done = await makeEmptyFast(dev);
    } finally {
      await dev.close();
    }
    if (!done) {
      const img = await Image.open(path, { format: 'qcow2', write: true, ...policy });
      try {
        await img.makeEmpty();
      } finally {
        await img.close();
      }
    }
  }
  if (!quiet) io.out('Image committed.\n');
  return 0;
}

async function probe(path: string): Promise<ImageFormat> {
  const dev = await FileDevice.open(path, { readOnly: true }).catch((e: unknown) => {
    throw new NotFoundError(`Could not open backing file '${path}': ${(e as Error).message}`, { path });
  });
  try {
    return await probeFormat(dev);
  } finally {
    await dev.close();
  }
}

/** Where the bytes of a run of `layer` lie as they are, for a copy that need not read them: a qcow2 data cluster's or a raw file's host range. */
function hostRange(layer: Layer, st: LayerStatus): { device: BlockDevice; offset: number } | undefined {
  if (st.hostOffset === undefined) return undefined;
  if (layer instanceof Qcow2Layer && st.type === 'normal') return { device: layer.dataDev ?? layer.dev, offset: st.hostOffset };
  if (layer instanceof RawLayer && st.type === 'raw-data') return { device: layer.dev, offset: st.hostOffset };
  return undefined;
}

/**
 * The extents to commit: data clusters copied from the host ranges of the
 * image that supplies them (opened alone), in the kernel where both images
 * are files (FileDevice.copyFrom, about 40% less system time than through
 * memory); compressed clusters read and written in chunks; zero extents as
 * zeroes.
 */
async function copy(
  sources: readonly Image[],
  extents: ReadonlyArray<{ start: number; length: number; zero: boolean; depth: number }>,
  to: {
    data(at: number, b: Uint8Array): Promise<void>;
    from(at: number, length: number, src: { device: BlockDevice; offset: number }): Promise<void>;
    zero(at: number, length: number): Promise<void>;
  },
  progress: (bytes: number) => void,
): Promise<void> {
  // two buffers: the next piece is read while the last one is written (the base's writes stay in order)
  const bufs = [uninitialized(CHUNK), uninitialized(CHUNK)];
  let k = 0;
  let writing: Promise<void> | undefined;
  let failed: { error: unknown } | undefined;
  const settle = async () => {
    const w = writing;
    writing = undefined;
    await w;
    if (failed) throw failed.error;
  };
  try {
    for (const e of extents) {
      if (e.zero) {
        await settle();
        await to.zero(e.start, e.length);
        progress(e.length);
        continue;
      }
      const layer = sources[e.depth]!.top;
      const end = e.start + e.length;
      for (let at = e.start; at < end; ) {
        const st = await layer.status(guest(at), Math.min(end - at, RUN));
        const range = hostRange(layer, st);
        if (range) {
          await settle();
          await to.from(at, st.length, range);
          progress(st.length);
          at += st.length;
          continue;
        }
        for (const stop = at + st.length; at < stop; ) {
          const b = bufs[k]!.subarray(0, Math.min(CHUNK, stop - at));
          k ^= 1;
          await sources[e.depth]!.readInto(b, at);
          await settle();
          const where = at;
          writing = to.data(where, b).then(
            () => progress(b.length),
            (err: unknown) => void (failed ??= { error: err }),
          );
          at += b.length;
        }
      }
    }
  } finally {
    // never leave a write behind (a failed read must not race the last write)
    await writing;
  }
  await settle();
}
