/**
 * The library's Node-style contract: every failure of an async method is a
 * rejected promise (never a synchronous throw), a closed image says
 * E_CLOSED, bad offsets say E_RANGE in words, and `await using` closes;
 * any BlockDevice is storage; guest bytes stream in and out.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { createReadStream, createWriteStream, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { pipeline } from 'node:stream/promises';
import { join } from 'node:path';
import { Image, MemoryDevice, QledgerError, checkImage, convertToRaw } from '../src/index.ts';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';

const t = tempDir();
afterAll(() => t.cleanup());

async function fresh(name: string): Promise<string> {
  const p = join(t.dir, name);
  await Image.create(p, { size: 4 << 20 });
  return p;
}

/** The call must return a promise that rejects with a QledgerError of `code`; a synchronous throw fails the test. */
async function rejects(call: () => Promise<unknown>, code: string): Promise<QledgerError> {
  let p: Promise<unknown>;
  try {
    p = call();
  } catch (e) {
    throw new Error(`threw synchronously instead of rejecting: ${(e as Error).message}`);
  }
  const e = await p.then(
    () => undefined,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(QledgerError);
  expect((e as QledgerError).code).toBe(code);
  return e as QledgerError;
}

describe('library contract', () => {
  it('writes to a read-only image reject with E_READ_ONLY', async () => {
    const img = await Image.open(await fresh('ro.qcow2'));
    await rejects(() => img.write(0, new Uint8Array(512)), 'E_READ_ONLY');
    await rejects(() => img.writeZeroes(0, 512), 'E_READ_ONLY');
    await rejects(() => img.discard(0, 65536), 'E_READ_ONLY');
    await rejects(() => img.flush(), 'E_READ_ONLY');
    await rejects(() => img.truncate(8 << 20), 'E_READ_ONLY');
    await img.close();
  });

  it('using a closed image is E_CLOSED, for reads, writes, map and info; closing twice is harmless', async () => {
    for (const write of [false, true]) {
      const img = await Image.open(await fresh(`closed-${write}.qcow2`), { write });
      await img.close();
      await img.close();
      await rejects(() => img.read(0, 512), 'E_CLOSED');
      await rejects(() => img.write(0, new Uint8Array(512)), 'E_CLOSED');
      await rejects(() => img.info(), 'E_CLOSED');
      await rejects(() => img.status(0, 512), 'E_CLOSED');
      await rejects(async () => {
        for await (const _ of img.map()) void _;
      }, 'E_CLOSED');
    }
  });

  it('a negative offset or length is E_RANGE with a readable message', async () => {
    const img = await Image.open(await fresh('range.qcow2'), { write: true });
    const e = await rejects(() => img.read(-1, 512), 'E_RANGE');
    expect(e.message).toMatch(/offset -1/);
    expect(e.message).not.toMatch(/0x-/);
    await rejects(() => img.read(0, -5), 'E_RANGE');
    await rejects(() => img.write(-512, new Uint8Array(512)), 'E_RANGE');
    await img.close();
  });

  it('await using closes the image at the end of the scope', async () => {
    const p = await fresh('using.qcow2');
    let escaped: Image | undefined;
    {
      await using img = await Image.open(p, { write: true });
      await img.write(0, new Uint8Array(512).fill(7));
      escaped = img;
    }
    await rejects(() => escaped!.read(0, 512), 'E_CLOSED');
    const again = await Image.open(p);
    expect((await again.read(0, 512))[0]).toBe(7);
    await again.close();
  });
});

describe('pluggable storage', () => {
  it('creates, writes and reads an image on a memory device, and the bytes are a qcow2 image QEMU checks clean', async () => {
    const dev = new MemoryDevice('mem.qcow2');
    await Image.create(dev, { size: 16 << 20, clusterSize: 4096 });
    const img = await Image.open(dev, { write: true });
    await img.write(12288, new Uint8Array(20000).fill(0x42));
    expect([...(await img.read(12288 + 19999, 2))]).toEqual([0x42, 0]);
    await img.close();
    const ro = await Image.open(new MemoryDevice('copy.qcow2', dev.snapshot(), { readOnly: true }));
    expect((await ro.read(12288, 20000)).every((b) => b === 0x42)).toBe(true);
    await rejects(() => ro.write(0, new Uint8Array(512)), 'E_READ_ONLY');
    await ro.close();
    await rejects(() => Image.open(new MemoryDevice('ro.qcow2', dev.snapshot(), { readOnly: true }), { write: true }), 'E_READ_ONLY');
    if (qemuAvailable) {
      const p = join(t.dir, 'from-memory.qcow2');
      writeFileSync(p, dev.snapshot());
      expect(qemuImg(['check', p])).toMatch(/No errors were found/);
    }
  });
});

describe('streams', () => {
  it.skipIf(!qemuAvailable)('pipeline() of a 1 GiB image to a file equals qemu-img convert -O raw', async () => {
    const src = join(t.dir, 'gib.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', src, '1G']);
    // data spread over the whole disk, zeroes and holes between
    qemuIo(src, ['write -P 0x41 0 8M', 'write -P 0x42 300M 4M', 'write -z 301M 64k', 'write -c -P 0x43 600M 64k', 'write -P 0x44 1020M 4M']);
    const ours = join(t.dir, 'gib-ours.raw');
    const theirs = join(t.dir, 'gib-theirs.raw');
    const img = await Image.open(src);
    await pipeline(img.createReadStream(), createWriteStream(ours));
    await img.close();
    qemuImg(['convert', '-O', 'raw', src, theirs]);
    const digest = async (f: string) => {
      const h = createHash('sha256');
      await pipeline(createReadStream(f), h);
      return h.digest('hex');
    };
    expect(statSync(ours).size).toBe(2 ** 30);
    expect(await digest(ours)).toBe(await digest(theirs));
    rmSync(ours);
    rmSync(theirs);
  }, 120_000);

  it.skipIf(!qemuAvailable)('pipeline of a read stream to a file equals qemu-img convert -O raw; a write stream fills an image', async () => {
    const src = join(t.dir, 'stream.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', src, '24M']);
    qemuIo(src, ['write -P 0x11 0 3M', 'write -P 0x22 5M 64k', 'write -z 6M 1M', 'write -P 0x33 23M 1M']);
    const ours = join(t.dir, 'ours.raw');
    const theirs = join(t.dir, 'theirs.raw');
    const img = await Image.open(src);
    await pipeline(img.createReadStream({ highWaterMark: 256 << 10 }), createWriteStream(ours));
    await img.close();
    qemuImg(['convert', '-O', 'raw', src, theirs]);
    expect(readFileSync(ours).equals(readFileSync(theirs))).toBe(true);
    // a range, in odd chunks
    const part = await Image.open(src);
    const chunks: Buffer[] = [];
    for await (const c of part.createReadStream({ start: 5 * 2 ** 20 - 100, end: 5 * 2 ** 20 + 70000, highWaterMark: 4099 })) chunks.push(c as Buffer);
    await part.close();
    expect(Buffer.concat(chunks).equals(readFileSync(theirs).subarray(5 * 2 ** 20 - 100, 5 * 2 ** 20 + 70000))).toBe(true);
    // and back: the raw file streamed into a fresh image at an offset
    const dst = join(t.dir, 'filled.qcow2');
    await Image.create(dst, { size: 32 << 20 });
    const w = await Image.open(dst, { write: true });
    await pipeline(createReadStream(theirs, { highWaterMark: 300_000 }), w.createWriteStream({ start: 4 << 20 }));
    await w.close();
    const back = await Image.open(dst);
    expect(Buffer.from(await back.read(4 << 20, 24 << 20)).equals(readFileSync(theirs))).toBe(true);
    expect((await back.read(0, 4 << 20)).every((b) => b === 0)).toBe(true);
    await back.close();
    expect(qemuImg(['check', dst])).toMatch(/No errors were found/);
  });

  it('a read stream outside the disk is refused', async () => {
    const img = await Image.open(await fresh('stream-range.qcow2'));
    expect(() => img.createReadStream({ start: 0, end: (4 << 20) + 1 })).toThrow(/outside/);
    await img.close();
  });
});

describe('AbortSignal', () => {
  const aborted = (e: unknown) => expect((e as Error).name).toBe('AbortError');

  it('stops map iteration, convert and check; an already-aborted signal rejects at once', async () => {
    const p = join(t.dir, 'abort.qcow2');
    await Image.create(p, { size: 64 << 20, clusterSize: 4096 });
    const w = await Image.open(p, { write: true });
    // every other cluster written: many extents to iterate
    for (let c = 0; c < 512; c += 2) await w.write(c * 4096, new Uint8Array(4096).fill(1));
    await w.close();

    const img = await Image.open(p);
    const ac = new AbortController();
    let seen = 0;
    const err = await (async () => {
      for await (const _ of img.map(0, img.size, { signal: ac.signal })) {
        void _;
        if (++seen === 3) ac.abort();
      }
    })().then(() => undefined, (e: unknown) => e);
    aborted(err);
    expect(seen).toBe(3);

    const done = new AbortController();
    done.abort();
    aborted(await convertToRaw(img, join(t.dir, 'abort.raw'), undefined, false, done.signal).then(() => undefined, (e: unknown) => e));
    const mid = new AbortController();
    aborted(
      await convertToRaw(img, join(t.dir, 'abort2.raw'), (d) => {
        if (d > 0) mid.abort();
      }, false, mid.signal).then(() => undefined, (e: unknown) => e),
    );
    await img.close();
    aborted(await checkImage(p, { signal: done.signal }).then(() => undefined, (e: unknown) => e));
    // without a signal, or with one never aborted, the same calls complete
    expect((await checkImage(p, { signal: new AbortController().signal })).corruptions).toBe(0);
  });

  it('destroys a read stream', async () => {
    const img = await Image.open(await fresh('abort-stream.qcow2'));
    const ac = new AbortController();
    const s = img.createReadStream({ highWaterMark: 4096, signal: ac.signal });
    let chunks = 0;
    const err = await (async () => {
      for await (const _ of s) {
        void _;
        if (++chunks === 2) ac.abort();
      }
    })().then(() => undefined, (e: unknown) => e);
    aborted(err);
    expect(chunks).toBeLessThan(10);
    await img.close();
  });
});
