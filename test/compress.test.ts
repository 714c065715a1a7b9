/**
 * The zstd compressors of compressed clusters: the system's libzstd through
 * the native helper and the WebAssembly build give frames the reader decodes
 * to the cluster, each with its content size as QEMU's frames have it.
 */

import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import { createRequire } from 'node:module';
import { randomBytes } from 'node:crypto';
import { native } from '../src/io/native.ts';
import { compressCluster, decompressCluster } from '../src/engine/compress.ts';

const runs = Number(process.env['QLEDGER_PROPERTY_RUNS'] ?? 100);
const sys = native?.zstdCompress;
const ZSTD = 1;

/** A cluster of words from a small alphabet, with zero runs: it compresses. */
const cluster = (cs: number) =>
  fc.array(fc.tuple(fc.integer({ min: 0, max: 25 }), fc.integer({ min: 1, max: 4096 })), { minLength: 1, maxLength: 40 }).map((runsOf) => {
    const b = new Uint8Array(cs);
    let at = 0;
    for (const [c, n] of runsOf) {
      if (at >= cs) break;
      if (c > 3) b.fill(0x61 + c, at, Math.min(cs, at + n));
      at += n;
    }
    return b;
  });

/** The frame header's content-size field is there (RFC 8878: the descriptor's top bits, or the single-segment bit). */
function hasContentSize(z: Uint8Array): boolean {
  const d = z[4]!;
  return d >> 6 !== 0 || (d & 0x20) !== 0;
}

describe('zstd compression', () => {
  it.runIf(sys !== undefined)('the system libzstd (native helper) and the WebAssembly build both give frames that decode to the cluster', async () => {
    const wasm = createRequire(import.meta.url)('@bokuweb/zstd-wasm') as { init(): Promise<void>; compress(data: Uint8Array, level: number): Uint8Array };
    await wasm.init();
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(4096, 65536), fc.context(), async (cs, ctx) => {
        await fc.assert(
          fc.asyncProperty(cluster(cs), async (b) => {
            const a = sys!(b, 3);
            const w = wasm.compress(b, 3);
            ctx.log(`native ${a?.length}, wasm ${w.length}`);
            expect(a).toBeDefined();
            for (const z of [a!, w]) {
              expect(hasContentSize(z)).toBe(true);
              // a stored stream is followed by the rest of its last sector: junk after the frame is ignored
              const padded = new Uint8Array(z.length + 300).fill(0xee);
              padded.set(z);
              expect(Buffer.from(decompressCluster(ZSTD, padded, cs, 0)).equals(Buffer.from(b))).toBe(true);
            }
          }),
          { numRuns: Math.max(5, Math.floor(runs / 5)) },
        );
      }),
      { numRuns: 2 },
    );
  });

  it('compressCluster (whichever compressor this Node has) round-trips, and gives up on a cluster that does not shrink', async () => {
    const b = new Uint8Array(65536).fill(0x41, 1000, 50_000);
    const z = await compressCluster(ZSTD, b);
    expect(z).toBeDefined();
    expect(Buffer.from(decompressCluster(ZSTD, z!, 65536, 0)).equals(Buffer.from(b))).toBe(true);
    const noise = new Uint8Array(randomBytes(65536));
    expect(await compressCluster(ZSTD, noise)).toBeUndefined();
  });
});
