/**
 * Copies that do not pass through memory: FileDevice.copyFrom
 * (copy_file_range through the native helper, in the CLI's inline mode),
 * copyRange's buffered fallback, and the write engine's writeFrom, which
 * commit uses to move a top image's data clusters into its base. Each must
 * leave the same bytes as a read and a write would.
 */

import { describe, it, expect, afterEach } from 'vitest';
import fc from 'fast-check';
import { writeFileSync, readFileSync } from 'node:fs';
import { tempDir } from './helpers/qemu.ts';
import { join } from 'node:path';
import { FileDevice, setInlineIo, setWriteBehind } from '../src/io/file-device.ts';
import { MemoryDevice } from '../src/io/memory-device.ts';
import { DeviceWrapper, copyRange, type BlockDevice } from '../src/io/device.ts';
import { native } from '../src/io/native.ts';
import { Image } from '../src/engine/image.ts';

const runs = Number(process.env['QLEDGER_PROPERTY_RUNS'] ?? 100);
const kernelCopy = native?.copyRange !== undefined;
if (!kernelCopy) {
  if (process.env['QLEDGER_REQUIRE_QEMU']) throw new Error('the native helper (copy_file_range) was not built, but QLEDGER_REQUIRE_QEMU is set: run `npm install` with a C compiler');
  console.warn('\n' + '!'.repeat(72) + '\n!!! native helper NOT BUILT: the kernel-copy assertions are SKIPPED (the fallback is tested).\n' + '!'.repeat(72) + '\n');
}

const made: Array<() => void> = [];
const tmp = () => {
  const t = tempDir('qledger-copy-');
  made.push(t.cleanup);
  return t.dir;
};
afterEach(() => {
  setInlineIo(0);
  for (const cleanup of made.splice(0)) cleanup();
});

/** Equal bytes, or the first offset where they differ (toEqual walks megabytes element by element). */
function expectSame(got: Uint8Array, want: Uint8Array): void {
  const a = Buffer.from(got.buffer, got.byteOffset, got.length);
  const b = Buffer.from(want.buffer, want.byteOffset, want.length);
  if (a.equals(b)) return;
  let i = 0;
  while (i < Math.min(a.length, b.length) && a[i] === b[i]) i++;
  expect({ length: a.length, firstDifference: i }).toEqual({ length: b.length, firstDifference: -1 });
}

/** Deterministic bytes that differ from offset to offset. */
function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

describe('FileDevice.copyFrom and copyRange', () => {
  it.runIf(kernelCopy)('copies in the kernel in the inline mode, and not at all through the pool or from another kind of device', async () => {
    const d = tmp();
    const src = pattern(3 << 20, 7);
    writeFileSync(join(d, 'src'), src);
    writeFileSync(join(d, 'dst'), new Uint8Array(1 << 20));
    const a = await FileDevice.open(join(d, 'src'), { readOnly: true, lock: false });
    const b = await FileDevice.open(join(d, 'dst'), { readOnly: false, lock: false });
    try {
      // through the pool (a server's or a library's default): the call would block the thread, so it declines
      expect(await b.copyFrom(a, 0, 0, 4096)).toBe(0);
      setInlineIo(256 << 10);
      // across the source's end: what the source has, and the caller reads the rest as zeros
      expect(await b.copyFrom(a, (3 << 20) - 1000, 5000, 4000)).toBe(1000);
      expect(await b.copyFrom(a, 12_345, 700_000, (2 << 20) + 3)).toBe((2 << 20) + 3);
      // a memory device is no file: nothing copied
      expect(await b.copyFrom(new MemoryDevice('m', src), 0, 0, 10)).toBe(0);
      const got = readFileSync(join(d, 'dst'));
      expect(got.length).toBe(700_000 + (2 << 20) + 3);
      expectSame(got.subarray(5000, 6000), src.subarray((3 << 20) - 1000));
      expectSame(got.subarray(700_000), src.subarray(12_345, 12_345 + (2 << 20) + 3));
      expect(got.subarray(0, 5000).every((x) => x === 0)).toBe(true);
    } finally {
      await a.close();
      await b.close();
    }
  });

  it('copyRange gives the same bytes through the kernel, through a wrapper that must see every write, and from memory', async () => {
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 0, max: 1 << 20 }), fc.integer({ min: 0, max: 1 << 20 }), fc.integer({ min: 0, max: 5 << 20 }), fc.boolean(), async (from, to, length, inline) => {
        const d = tmp();
        const src = pattern(1 << 21, from + 1);
        writeFileSync(join(d, 'src'), src);
        setInlineIo(inline ? 256 << 10 : 0);
        const a = await FileDevice.open(join(d, 'src'), { readOnly: true, lock: false });
        const targets: BlockDevice[] = [];
        const seen: number[] = [];
        try {
          const direct = await FileDevice.open(join(d, 'direct'), { readOnly: false, create: true, lock: false });
          // a wrapper that records writes (as the crash harness's does) must get the bytes as writes
          const watched = new (class extends DeviceWrapper {
            override async write(offset: number, data: Uint8Array): Promise<void> {
              seen.push(data.length);
              await super.write(offset, data);
            }
          })(await FileDevice.open(join(d, 'watched'), { readOnly: false, create: true, lock: false }));
          targets.push(direct, watched);
          await copyRange(direct, a, from, to, length);
          await copyRange(watched, a, from, to, length);
          const mem = new MemoryDevice('m', new Uint8Array(0));
          await copyRange(mem, new MemoryDevice('s', src), from, to, length);
          const want = new Uint8Array(to + length);
          want.set(src.subarray(from, Math.min(src.length, from + length)), to);
          const memBytes = new Uint8Array(to + length);
          await mem.readInto(memBytes, 0);
          expectSame(memBytes, want);
          for (const f of ['direct', 'watched']) {
            const got = new Uint8Array(to + length);
            got.set(readFileSync(join(d, f)).subarray(0, to + length));
            expectSame(got, want);
          }
          expect(seen.reduce((x, y) => x + y, 0)).toBe(length);
        } finally {
          await a.close();
          for (const t of targets) await t.close();
        }
      }),
      { numRuns: Math.max(5, Math.floor(runs / 10)) },
    );
  });
});

describe('Image.writeFrom', () => {
  it('leaves the guest content a write of the same bytes leaves, in place, into fresh clusters, partial clusters and over a backing file', async () => {
    const cs = 65536;
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ at: fc.integer({ min: 0, max: 40 * cs }), length: fc.integer({ min: 1, max: 6 * cs }), src: fc.integer({ min: 0, max: 3 << 20 }) }), { minLength: 1, maxLength: 6 }),
        fc.boolean(),
        fc.boolean(),
        async (ops, backing, inline) => {
          const d = tmp();
          setInlineIo(inline ? 256 << 10 : 0);
          const size = 48 * cs;
          const src = pattern(4 << 20, ops.length);
          writeFileSync(join(d, 'src.raw'), src);
          if (backing) {
            await Image.create(join(d, 'base.qcow2'), { size });
            const b = await Image.open(join(d, 'base.qcow2'), { write: true });
            await b.write(0, pattern(size, 99));
            await b.close();
          }
          const opts = backing ? { backingFile: 'base.qcow2', backingFormat: 'qcow2' as const } : { size };
          await Image.create(join(d, 'copied.qcow2'), opts);
          await Image.create(join(d, 'written.qcow2'), opts);
          const sdev = await FileDevice.open(join(d, 'src.raw'), { readOnly: true, lock: false });
          const copied = await Image.open(join(d, 'copied.qcow2'), { write: true });
          const written = await Image.open(join(d, 'written.qcow2'), { write: true, detectZeroes: 'off' });
          try {
            for (const o of ops) {
              const length = Math.min(o.length, size - o.at);
              await copied.writeFrom(o.at, length, { device: sdev, offset: o.src });
              await written.write(o.at, src.slice(o.src, o.src + length));
            }
            expectSame(await copied.read(0, size), await written.read(0, size));
          } finally {
            await copied.close();
            await written.close();
            await sdev.close();
          }
        },
      ),
      { numRuns: Math.max(5, Math.floor(runs / 10)) },
    );
  });
});

describe('write-behind (setWriteBehind)', () => {
  it.runIf(native?.writeBehind !== undefined)('starts the write-back of each threshold of sequential writes and copies, never of scattered small ones nor on a device that ignores flushes', async () => {
    const d = tmp();
    const calls: Array<[number, number]> = [];
    const helper = native as unknown as { writeBehind: (fd: number, offset: number, length: number) => boolean };
    const real = helper.writeBehind;
    helper.writeBehind = (fd, offset, length) => (calls.push([offset, length]), real(fd, offset, length));
    try {
      writeFileSync(join(d, 'src'), pattern(4 << 20, 3));
      const src = await FileDevice.open(join(d, 'src'), { readOnly: true, lock: false });
      const dev = await FileDevice.open(join(d, 'f'), { readOnly: false, create: true, lock: false });
      const unsafe = await FileDevice.open(join(d, 'g'), { readOnly: false, create: true, lock: false, unsafe: true });
      try {
        const before = setWriteBehind(1 << 20);
        expect(before).toBe(0); // off unless a program turns it on (the CLI does)
        await dev.write(0, new Uint8Array(4096));
        await dev.write(8192, new Uint8Array(2 << 20));
        await unsafe.write(0, new Uint8Array(2 << 20));
        setInlineIo(256 << 10);
        await dev.write(4 << 20, new Uint8Array(1 << 20)); // inline, as the CLI writes
        if (kernelCopy) expect(await dev.copyFrom(src, 0, 8 << 20, 3 << 20)).toBe(3 << 20);
        // small writes that continue one another gather into one run (an NBD client's 256 KiB requests)
        for (let k = 0; k < 5; k++) await dev.write((20 << 20) + k * (256 << 10), new Uint8Array(256 << 10));
        setWriteBehind(0);
        await dev.write(16 << 20, new Uint8Array(2 << 20));
        expect(calls).toEqual([[8192, 2 << 20], [4 << 20, 1 << 20], ...(kernelCopy ? [[8 << 20, 3 << 20] as [number, number]] : []), [20 << 20, 1 << 20]]);
        // a hint only: the bytes are those written
        const back = new Uint8Array(3 << 20);
        await dev.readInto(back, 8 << 20);
        if (kernelCopy) expectSame(back, pattern(4 << 20, 3).subarray(0, 3 << 20));
      } finally {
        setWriteBehind(0);
        await src.close();
        await dev.close();
        await unsafe.close();
      }
    } finally {
      helper.writeBehind = real;
    }
  });
});
