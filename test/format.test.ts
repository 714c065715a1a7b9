import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import {
  getRefcount, setRefcount, maxRefcount, encodeCompressedDescriptor, compressedDescriptor,
  encodeHeader, decodeHeader, encodeFeatureTable, putU64, EXT_BACKING_FORMAT, type Qcow2Header,
  decodeSnapshotTable, encodeSnapshotTable, type SnapshotEntry,
} from '../src/format/index.ts';
import { zstdFrameEnd } from '../src/engine/compress.ts';
import { nonZeroEntries, u64big } from '../src/format/bytes.ts';

describe('64-bit fields', () => {
  it('putU64 writes a number as its BigInt would be written (the fast path for safe integers, two\'s complement for negatives)', () => {
    fc.assert(
      fc.property(fc.oneof(fc.maxSafeNat(), fc.integer({ min: -(2 ** 31), max: 2 ** 32 }), fc.constantFrom(0, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1, -1)), (v) => {
        const a = new Uint8Array(8);
        putU64(a, 0, v);
        expect(u64big(a, 0)).toBe(BigInt.asUintN(64, BigInt(v)));
        const b = new Uint8Array(8);
        putU64(b, 0, BigInt(v));
        expect(b).toEqual(a);
      }),
    );
  });
});

describe('table entries', () => {
  it('nonZeroEntries finds exactly the entries with a non-zero byte, on any view and length', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 300 }),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { maxLength: 20 }),
        fc.integer({ min: 0, max: 7 }),
        (entries, hits, shift) => {
          const backing = new Uint8Array(entries * 8 + shift);
          const t = backing.subarray(shift);
          for (const [at, v] of hits) if (t.length) t[at % t.length] = v;
          const want: number[] = [];
          for (let i = 0; i < entries; i++) if (t.subarray(i * 8, i * 8 + 8).some((b) => b !== 0)) want.push(i);
          expect(nonZeroEntries(t)).toEqual(want);
        },
      ),
      { numRuns: 300 },
    );
  });
});

describe('refcount blocks', () => {
  for (let order = 0; order <= 6; order++) {
    it(`order ${order}: set/get round trip, neighbours untouched`, () => {
      fc.assert(
        fc.property(fc.array(fc.tuple(fc.nat(255), fc.double({ min: 0, max: 1, noNaN: true })), { minLength: 1, maxLength: 64 }), (ops) => {
          const block = new Uint8Array(512);
          const model = new Map<number, number>();
          const entries = (512 * 8) >> order;
          for (const [i, frac] of ops) {
            const idx = i % entries;
            const v = Math.floor(frac * maxRefcount(order));
            setRefcount(block, idx, order, v);
            model.set(idx, v);
          }
          for (let i = 0; i < entries; i++) expect(getRefcount(block, i, order)).toBe(model.get(i) ?? 0);
        }),
        { numRuns: 50 },
      );
      expect(() => setRefcount(new Uint8Array(64), 0, order, maxRefcount(order) + (order === 6 ? 0.5 : 1))).toThrow(RangeError);
    });
  }
  it('sub-byte widths pack from the least significant bit', () => {
    const b = new Uint8Array(1);
    setRefcount(b, 0, 0, 1);
    setRefcount(b, 3, 0, 1);
    expect(b[0]).toBe(0b1001);
    const c = new Uint8Array(1);
    setRefcount(c, 1, 2, 0xa);
    expect(c[0]).toBe(0xa0);
  });
});

describe('compressed descriptors', () => {
  it('round trip for every cluster size', () => {
    fc.assert(
      fc.property(fc.integer({ min: 9, max: 21 }), fc.nat(2 ** 40), fc.integer({ min: 1, max: 2 ** 21 }), (bits, off, len) => {
        const cs = 2 ** bits;
        // QEMU stores a cluster compressed only when it shrinks: at most cs - 1 bytes
        const length = Math.min(len, cs - 1);
        const e = encodeCompressedDescriptor(off, length, bits);
        const d = compressedDescriptor(e, bits);
        expect(d.offset).toBe(off);
        // the descriptor covers whole sectors: at least the data, less than one extra sector
        expect(d.length).toBeGreaterThanOrEqual(length);
        expect(d.length - length).toBeLessThan(512);
      }),
      { numRuns: 300 },
    );
  });
});

function header(over: Partial<Qcow2Header> = {}): Qcow2Header {
  return {
    version: 3, backingFileOffset: 0, backingFileSize: 0, clusterBits: 16, size: 1 << 30, cryptMethod: 0, l1Size: 2,
    l1TableOffset: 0x30000, refcountTableOffset: 0x10000, refcountTableClusters: 1, nbSnapshots: 0, snapshotsOffset: 0,
    incompatibleFeatures: 0n, compatibleFeatures: 1n, autoclearFeatures: 0n, refcountOrder: 4, headerLength: 112,
    compressionType: 0, extraHeaderBytes: new Uint8Array(0), ...over,
  };
}

describe('header', () => {
  it('encode/decode round trip keeps unknown extensions verbatim and in order', () => {
    const unknown = { type: 0x12345678, data: new Uint8Array([1, 2, 3, 4, 5]) };
    const b = encodeHeader({
      header: header(),
      extensions: [{ type: EXT_BACKING_FORMAT, data: new TextEncoder().encode('qcow2') }, unknown, { type: 0x6803f857, data: encodeFeatureTable() }],
      backingFile: 'base.qcow2',
    });
    const file = new Uint8Array(0x40000);
    file.set(b);
    const p = decodeHeader(file, file.length);
    expect(p.backingFile).toBe('base.qcow2');
    expect(p.backingFormat).toBe('qcow2');
    expect(p.extensions.map((e) => e.type)).toEqual([EXT_BACKING_FORMAT, 0x12345678, 0x6803f857]);
    expect(Array.from(p.extensions[1]!.data)).toEqual([1, 2, 3, 4, 5]);
    expect(p.featureNames.find((f) => f.type === 0 && f.bit === 0)?.name).toBe('dirty bit');
    expect(p.header.compatibleFeatures).toBe(1n);
    const again = encodeHeader({ header: p.header, extensions: p.extensions, backingFile: p.backingFile });
    expect(Buffer.from(again).equals(Buffer.from(b))).toBe(true);
  });

  it('v2 headers decode with refcount_order 4 and no feature fields', () => {
    const b = encodeHeader({ header: header({ version: 2, headerLength: 72, compatibleFeatures: 0n }), extensions: [] });
    const file = new Uint8Array(0x40000);
    file.set(b);
    const p = decodeHeader(file, file.length);
    expect(p.header.version).toBe(2);
    expect(p.header.refcountOrder).toBe(4);
  });

  it('names an unknown incompatible bit from the feature table', () => {
    const b = encodeHeader({
      header: header({ incompatibleFeatures: 1n << 9n }),
      extensions: [{ type: 0x6803f857, data: encodeFeatureTable([{ type: 0, bit: 9, name: 'future thing' }]) }],
    });
    const file = new Uint8Array(0x40000);
    file.set(b);
    expect(() => decodeHeader(file, file.length)).toThrow(/future thing \(bit 9\)/);
  });
});

describe('snapshot table', () => {
  it('round trip', () => {
    const s: SnapshotEntry = {
      l1TableOffset: 0x50000, l1Size: 3, id: '7', name: 'before upgrade', dateSec: 1700000000, dateNsec: 5,
      vmClockNsec: 123456789012, vmStateSize: 0, diskSize: 1 << 30, icount: undefined, extraUnknown: new Uint8Array(0),
    };
    const b = encodeSnapshotTable([s, { ...s, id: '8', icount: 42 }]);
    const file = new Uint8Array(0x60000);
    putU64(file, 0, 0);
    const { entries, size } = decodeSnapshotTable(b, 2, 0x10000, 65536, file.length);
    expect(size).toBe(b.length);
    expect({ ...entries[0]!, exact: undefined }).toEqual(s);
    // the 64-bit fields also exactly as stored (what info prints and a rewrite writes back)
    expect(entries[0]!.exact).toEqual({ vmClockNsec: 123456789012n, vmStateSize: 0n, diskSize: 1n << 30n, icount: undefined });
    expect(entries[1]!.icount).toBe(42);
  });
});

describe('zstd frame walking', () => {
  it('finds the end of a frame of raw blocks and refuses garbage', () => {
    // magic, FHD (single segment, FCS 1 byte), FCS, one last raw block of 3 bytes
    const frame = Uint8Array.from([0x28, 0xb5, 0x2f, 0xfd, 0x20, 3, (3 << 3) | 1, 0, 0, 0x61, 0x62, 0x63, 0xee, 0xee]);
    expect(zstdFrameEnd(frame, 0)).toBe(12);
    expect(zstdFrameEnd(Uint8Array.from([1, 2, 3, 4, 5]), 0)).toBeUndefined();
  });
});
