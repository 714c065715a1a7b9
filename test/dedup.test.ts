/**
 * Content dedup (issue 16): the index against a model and within its
 * memory bound, the byte check against a real fingerprint collision,
 * online dedup in random sessions on several image kinds (guest content
 * equal to a model, qemu-img check clean, clusters shared), offline dedup
 * of a QEMU-made image (same bytes, space given back, QEMU goes on writing
 * it), the refusals, and the crash harness on dedup workloads (shares,
 * unshares, offline merges and snapshots): no corruption, no wrong data,
 * no leak after recovery, and the COPIED ordering fault caught.
 *
 * Budget: QLEDGER_DEDUP_RUNS random sessions per kind (default 3).
 */

import { describe, it, expect, afterAll } from 'vitest';
import fc from 'fast-check';
import { closeSync, copyFileSync, openSync, readFileSync, readSync, statSync, writeFileSync, writeSync } from 'node:fs';
import zlib from 'node:zlib';
import { decodeHeader } from '../src/format/header.ts';
import { EXT_DEDUP_INDEX } from '../src/format/features.ts';
import { encodeArea } from '../src/format/dedup-index-area.ts';
import { spawn, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { DedupIndex } from '../src/engine/dedup/dedup-index.ts';
import { fingerprint } from '../src/engine/dedup/fingerprint.ts';
import { Image } from '../src/index.ts';
import type { CreateOptions } from '../src/engine/create.ts';
import { crashTest, reproduction, type GuestOp } from '../src/harness/crash-harness.ts';
import { nbdToolsAvailable, qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { serveNbd } from '../src/server/nbd-server.ts';
import { runCli } from './helpers/cli.ts';

const RUNS = Number(process.env['QLEDGER_DEDUP_RUNS'] ?? 3);
const { dir, cleanup } = tempDir('qledger-dedup-');
afterAll(cleanup);
const d = qemuAvailable ? describe : describe.skip;
if (!qemuAvailable) console.warn('\n*** dedup.test.ts: qemu-img/qemu-io not found; the interop tests are SKIPPED (CI installs qemu-utils) ***\n');

describe('the dedup index', () => {
  it('answers every live entry and never a removed one, across merges (model-based)', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.integer({ min: 0, max: 2 }), fc.integer({ min: 0, max: 300 }), fc.integer({ min: 0, max: 50 })), { minLength: 1, maxLength: 3000 }), (ops) => {
        const idx = new DedupIndex();
        // a small key space (hi from 40 values) so that equal keys and removals meet
        const fpOf = (k: number) => ({ hi: Math.imul(k % 40, 0x9e3779b1) >>> 0, lo: k });
        const model = new Map<string, Set<number>>();
        for (const [kind, k, gc] of ops) {
          const fp = fpOf(k);
          const key = `${fp.hi}:${fp.lo}`;
          if (kind === 0 || kind === 1) {
            idx.add(fp.hi, fp.lo, gc);
            if (!model.has(key)) model.set(key, new Set());
            model.get(key)!.add(gc);
          } else {
            idx.remove(fp.hi, fp.lo, gc);
            model.get(key)?.delete(gc);
          }
          if (ops.length > 2000 && Math.random() < 0.001) idx.merge();
        }
        idx.merge();
        for (const [key, gcs] of model) {
          const [hi, lo] = key.split(':').map(Number) as [number, number];
          const got = new Set(idx.candidates(hi, lo, 1 << 20));
          for (const gc of gcs) expect(got.has(gc), `${key} -> ${gc}`).toBe(true);
          // what else comes back is filed under the same key
          for (const gc of got) {
            if (gcs.has(gc)) continue;
            expect([...model].some(([k2, s]) => { const [h2, l2] = k2.split(':').map(Number) as [number, number]; return s.has(gc) && idx.sameKey({ hi, lo }, { hi: h2, lo: l2 }); })).toBe(true);
          }
        }
      }),
      { numRuns: 30 },
    );
  });

  it('holds a million clusters in at most 8 bytes each', () => {
    const n = 1_000_000;
    const idx = new DedupIndex(n);
    const fp = { hi: 0, lo: 0 };
    const buf = new Uint8Array(64);
    const view = new DataView(buf.buffer);
    for (let i = 0; i < n; i++) {
      view.setUint32(0, i);
      fingerprint(buf, fp);
      idx.add(fp.hi, fp.lo, i);
    }
    expect(idx.size).toBe(n);
    const perCluster = idx.bytes / n;
    expect(perCluster).toBeLessThanOrEqual(8);
    // and finds them: a sample of lookups, each with its own cluster among the candidates
    for (let i = 0; i < n; i += 9973) {
      view.setUint32(0, i);
      fingerprint(buf, fp);
      expect(idx.candidates(fp.hi, fp.lo)).toContain(i);
    }
  });

  it('fingerprints do not depend on the buffer alignment, and one changed byte changes them', () => {
    const a = new Uint8Array(4097).map((_, i) => (i * 31) & 255);
    const aligned = a.slice(0, 4096);
    const shifted = a.subarray(1, 4097);
    const copy = shifted.slice();
    expect(fingerprint(shifted)).toEqual(fingerprint(copy));
    const one = aligned.slice();
    one[4095] = one[4095]! ^ 1;
    expect(fingerprint(one)).not.toEqual(fingerprint(aligned));
  });
});

/** A random session's operations over a disk of `clusters` clusters: palette writes so that clusters repeat. */
type Op = { w: 'data'; at: number; n: number; p: number } | { w: 'part'; at: number; n: number; p: number } | { w: 'zero'; at: number; n: number } | { w: 'discard'; at: number; n: number } | { w: 'snap' } | { w: 'unsnap' };

function opArb(clusters: number, cs: number, snaps: boolean): fc.Arbitrary<Op> {
  const c = fc.integer({ min: 0, max: clusters - 1 });
  const list: Array<fc.Arbitrary<Op>> = [
    fc.tuple(c, fc.integer({ min: 1, max: 6 }), fc.integer({ min: 1, max: 3 })).map(([at, n, p]) => ({ w: 'data' as const, at: at * cs, n: Math.min(n, clusters - at) * cs, p })),
    fc.tuple(fc.integer({ min: 0, max: clusters * cs - 2 }), fc.integer({ min: 1, max: 2 * cs }), fc.integer({ min: 1, max: 3 })).map(([at, n, p]) => ({ w: 'part' as const, at, n: Math.min(n, clusters * cs - at), p })),
    fc.tuple(c, fc.integer({ min: 1, max: 3 })).map(([at, n]) => ({ w: 'zero' as const, at: at * cs, n: Math.min(n, clusters - at) * cs })),
    fc.tuple(c, fc.integer({ min: 1, max: 3 })).map(([at, n]) => ({ w: 'discard' as const, at: at * cs, n: Math.min(n, clusters - at) * cs })),
  ];
  if (snaps) list.push(fc.constant({ w: 'snap' as const }), fc.constant({ w: 'unsnap' as const }));
  return fc.oneof(...list);
}

function repeat(unit: Uint8Array, n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let at = 0; at < n; at += unit.length) out.set(unit.subarray(0, Math.min(unit.length, n - at)), at);
  return out;
}

/** A cluster's worth of pattern `p` that differs from cluster to cluster of the palette only by `p`. */
function pattern(p: number, n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (p * 37 + (i % 251)) & 255;
  return out;
}

interface Kind {
  readonly name: string;
  readonly create: CreateOptions;
  readonly snapshots?: boolean;
}

const KINDS: Kind[] = [
  { name: '64 KiB clusters', create: { size: 2 << 20 } },
  { name: '4 KiB clusters, internal snapshots', create: { size: 1 << 20, clusterSize: 4096 }, snapshots: true },
  { name: 'extended L2', create: { size: 2 << 20, extendedL2: true } },
  { name: 'v2 (compat=0.10)', create: { size: 1 << 20, clusterSize: 4096, compat: '0.10' } },
  { name: 'refcount_bits=2 (at most 3 references)', create: { size: 1 << 20, clusterSize: 4096, refcountBits: 2 } },
];

d('online dedup: random sessions against a model', () => {
  let totalShared = 0;
  for (const kind of KINDS) {
    it(kind.name, async () => {
      const cs = kind.create.clusterSize ?? 65536;
      const size = kind.create.size!;
      await fc.assert(
        fc.asyncProperty(fc.array(fc.array(opArb(size / cs, cs, kind.snapshots === true), { minLength: 1, maxLength: 12 }), { minLength: 1, maxLength: 3 }), async (sessions) => {
          const path = join(dir, `online-${kind.name.replace(/\W+/g, '-')}.qcow2`);
          await Image.create(path, kind.create);
          const model = new Uint8Array(size);
          let snapped = false;
          for (const ops of sessions) {
            {
              // closed however the block ends: a failed run must not leave the next one locked out
              await using img = await Image.open(path, { write: true, dedup: true });
              for (const o of ops) {
                if (o.w === 'data' || o.w === 'part') {
                  const bytes = o.w === 'data' ? repeat(pattern(o.p, cs), o.n) : new Uint8Array(o.n).fill(o.p);
                  await img.write(o.at, bytes);
                  model.set(bytes, o.at);
                } else if (o.w === 'zero') {
                  await img.writeZeroes(o.at, o.n);
                  model.fill(0, o.at, o.at + o.n);
                } else if (o.w === 'discard') {
                  await img.discard(o.at, o.n);
                  model.fill(0, o.at, o.at + o.n);
                } else if (o.w === 'snap' && !snapped) {
                  await img.snapshots.create('s');
                  snapped = true;
                } else if (o.w === 'unsnap' && snapped) {
                  await img.snapshots.delete('s', { byName: true });
                  snapped = false;
                }
              }
              totalShared += img.writer!.dedup!.shared;
              expect(Buffer.from(await img.read(0, size)).equals(Buffer.from(model))).toBe(true);
            }
            const r = spawnSync('qemu-img', ['check', path], { encoding: 'utf8' });
            expect(r.status, r.stdout + r.stderr).toBe(0);
          }
          const raw = join(dir, 'model.raw');
          writeFileSync(raw, model);
          expect(spawnSync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', path, raw], { encoding: 'utf8' }).status).toBe(0);
        }),
        { numRuns: RUNS },
      );
    });
  }
  it('shared clusters in those sessions', () => {
    expect(totalShared).toBeGreaterThan(0);
  });
});

d('online dedup: exact cases', () => {
  it('a fingerprint collision is caught by the byte check and nothing is shared', async () => {
    // two 512-byte clusters whose fingerprints agree in all of `hi` (the index keeps at most its top 32 bits)
    const buf = new Uint8Array(512).fill(7);
    const view = new DataView(buf.buffer);
    const seen = new Map<number, number>();
    let pair: [number, number] | undefined;
    // (one word alone would not do: the hash is a bijection of any single 32-bit word)
    for (let i = 0; i < 1_000_000 && !pair; i++) {
      view.setUint32(0, i);
      view.setUint32(4, i);
      const hi = fingerprint(buf).hi;
      const j = seen.get(hi);
      if (j !== undefined) pair = [j, i];
      else seen.set(hi, i);
    }
    expect(pair).toBeDefined();
    const mk = (i: number) => {
      const b = new Uint8Array(512).fill(7);
      new DataView(b.buffer).setUint32(0, i);
      new DataView(b.buffer).setUint32(4, i);
      return b;
    };
    const path = join(dir, 'collision.qcow2');
    await Image.create(path, { size: 8 << 20, clusterSize: 512 });
    const img = await Image.open(path, { write: true, dedup: true });
    await img.write(0, mk(pair![0]));
    // enough distinct clusters to move the first into the index's table (the delta keeps whole fingerprints)
    const filler = new Uint8Array(5000 * 512);
    for (let k = 0; k < 5000; k++) new DataView(filler.buffer).setUint32(k * 512, 0xf0000000 + k);
    await img.write(512, filler);
    await img.write(6000 * 512, mk(pair![1]));
    const st = img.writer!.dedup!;
    expect(st.mismatches).toBeGreaterThanOrEqual(1);
    expect(st.shared).toBe(0);
    expect(Buffer.from(await img.read(6000 * 512, 512)).equals(Buffer.from(mk(pair![1])))).toBe(true);
    expect(Buffer.from(await img.read(0, 512)).equals(Buffer.from(mk(pair![0])))).toBe(true);
    // the first cluster's entry survived the collision: its bytes written again share it
    await img.write(6001 * 512, mk(pair![0]));
    expect(img.writer!.dedup!.shared).toBe(1);
    await img.close();
    expect(spawnSync('qemu-img', ['check', path]).status).toBe(0);
  });

  it('shares up to the refcount width and no further; COPIED comes back when one mapping is left', async () => {
    const path = join(dir, 'width.qcow2');
    await Image.create(path, { size: 1 << 20, clusterSize: 4096, refcountBits: 2 });
    const img = await Image.open(path, { write: true, dedup: true });
    const a = pattern(1, 4096);
    for (let k = 0; k < 5; k++) await img.write(k * 4096, a);
    let st = await img.dedupState();
    expect({ data: st.dataClusters, stored: st.storedClusters }).toEqual({ data: 5, stored: 2 });
    // overwrite all but one of each cluster's mappings: each lone mapping gets COPIED (its own cluster) back
    for (const k of [0, 1, 3]) await img.write(k * 4096, pattern(2 + k, 4096));
    await img.close();
    expect(spawnSync('qemu-img', ['check', path]).status).toBe(0);
    const r = await Image.open(path);
    st = await r.dedupState();
    expect(st.sharedClusters).toBe(0);
    await r.close();
    const map = JSON.parse(qemuImg(['map', '--output=json', path])) as Array<{ data: boolean }>;
    expect(map.filter((e) => e.data).length).toBeGreaterThan(0);
  });

  it('the lone mapping a shared cluster keeps gets its own cluster and keeps what its entry said (zero flag, subclusters)', async () => {
    for (const create of [{ size: 1 << 20 }, { size: 1 << 20, extendedL2: true }] as CreateOptions[]) {
      const path = join(dir, 'lone.qcow2');
      await Image.create(path, create);
      const a = pattern(1, 65536);
      {
        await using img = await Image.open(path, { write: true, dedup: true });
        await img.write(0, repeat(a, 3 * 65536)); // three mappings of one cluster
        await img.writeZeroes(2 * 65536, 65536); // the third keeps its reference with the zero flag (zero-alloc)
      }
      {
        await using img = await Image.open(path, { write: true, dedup: true });
        await img.write(0, repeat(pattern(2, 65536), 2 * 65536)); // the first two move away: the third is alone
        const got = await img.read(0, 3 * 65536);
        expect(Buffer.from(got.subarray(0, 2 * 65536)).equals(Buffer.from(repeat(pattern(2, 65536), 2 * 65536)))).toBe(true);
        expect(got.subarray(2 * 65536).every((b) => b === 0)).toBe(true);
      }
      expect(spawnSync('qemu-img', ['check', path]).status).toBe(0);
    }
  });

  it('the journal dump shows a share: COPIED cleared on the stored mapping, the refcount passing 1, the new mapping', async () => {
    const path = join(dir, 'journal.qcow2');
    await Image.create(path, { size: 16 << 20 });
    const img = await Image.open(path, { write: true, dedup: true });
    await img.write(0, pattern(1, 65536));
    await img.flush();
    await img.write(65536, pattern(1, 65536));
    await img.flush();
    await img.abandon();
    const out = (await runCli('journal', 'dump', path)).out;
    expect(out).toMatch(/^  l2 table 0x[0-9a-f]+ \[0\] \(l1 0\): 0x80000000000([0-9a-f]{5}) -> 0x00000000000\1 \(COPIED cleared: shared\)\n  refcount cluster 0x[0-9a-f]+: 1 -> 2 \(shared\)\n  l2 table 0x[0-9a-f]+ \[1\] \(l1 0\): 0x0000000000000000 -> 0x00000000000\1$/m);
  });

  it('an overlay over a backing file: shares among its own clusters, the backing data showing through elsewhere', async () => {
    const base = join(dir, 'dd-base.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', base, '8M']);
    qemuIo(base, ['write -P 0x31 0 8M']);
    const top = join(dir, 'dd-top.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    {
      await using img = await Image.open(top, { write: true, dedup: true });
      const a = pattern(4, 65536);
      await img.write(0, repeat(a, 4 * 65536));
      await img.write(1 << 20, a);
      await img.write(2 << 20, new Uint8Array(100).fill(2)); // a partial write: copy-on-write from the backing file
      expect(img.writer!.dedup!.shared).toBe(4);
    }
    expect(spawnSync('qemu-img', ['check', top]).status).toBe(0);
    const want = new Uint8Array(8 << 20).fill(0x31);
    want.set(repeat(pattern(4, 65536), 4 * 65536), 0);
    want.set(pattern(4, 65536), 1 << 20);
    want.fill(2, 2 << 20, (2 << 20) + 100);
    const raw = join(dir, 'dd-want.raw');
    writeFileSync(raw, want);
    expect(qemuImg(['compare', '-F', 'raw', top, raw])).toContain('identical');
  });

  it('1-bit refcounts and external data files: dedup says why it is off and writes normally', async () => {
    const path = join(dir, 'rc1.qcow2');
    await Image.create(path, { size: 1 << 20, refcountBits: 1 });
    const warnings: string[] = [];
    const img = await Image.open(path, { write: true, dedup: true, onWarning: (m) => warnings.push(m) });
    await img.write(0, pattern(1, 65536));
    await img.write(65536, pattern(1, 65536));
    expect((await img.dedupState()).storedClusters).toBe(2);
    expect(img.writer!.dedup).toBeUndefined();
    await img.close();
    expect(warnings.join('\n')).toMatch(/dedup is off: refcount_bits=1 cannot count a second reference/);
    const r = await runCli('dedup', path);
    expect(r).toEqual({ code: 1, out: '', err: `qledger: ${path}: cannot dedup: refcount_bits=1 cannot count a second reference, so no cluster can be shared\n` });
    const df = join(dir, 'df.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, 'df.raw')}`, df, '1M']);
    const w2: string[] = [];
    const img2 = await Image.open(df, { write: true, dedup: true, onWarning: (m) => w2.push(m) });
    await img2.write(0, pattern(1, 65536));
    await img2.close();
    expect(w2.join('\n')).toMatch(/external data file carry no refcounts/);
  });

  it('a read-only open, a raw image and a read-only export refuse dedup in words', async () => {
    const path = join(dir, 'ro.qcow2');
    await Image.create(path, { size: 1 << 20 });
    await expect(Image.open(path, { dedup: true })).rejects.toThrow(/dedup shares clusters as it writes, so it needs a read-write open/);
    const raw = join(dir, 'plain.raw');
    writeFileSync(raw, new Uint8Array(65536));
    expect(await runCli('dedup', '-f', 'raw', raw)).toEqual({ code: 1, out: '', err: "qledger: dedup: format 'raw' cannot share clusters; only qcow2 can\n" });
    const nbd = await runCli('nbd', '-r', '--dedup', '-k', join(dir, 'x.sock'), path);
    expect(nbd.code).toBe(1);
    expect(nbd.err).toMatch(/--dedup shares clusters as clients write; it cannot be used with a read-only export/);
  });
});

(qemuAvailable && nbdToolsAvailable ? describe : describe.skip)('online dedup behind the NBD server', () => {
  it('nbdcopy of a disk that repeats itself onto a dedup export stores each cluster once', async () => {
    const src = join(dir, 'nbd-src.raw');
    const unit = new Uint8Array(1 << 20);
    for (let i = 0; i < unit.length; i++) unit[i] = (i * 7 + (i >> 16)) & 255;
    writeFileSync(src, repeat(unit, 8 << 20)); // eight copies of one MiB
    const path = join(dir, 'nbd-dedup.qcow2');
    await Image.create(path, { size: 8 << 20 });
    const img = await Image.open(path, { write: true, dedup: true });
    const sock = join(dir, 'dedup.sock');
    const srv = await serveNbd(img, { socket: sock, shared: 4 });
    try {
      // asynchronously: the server runs in this process; nbdcopy opens four connections (multi-conn)
      const code = await new Promise<number | null>((resolve) => spawn('nbdcopy', [src, `nbd+unix:///?socket=${sock}`], { stdio: 'inherit' }).once('exit', resolve));
      expect(code).toBe(0);
      await srv.done;
    } finally {
      await srv.close();
    }
    const st = await img.dedupState();
    await img.close();
    expect({ data: st.dataClusters, stored: st.storedClusters }).toEqual({ data: 128, stored: 16 });
    expect(qemuImg(['compare', '-F', 'raw', path, src])).toContain('identical');
    expect(spawnSync('qemu-img', ['check', path]).status).toBe(0);
  });
});

d('the persisted index', () => {
  const unit = repeat(pattern(5, 65536), 4 << 20).map((b, i) => (b + (i >> 16)) & 255); // 64 distinct clusters
  const ext = (path: string) => {
    const head = new Uint8Array(readFileSync(path).subarray(0, 65536));
    const e = decodeHeader(head, statSync(path).size).extensions.find((x) => x.type === EXT_DEDUP_INDEX)!;
    return { at: e.offset + 8, offset: Number(new DataView(e.data.buffer, e.data.byteOffset).getBigUint64(0)), length: Number(new DataView(e.data.buffer, e.data.byteOffset).getBigUint64(8)) };
  };
  async function session(path: string, at: number, warnings: string[] = []) {
    await using img = await Image.open(path, { write: true, dedup: true, onWarning: (m) => warnings.push(m) });
    await img.write(at, unit);
    const c = { ...img.writer!.dedup! };
    expect(Buffer.from(await img.read(at, unit.length)).equals(Buffer.from(unit))).toBe(true);
    return c;
  }

  it('a clean close writes it, the next session loads it instead of reading the image; any other writer makes it stale', async () => {
    const path = join(dir, 'persist.qcow2');
    await Image.create(path, { size: 64 << 20 });
    const s1 = await session(path, 0);
    expect(s1.loaded).toBe(0);
    expect(spawnSync('qemu-img', ['check', path]).status).toBe(0);
    const s2 = await session(path, 8 << 20);
    expect({ loaded: s2.loaded, indexed: s2.indexed, shared: s2.shared }).toEqual({ loaded: 64, indexed: 0, shared: 64 });
    // QEMU writes (and clears the unknown autoclear bit): the next session rebuilds
    qemuIo(path, ['write -P 9 32M 64k']);
    const s3 = await session(path, 16 << 20);
    expect(s3.loaded).toBe(0);
    expect(s3.indexed).toBeGreaterThan(0);
    expect(s3.shared).toBe(64);
    // a session without dedup clears the bit too
    {
      await using img = await Image.open(path, { write: true });
      await img.write(40 << 20, new Uint8Array(65536).fill(3));
    }
    expect((await session(path, 24 << 20)).loaded).toBe(0);
    expect(spawnSync('qemu-img', ['check', path]).status).toBe(0);
  });

  it('a damaged, out-of-bounds or forged copy costs shares, never wrong data', async () => {
    const path = join(dir, 'forged.qcow2');
    await Image.create(path, { size: 64 << 20 });
    await session(path, 0);
    // one flipped byte in the area: the checksum says so, and the index is rebuilt
    const e = ext(path);
    const fd = openSync(path, 'r+');
    const one = Buffer.alloc(1);
    readSync(fd, one, 0, 1, e.offset + 100);
    one[0] = one[0]! ^ 0xff;
    writeSync(fd, one, 0, 1, e.offset + 100);
    closeSync(fd);
    const warnings: string[] = [];
    const s = await session(path, 8 << 20, warnings);
    expect(warnings.join('\n')).toMatch(/persisted dedup index fails its checks \(dedup index area: crc32 at offset 0x[0-9a-f]+: checksum mismatch\); it is rebuilt from the image/);
    expect({ loaded: s.loaded, shared: s.shared }).toEqual({ loaded: 0, shared: 64 });
    // an extension pointing past the end of the file
    const e2 = ext(path);
    const fd2 = openSync(path, 'r+');
    const past = Buffer.alloc(8);
    past.writeBigUInt64BE(BigInt(statSync(path).size + (1 << 20)));
    writeSync(fd2, past, 0, 8, e2.at);
    closeSync(fd2);
    const w2: string[] = [];
    await session(path, 16 << 20, w2);
    expect(w2.join('\n')).toMatch(/lies outside the file or off a cluster boundary; it is rebuilt/);
    // forged: a well-formed area (right checksum) whose entries name the wrong clusters for every fingerprint
    const e3 = ext(path);
    const forged = new DedupIndex(1024);
    for (let k = 0; k < 5000; k++) forged.add(Math.imul(k, 0x9e3779b1) >>> 0, k, (k * 7) % 1024);
    for (let c = 0; c < 64; c++) {
      const f = fingerprint(unit.subarray(c * 65536, (c + 1) * 65536));
      forged.add(f.hi, f.lo, 600 + c); // clusters that hold other bytes (or nothing)
    }
    const bytes = encodeArea(forged.arrays(), (b) => zlib.crc32(b));
    const fd3 = openSync(path, 'r+');
    const fsize = statSync(path).size;
    const at = Math.ceil(fsize / 65536) * 65536;
    writeSync(fd3, bytes, 0, bytes.length, at);
    const body = Buffer.alloc(16);
    body.writeBigUInt64BE(BigInt(at), 0);
    body.writeBigUInt64BE(BigInt(bytes.length), 8);
    writeSync(fd3, body, 0, 16, e3.at);
    closeSync(fd3);
    const s4 = await session(path, 32 << 20);
    expect(s4.loaded).toBeGreaterThan(0);
    // every forged candidate failed its checks; the content is right
    expect(spawnSync('qemu-img', ['check', path]).status).toBe(0);
  });
});

d('offline dedup (qledger dedup) of a QEMU-made image', () => {
  it('merges duplicates, keeps the bytes, gives the space back, and QEMU goes on with the image', async () => {
    const path = join(dir, 'offline.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', path, '64M']);
    qemuIo(path, ['write -P 0x11 0 1M', 'write -P 0x22 1M 1M', 'write -P 0x11 4M 2M', 'write -P 0x33 8M 64k', 'write -P 0x22 9M 64k']);
    const before = join(dir, 'offline-before.raw');
    qemuImg(['convert', '-O', 'raw', path, before]);
    const alloc0 = statSync(path).blocks * 512;
    // convert --dedup writes each distinct cluster once
    const conv = join(dir, 'offline-converted.qcow2');
    expect((await runCli('convert', '--dedup', '-O', 'qcow2', path, conv)).code).toBe(0);
    expect(qemuImg(['compare', path, conv])).toContain('Images are identical.');
    {
      await using c = await Image.open(conv);
      expect((await c.dedupState()).storedClusters).toBe(3);
    }
    expect(await runCli('convert', '--dedup', '-O', 'raw', path, join(dir, 'x.raw'))).toEqual({ code: 1, out: '', err: 'qledger: convert: --dedup shares qcow2 clusters; it needs -O qcow2\n' });
    const r = await runCli('dedup', '--output=json', path);
    expect(r.code, r.err).toBe(0);
    const j = JSON.parse(r.out) as Record<string, number>;
    // 16 + 32 clusters of 0x11, 16 + 1 of 0x22, 1 of 0x33
    expect(j).toMatchObject({ 'clusters-scanned': 66, 'clusters-merged': 63, 'bytes-saved': 63 * 65536, 'data-clusters': 66, 'stored-clusters': 3, 'shared-clusters': 2, ratio: 22 });
    expect(j['allocated-after']).toBeLessThan(alloc0 - 60 * 65536);
    expect(spawnSync('qemu-img', ['check', path]).status).toBe(0);
    expect(qemuImg(['compare', path, before])).toContain('Images are identical.');
    // info --dedup (qledger's own) adds the state to what qemu-img info prints
    const info = JSON.parse((await runCli('info', '--dedup', '--output=json', path)).out) as Record<string, unknown>;
    expect(info['dedup']).toEqual({ 'data-clusters': 66, 'stored-clusters': 3, 'shared-clusters': 2, 'bytes-saved': 63 * 65536, ratio: 22 });
    expect((await runCli('info', '--dedup', path)).out).toMatch(/\nDedup:\n {4}data clusters: 66\n {4}stored clusters: 3\n {4}shared clusters: 2\n {4}bytes saved: 4128768\n {4}ratio: 22\.000\n$/);
    // a second run finds nothing left to merge
    const again = JSON.parse((await runCli('dedup', '--output=json', path)).out) as Record<string, number>;
    expect(again['clusters-merged']).toBe(0);
    // QEMU writes into shared clusters (it copies them first) and the image stays clean
    qemuIo(path, ['write -P 0x44 4M 64k', 'write -P 0x55 0 128k']);
    expect(spawnSync('qemu-img', ['check', path]).status).toBe(0);
    // ... except where it overwrites every mapping but one: it leaves COPIED clear on the last (the
    // README's one difference), harmless, and check -r all repairs it
    const two = join(dir, 'offline-two.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', two, '16M']);
    qemuIo(two, ['write -P 1 0 64k', 'write -P 1 64k 64k']);
    expect((await runCli('dedup', '-q', two)).code).toBe(0);
    qemuIo(two, ['write -P 2 0 64k']);
    const ck = spawnSync('qemu-img', ['check', two], { encoding: 'utf8' });
    expect({ status: ck.status, err: ck.stderr.trim() }).toEqual({ status: 2, err: expect.stringMatching(/^ERROR OFLAG_COPIED data cluster: l2_entry=[0-9a-f]+ refcount=1$/) });
    expect((await runCli('check', '-r', 'all', two)).code).toBe(0);
    expect(spawnSync('qemu-img', ['check', two]).status).toBe(0);
    const human = await runCli('dedup', path);
    expect(human.out).toMatch(/^Clusters scanned: \d+\nClusters merged: \d+ \(\d+ bytes saved\)\nShared clusters: \d+ .*\nDedup ratio: \d+\.\d\d\nFile length: \d+ -> \d+ bytes; allocated: \d+ -> \d+ bytes\n$/);
  });

  it('an image with a snapshot: the snapshot reads as before, shared clusters stay counted', async () => {
    const path = join(dir, 'offline-snap.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', path, '4M']);
    qemuIo(path, ['write -P 1 0 256k', 'write -P 2 256k 256k']);
    qemuImg(['snapshot', '-c', 'base', path]);
    qemuIo(path, ['write -P 1 1M 256k', 'write -P 2 2M 128k']);
    const snap = join(dir, 'snap-before.raw');
    qemuImg(['convert', '-O', 'raw', '-l', 'base', path, snap]);
    const active = join(dir, 'active-before.raw');
    qemuImg(['convert', '-O', 'raw', path, active]);
    const r = await runCli('dedup', '--output=json', path);
    expect(r.code, r.err).toBe(0);
    expect((JSON.parse(r.out) as Record<string, number>)['clusters-merged']).toBe(96);
    expect(spawnSync('qemu-img', ['check', path]).status).toBe(0);
    const snapAfter = join(dir, 'snap-after.raw');
    qemuImg(['convert', '-O', 'raw', '-l', 'base', path, snapAfter]);
    expect(qemuImg(['compare', '-f', 'raw', '-F', 'raw', snap, snapAfter])).toContain('identical');
    expect(qemuImg(['compare', '-F', 'raw', path, active])).toContain('identical');
    copyFileSync(path, join(dir, 'offline-snap-copy.qcow2'));
    qemuImg(['snapshot', '-d', 'base', path]);
    expect(spawnSync('qemu-img', ['check', path]).status).toBe(0);
  });
});

describe('the crash harness on dedup workloads', () => {
  const cs = 4096;
  const size = 256 * 1024;
  const clusterRange = fc.tuple(fc.integer({ min: 0, max: size / cs - 1 }), fc.integer({ min: 1, max: 3 })).map(([c, n]) => [c * cs, Math.min(n, size / cs - c) * cs] as const);
  const dedupOps: fc.Arbitrary<GuestOp[]> = fc.array(
    fc.oneof(
      { weight: 5, arbitrary: fc.tuple(clusterRange, fc.integer({ min: 1, max: 3 })).map(([[offset, length], pattern]): GuestOp => ({ op: 'write', offset, length, pattern })) },
      { weight: 2, arbitrary: fc.tuple(fc.integer({ min: 0, max: size - 600 }), fc.integer({ min: 1, max: 600 }), fc.integer({ min: 1, max: 3 })).map(([offset, length, pattern]): GuestOp => ({ op: 'write', offset, length, pattern })) },
      { weight: 2, arbitrary: fc.constant<GuestOp>({ op: 'flush' }) },
      { weight: 1, arbitrary: fc.constant<GuestOp>({ op: 'dedup' }) },
      { weight: 1, arbitrary: clusterRange.map(([offset, length]): GuestOp => ({ op: 'discard', offset, length })) },
      { weight: 1, arbitrary: fc.constantFrom<GuestOp>({ op: 'snapshot', action: 'create', name: 's' }, { op: 'snapshot', action: 'delete', name: 's' }) },
    ),
    { minLength: 2, maxLength: 10 },
  );
  for (const journal of [true, false]) {
    it(`journal ${journal ? 'on: no leak after recovery' : 'off: leaks at worst'}`, async () => {
      await fc.assert(
        fc.asyncProperty(dedupOps, async (ops) => {
          const o = { create: { size, clusterSize: cs }, maxStates: 80, seed: 11, journal, dedup: true, qemuSamples: qemuAvailable ? 1 : 0 };
          const r = await crashTest(ops, o);
          expect(r.failures, `${r.failures.slice(0, 3).map((f) => `${f.state}: ${f.problem}`).join('\n')}\nreplay: ${reproduction(ops, o)}`).toEqual([]);
          if (journal) expect(r.leaksAfterRecovery).toBe(0);
        }),
        { numRuns: RUNS + 1 },
      );
    });
  }
  it('a share and the write that undoes it in one write-back: COPIED leaves the durable entry first (found by the long budget)', async () => {
    // cluster 3 written, then shared by cluster 50, then copied away by a partial write, all before one flush:
    // the durable entry of cluster 3 still had COPIED while the write-back raised its old cluster's refcount
    const ops: GuestOp[] = [
      { op: 'write', offset: 3 * cs, length: cs, pattern: 2 },
      { op: 'flush' },
      { op: 'write', offset: 50 * cs, length: cs, pattern: 2 },
      { op: 'write', offset: 3 * cs - 261, length: 3159, pattern: 2 },
      { op: 'truncate', size: 4 * size },
    ];
    for (const journal of [true, false]) {
      const o = { create: { size, clusterSize: cs }, maxStates: 400, seed: 1, journal, dedup: true, qemuSamples: 0 };
      const r = await crashTest(ops, o);
      expect(r.failures, `${r.failures.slice(0, 2).map((f) => `${f.state}: ${f.problem}`).join('\n')}\nreplay: ${reproduction(ops, o)}`).toEqual([]);
      if (journal) expect(r.leaksAfterRecovery).toBe(0);
    }
  });

  it('the fault that clears COPIED with the increment is caught on a dedup workload without snapshots', async () => {
    const ops: GuestOp[] = [
      { op: 'write', offset: 0, length: cs, pattern: 1 },
      { op: 'flush' },
      { op: 'write', offset: 8 * cs, length: cs, pattern: 1 },
      { op: 'flush' },
    ];
    const r = await crashTest(ops, { create: { size, clusterSize: cs }, maxStates: 200, seed: 3, journal: false, dedup: true, fault: 'unshare-with-increment', qemuSamples: 0 });
    expect(r.failures.length).toBeGreaterThan(0);
    expect(r.failures[0]!.problem).toMatch(/OFLAG_COPIED/);
    const ok = await crashTest(ops, { create: { size, clusterSize: cs }, maxStates: 200, seed: 3, journal: false, dedup: true, qemuSamples: 0 });
    expect(ok.failures).toEqual([]);
  });
});
