/**
 * The speed paths keep behaviour: file requests made inline (on the calling
 * thread, as the CLI makes them), guest operations grouped into one held
 * state transaction, and reads split into concurrent pieces.
 */

import { describe, it, expect, afterEach } from 'vitest';
import fc from 'fast-check';
import { mkdtempSync, rmSync, chmodSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileDevice, setInlineIo } from '../src/io/file-device.ts';
import { native } from '../src/io/native.ts';
import { MemoryDevice } from '../src/io/memory-device.ts';
import { createOnDevice, openWriterOnDevice } from '../src/engine/writable.ts';
import { Image } from '../src/engine/image.ts';
import { IoError } from '../src/errors.ts';
import { createHash } from 'node:crypto';
import type { MetaState } from '../src/state/state.ts';
import { uninitialized, zeroedIoBuffer } from '../src/format/bytes.ts';
import { formatMapJson, streamMapJson, type MapEntry } from '../src/engine/map.ts';

const runs = Number(process.env['QLEDGER_PROPERTY_RUNS'] ?? 100);
const dirs: string[] = [];
const tmp = () => {
  const d = mkdtempSync(join(tmpdir(), 'qledger-fast-'));
  dirs.push(d);
  return d;
};
afterEach(() => {
  setInlineIo(0);
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

describe('inline file requests', () => {
  it('write, read, size, truncate and flush behave as through the pool, at and above the limit', async () => {
    const path = join(tmp(), 'f.bin');
    for (const limit of [0, 4096, 1 << 30]) {
      setInlineIo(limit);
      const dev = await FileDevice.open(path, { readOnly: false, create: true, lock: false });
      const a = new Uint8Array(4096).fill(0xa5);
      const b = new Uint8Array(8192).fill(0x5a);
      await dev.write(100_000, a);
      await dev.write(4096, b);
      expect(await dev.size()).toBe(104_096);
      const got = new Uint8Array(4096 + 200);
      await dev.readInto(got, 100_000);
      // past the end of the file: zeros, for an inline read as for a pooled one
      expect(got.subarray(0, 4096)).toEqual(a);
      expect(got.subarray(4096).every((x) => x === 0)).toBe(true);
      const mid = new Uint8Array(8192);
      await dev.readInto(mid, 4096);
      expect(mid).toEqual(b);
      await dev.truncate(8192);
      expect(await dev.size()).toBe(8192);
      await dev.flush();
      await dev.close();
    }
  });

  it('a failing inline request is a device error naming the offset, not a stack trace', async () => {
    const path = join(tmp(), 'ro.bin');
    writeFileSync(path, new Uint8Array(4096));
    chmodSync(path, 0o444);
    setInlineIo(1 << 30);
    const dev = await FileDevice.open(path, { readOnly: true, lock: false });
    // a read-only descriptor's write reaches the kernel only through the device's own check
    await expect(dev.write(0, new Uint8Array(512))).rejects.toThrow(/read-only/);
    await dev.close();
    const dir = tmp();
    const bad = await FileDevice.open(join(dir, 'x.bin'), { readOnly: false, create: true, lock: false });
    await bad.close();
    await expect(bad.readInto(new Uint8Array(512), 0)).rejects.toBeInstanceOf(IoError);
  });
});

describe('grouped guest operations', () => {
  it('a state read between writes is immutable: later writes do not change it, and it equals a fresh open (property)', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.tuple(fc.integer({ min: 0, max: 255 }), fc.constantFrom('write', 'zero', 'discard'), fc.integer({ min: 0, max: 3 })), { minLength: 1, maxLength: 24 }), async (ops) => {
        const dev = new MemoryDevice('g.qcow2');
        await createOnDevice(dev, 'g.qcow2', { size: 16 << 20, clusterSize: 65536 });
        const w = await openWriterOnDevice(dev, 'g.qcow2', { journal: false });
        const model = new Uint8Array(16 << 20);
        const seen: Array<{ state: MetaState; entries: string }> = [];
        // the image's one L2 table, its refcount block and the L1 chunk, as they are in a state
        const snapshotOf = (s: MetaState) => {
          const h = createHash('sha256');
          for (const t of [s.l2.get(0), s.refblocks.get(0), s.l1.get(0)]) h.update(t ?? new Uint8Array(1));
          return h.digest('hex');
        };
        for (const [cluster, kind, n] of ops) {
          const at = cluster * 65536;
          const len = Math.min(16 << 20, at + (n + 1) * 4096) - at;
          if (kind === 'write') {
            const data = new Uint8Array(len).fill(cluster + 1);
            await w.write(at, data);
            model.set(data, at);
          } else if (kind === 'zero') {
            await w.writeZeroes(at, len);
            model.fill(0, at, at + len);
          } else {
            // whole clusters: a discard of part of one may leave it as it was (as in QEMU)
            const whole = Math.min(16 << 20, at + (n + 1) * 65536) - at;
            await w.discard(at, whole);
            model.fill(0, at, at + whole);
          }
          if (n === 0) {
            const state = w.state;
            seen.push({ state, entries: snapshotOf(state) });
          }
        }
        // every state handed out earlier still says what it said then
        for (const s of seen) expect(snapshotOf(s.state)).toBe(s.entries);
        const back = new Uint8Array(16 << 20);
        await w.read(0, back);
        expect(Buffer.compare(back, model)).toBe(0);
        await w.close();
        const img = await Image.open(dev);
        const again = new Uint8Array(16 << 20);
        await img.readInto(again, 0);
        await img.close();
        expect(Buffer.compare(again, model)).toBe(0);
      }),
      { numRuns: Math.max(10, Math.floor(runs / 5)) },
    );
  });
});

describe('reads in concurrent pieces', () => {
  it('a read across data, zero and unallocated runs longer than a piece returns the bytes written', async () => {
    const dev = new MemoryDevice('r.qcow2');
    await createOnDevice(dev, 'r.qcow2', { size: 16 << 20, clusterSize: 65536 });
    const w = await openWriterOnDevice(dev, 'r.qcow2', { journal: false });
    const model = new Uint8Array(16 << 20);
    // 3 MiB of data (three pieces), a zero run, another data run, the rest unallocated
    const d = new Uint8Array(3 << 20).map((_, i) => (i * 7) & 0xff);
    await w.write(0, d);
    model.set(d, 0);
    await w.writeZeroes(3 << 20, 1 << 20);
    const e = new Uint8Array(2 << 20 | 4096).fill(9);
    await w.write(5 << 20, e);
    model.set(e, 5 << 20);
    await w.close();
    const img = await Image.open(dev);
    const out = new Uint8Array(16 << 20).fill(0xee);
    await img.readInto(out, 0);
    expect(Buffer.compare(out, model)).toBe(0);
    const part = new Uint8Array((4 << 20) + 123);
    await img.readInto(part, 1234);
    expect(Buffer.compare(part, model.subarray(1234, 1234 + part.length))).toBe(0);
    await img.close();
  });

  it('a long read into fresh zero pages (zero runs skipped) still reads zero clusters over backing data, and zeros past a shorter backing file', async () => {
    const d = tmp();
    const base = join(d, 'base.qcow2');
    const top = join(d, 'top.qcow2');
    const mib = 1 << 20;
    await Image.create(base, { size: 64 * mib });
    const b = await Image.open(base, { write: true });
    await b.write(0, new Uint8Array(64 * mib).fill(0xaa));
    await b.close();
    await Image.create(top, { size: 72 * mib, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
    const t = await Image.open(top, { write: true });
    await t.writeZeroes(mib, mib);
    await t.write(3 * mib, new Uint8Array(mib).fill(0x55));
    await t.close();
    const model = new Uint8Array(72 * mib);
    model.fill(0xaa, 0, 64 * mib);
    model.fill(0, mib, 2 * mib);
    model.fill(0x55, 3 * mib, 4 * mib);
    const img = await Image.open(top);
    const whole = await img.read(0, 72 * mib);
    expect(Buffer.compare(whole, model)).toBe(0);
    // the path below the zero-pages length fills every byte itself
    const short = await img.read(mib - 4096, 3 * mib);
    expect(Buffer.compare(short, model.subarray(mib - 4096, 4 * mib - 4096))).toBe(0);
    await img.close();
  });

  it('large I/O buffers start on a page of their own allocation (past the allocator\'s 16-byte header), small ones at 0', () => {
    const big = uninitialized(1 << 20);
    const zeroed = zeroedIoBuffer(1 << 20);
    expect([big.length, big.byteOffset % 4096, zeroed.length, zeroed.byteOffset % 4096]).toEqual([1 << 20, 4080, 1 << 20, 4080]);
    expect(zeroed.every((x) => x === 0)).toBe(true);
    expect(uninitialized(4096).byteOffset).toBe(0);
  });
});

describe('map in batches', () => {
  /** The extents as one status query after another would give them, merged by qemu-img's rule (the walk before batching). */
  async function reference(img: Image, start: number, length: number): Promise<MapEntry[]> {
    const out: MapEntry[] = [];
    for (let pos = start; pos < start + length; ) {
      const e = await img.status(pos, start + length - pos);
      const last = out[out.length - 1];
      const same =
        last &&
        last.zero === e.zero &&
        last.data === e.data &&
        last.depth === e.depth &&
        last.present === e.present &&
        last.filename === e.filename &&
        (last.offset === undefined) === (e.offset === undefined) &&
        (last.offset === undefined || last.offset + last.length === e.offset);
      if (same) last.length += e.length;
      else out.push({ ...e });
      pos += e.length;
    }
    return out;
  }

  it('over a backing chain: the same extents as status after status, and the streamed JSON equals the formatted one (property)', async () => {
    const dir = tmp();
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.boolean(), fc.integer({ min: 0, max: 127 }), fc.integer({ min: 1, max: 3 }), fc.constantFrom('write', 'zero', 'discard')), { maxLength: 30 }),
        fc.integer({ min: 0, max: (8 << 20) - 1 }),
        async (ops, start) => {
          const base = join(dir, 'base.qcow2');
          const top = join(dir, 'top.qcow2');
          rmSync(base, { force: true });
          rmSync(top, { force: true });
          await Image.create(base, { size: 6 << 20, clusterSize: 65536 });
          await Image.create(top, { size: 8 << 20, clusterSize: 65536, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
          for (const inTop of [false, true]) {
            const img = await Image.open(inTop ? top : base, { write: true });
            for (const [t, c, n, kind] of ops) {
              if (t !== inTop) continue;
              const at = c * 65536;
              const len = Math.min(img.size - at, n * 32768);
              if (len <= 0) continue;
              if (kind === 'write') await img.write(at, new Uint8Array(len).fill(c + 1));
              else if (kind === 'zero') await img.writeZeroes(at, len);
              else await img.discard(at, len);
            }
            await img.close();
          }
          const img = await Image.open(top);
          try {
            const len = img.size - start;
            const want = await reference(img, start, len);
            const got: MapEntry[] = [];
            for await (const b of img.mapBatches(start, len)) got.push(...b);
            expect(got).toEqual(want);
            const all: MapEntry[] = [];
            for await (const e of img.map()) all.push(e);
            const pieces: Buffer[] = [];
            await streamMapJson(img.mapBatches(), (b) => pieces.push(Buffer.from(b)));
            expect(Buffer.concat(pieces).toString('latin1')).toBe(formatMapJson(all));
          } finally {
            await img.close();
          }
        },
      ),
      { numRuns: Math.max(10, Math.floor(runs / 5)) },
    );
  });

  it('numbers of every width print as qemu-img prints them', async () => {
    const entries: MapEntry[] = [0, 9, 10, 99, 100, 12345, 2 ** 32 + 7, Number.MAX_SAFE_INTEGER].map((n, i) => ({ start: n, length: n + 1, depth: i % 3, present: i % 2 === 0, zero: i % 3 === 0, data: i % 4 === 0, ...(i % 2 ? { offset: n } : {}) }));
    async function* one() {
      yield entries;
    }
    const pieces: Buffer[] = [];
    await streamMapJson(one(), (b) => pieces.push(Buffer.from(b)));
    expect(Buffer.concat(pieces).toString('latin1')).toBe(formatMapJson(entries));
    const none: Buffer[] = [];
    async function* empty() {}
    await streamMapJson(empty(), (b) => none.push(Buffer.from(b)));
    expect(Buffer.concat(none).toString()).toBe(formatMapJson([]));
  });
});

describe('streamMapJson', () => {
  it('prints what formatMapJson prints: every flag combination, depths below and past its table of tails, with and without offsets, empty', async () => {
    const entries: MapEntry[] = [];
    let start = 0;
    for (const depth of [0, 1, 15, 16, 40]) {
      for (let f = 0; f < 8; f++) {
        for (const offset of [undefined, 2 ** 40 + start]) {
          const e: MapEntry = { start, length: 4096 * (f + 1), depth, present: (f & 4) !== 0, zero: (f & 2) !== 0, data: (f & 1) !== 0, ...(offset !== undefined ? { offset } : {}) };
          entries.push(e);
          start += e.length;
        }
      }
    }
    async function* batches(list: MapEntry[], size: number): AsyncIterable<MapEntry[]> {
      for (let i = 0; i < list.length; i += size) yield list.slice(i, i + size);
    }
    for (const [list, size] of [[entries, 7], [entries.slice(0, 1), 1], [[], 1]] as const) {
      const pieces: Buffer[] = [];
      await streamMapJson(batches([...list], size), (b) => pieces.push(Buffer.from(b)));
      expect(Buffer.concat(pieces).toString('latin1')).toBe(formatMapJson([...list]));
    }
  });
});

describe('the hole query remembers its last data run', () => {
  it.runIf(native !== undefined)('answers inside it without asking again, and forgets it when a discard, a zero write or a cut may have made a hole', async () => {
    const path = join(tmp(), 'h.bin');
    writeFileSync(path, new Uint8Array(8 << 20).fill(1));
    const dev = await FileDevice.open(path, { readOnly: false, lock: false });
    try {
      expect(dev.holeRun(0, 1 << 30)).toEqual({ zero: false, length: 8 << 20 });
      expect(dev.holeRun(3 << 20, 1 << 20)).toEqual({ zero: false, length: 1 << 20 });
      await dev.discard(1 << 20, 1 << 20);
      // ext4 and tmpfs punch the hole (a stale run would still say data)
      expect(dev.holeRun(1 << 20, 1 << 20)).toEqual({ zero: true, length: 1 << 20 });
      expect(dev.holeRun(4 << 20, 1 << 20)).toEqual({ zero: false, length: 1 << 20 });
      await dev.writeZeroes(5 << 20, 1 << 20, true);
      expect(dev.holeRun(5 << 20, 1 << 20)).toEqual({ zero: true, length: 1 << 20 });
      await dev.truncate(2 << 20);
      expect(dev.holeRun(3 << 20, 1 << 20)).toEqual({ zero: true, length: 1 << 20 });
    } finally {
      await dev.close();
    }
  });
});
