/**
 * The durable journal: journal-format.md against the constants, the frame
 * codec and its torn-tail rules, recovery after a crash (no leak), fuzzed
 * journal bytes (never corruption, never a crash), staleness after QEMU,
 * `journal dump`, and the switch that turns it off.
 */

import { describe, it, expect, afterAll } from 'vitest';
import fc from 'fast-check';
import { readFileSync, writeFileSync, copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import * as log from '../src/journal/log.ts';
import { AUTOCLEAR_JOURNAL, EXT_JOURNAL } from '../src/format/features.ts';
import { putU32, putU64, u32, u64, u64big } from '../src/format/bytes.ts';
import type { JournalRecord } from '../src/journal/records.ts';
import { MemoryDevice } from '../src/io/memory-device.ts';
import { createOnDevice, openSession, openWriterOnDevice } from '../src/engine/writable.ts';
import { checkDevice } from '../src/engine/check/check.ts';
import { loadQcow2 } from '../src/engine/qcow2-layer.ts';
import { dumpJournal, readJournal } from '../src/engine/journal/locate.ts';
import { Image } from '../src/engine/image.ts';
import { QledgerError } from '../src/errors.ts';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';
import { spawnSync } from 'node:child_process';

const { dir, cleanup } = tempDir();
afterAll(cleanup);

const RUNS = Number(process.env.QLEDGER_PROPERTY_RUNS ?? 15);

describe('journal-format.md', () => {
  it('lists the constants the code uses, with the same values', () => {
    const doc = readFileSync(join(import.meta.dirname, '..', 'journal-format.md'), 'utf8');
    const rows = new Map([...doc.matchAll(/^\|\s*`([A-Z_]+)`\s*\|\s*(0x[0-9a-f]+|\d+)\s*\|$/gm)].map((m) => [m[1]!, BigInt(m[2]!)]));
    const code: Record<string, bigint> = {
      AUTOCLEAR_JOURNAL,
      EXT_JOURNAL: BigInt(EXT_JOURNAL),
      EXT_JOURNAL_LENGTH: BigInt(log.EXT_JOURNAL_LENGTH),
      AREA_MAGIC: log.AREA_MAGIC,
      AREA_VERSION: BigInt(log.AREA_VERSION),
      AREA_HEADER_SIZE: BigInt(log.AREA_HEADER_SIZE),
      FRAME_MAGIC: BigInt(log.FRAME_MAGIC),
      FRAME_HEADER_SIZE: BigInt(log.FRAME_HEADER_SIZE),
      FRAME_ALIGN: BigInt(log.FRAME_ALIGN),
      FRAME_FIRST: BigInt(log.FRAME_FIRST),
      FRAME_LAST: BigInt(log.FRAME_LAST),
      FRAME_TARGET_PAYLOAD: BigInt(log.FRAME_TARGET_PAYLOAD),
    };
    expect([...rows.keys()].sort()).toEqual(Object.keys(code).sort());
    for (const [k, v] of Object.entries(code)) expect(rows.get(k), k).toBe(v);
    // the byte layouts the document gives
    expect(doc).toMatch(/44 - 47: crc32/);
    expect(doc).toMatch(/36 - 39: crc32/);
    expect(doc).toMatch(/"123456789" is\s+0xCBF43926/);
    expect(crc32(Buffer.from('123456789'))).toBe(0xcbf43926);
  });
});

const off = fc.integer({ min: 0, max: 2 ** 40 });
const rec: fc.Arbitrary<JournalRecord> = fc.oneof(
  fc.record({ kind: fc.constant('refcount' as const), cluster: off, old: off, new: off }),
  fc.record({ kind: fc.constant('l1' as const), index: fc.nat(1000), old: fc.record({ hi: fc.nat(), lo: fc.nat() }), new: fc.record({ hi: fc.nat(), lo: fc.nat() }) }),
  fc.record({ kind: fc.constant('begin' as const), tx: fc.nat(), op: fc.string({ maxLength: 20 }) }),
  fc.record({ kind: fc.constant('image' as const), role: fc.constant('l1' as const), offset: off, bytes: fc.uint8Array({ maxLength: 70_000 }) }),
);

function area(bytes: Uint8Array, gen: bigint, size = 1 << 20): Uint8Array {
  const a = new Uint8Array(size);
  a.set(log.encodeAreaHeader({ generation: gen, size, appliedTx: 0 }));
  a.set(bytes.subarray(0, size - 512), 512);
  return a;
}

describe('frames', () => {
  it('a transaction reads back as written, committed; cut at any sector it is not committed', () => {
    fc.assert(
      fc.property(fc.array(rec, { minLength: 1, maxLength: 40 }), fc.bigInt({ min: 1n, max: 2n ** 64n - 1n }), fc.nat(1000), (records, gen, seq) => {
        const enc = log.encodeTransaction(records, { generation: gen, tx: 7, seq });
        const scan = log.scanFrames(area(enc.bytes, gen), gen);
        expect(scan.transactions).toHaveLength(1);
        expect(scan.transactions[0]!.committed).toBe(true);
        expect(scan.transactions[0]!.records).toEqual(records);
        expect(scan.transactions[0]!.frames).toBe(enc.frames);
        // a torn tail: only a prefix of the sectors reached the disk
        for (let cut = 0; cut < enc.bytes.length; cut += 512 * Math.max(1, Math.floor(enc.bytes.length / 512 / 8))) {
          const t = log.scanFrames(area(enc.bytes.subarray(0, cut), gen), gen);
          expect(t.transactions.every((x) => !x.committed)).toBe(true);
        }
        // another generation's frames are not this journal's
        expect(log.scanFrames(area(enc.bytes, gen), gen ^ 1n).transactions).toHaveLength(0);
      }),
      { numRuns: RUNS * 4 },
    );
  });

  it('a bad area header is a FormatError naming the field and offset', () => {
    const h = log.encodeAreaHeader({ generation: 5n, size: 8192, appliedTx: 3 });
    expect(log.decodeAreaHeader(h, 0x1000)).toEqual({ generation: 5n, size: 8192, appliedTx: 3 });
    h[100] = h[100]! ^ 1;
    expect(() => log.decodeAreaHeader(h, 0x1000)).toThrow(/journal area header: crc32 at offset 0x102c: checksum mismatch/);
    expect(() => log.decodeAreaHeader(new Uint8Array(512), 0x2000)).toThrow(/magic at offset 0x2000/);
  });
});

// ---- crashed images in memory ---------------------------------------------------

interface Crashed {
  readonly image: Uint8Array;
  /** the area, relative to the image */
  readonly areaAt: number;
}

/**
 * A 4 KiB-cluster image whose last write-back stopped after `phases` of its
 * in-place phases (0: only the journal transaction is durable).
 */
async function crashedImage(phases: number, seed: number): Promise<Crashed> {
  const dev = new MemoryDevice('j.qcow2');
  // 64-bit refcounts: a refcount block covers 2 MiB, so the write-back also hooks in a new block
  await createOnDevice(dev, 'j.qcow2', { size: 8 << 20, clusterSize: 4096, refcountBits: 64 });
  const w = await openWriterOnDevice(dev, 'j.qcow2', { journalBytes: 1 << 20 });
  let x = seed;
  const rnd = (n: number) => ((x = (x * 48271) % 2147483647), x % n); // Park-Miller: no short cycles in the low bits
  for (let i = 0; i < 12; i++) await w.write(rnd(2048) * 4096, new Uint8Array(4096 + rnd(3) * 512).fill(1 + i));
  await w.flush();
  // the last write-back: frees, ~600 new clusters, a new refcount block, an L1 table that grows;
  // the truncate writes it back and stops after `phases` of its in-place phases
  (w as unknown as { stopAfterPhase: number }).stopAfterPhase = phases;
  await w.discard(0, 8 << 20);
  for (let i = 0; i < 600; i++) await w.write(rnd(2048) * 4096, new Uint8Array(512).fill(30 + (i % 200)));
  let stopped = false;
  await w.truncate(24 << 20).catch((e: unknown) => {
    if (!(e instanceof QledgerError)) throw e;
    stopped = true;
  });
  if (!stopped) throw new Error(`the write-back had fewer than ${phases + 1} phases`);
  const image = dev.snapshot();
  const { parsed, fileSize } = await loadQcow2(new MemoryDevice('j', image, { readOnly: true }));
  const d = await dumpJournal(new MemoryDevice('j', image, { readOnly: true }), parsed, fileSize);
  return { image, areaAt: d.area!.offset };
}

async function recoverAndCheck(image: Uint8Array): Promise<{ corruptions: number; leaks: number; action: string; warnings: string[] }> {
  const dev = new MemoryDevice('j.qcow2', image);
  const warnings: string[] = [];
  const { writer, recovery } = await openSession(dev, undefined, 'j.qcow2', undefined, { onWarning: (m) => warnings.push(m) });
  await writer.close();
  const r = await checkDevice(new MemoryDevice('j.qcow2', dev.snapshot(), { readOnly: true }), 'j.qcow2');
  return { corruptions: r.corruptions + r.checkErrors, leaks: r.leaks, action: recovery.action, warnings };
}

// A write-back stopped after 0 phases has its frames durable and no in-place write. Its data (all in
// clusters it allocates) shared the frames' flush, and without an increment on disk recovery cannot
// tell that flush completed: it drops the transaction (nothing of it is in place; the write was never
// acknowledged). From the first phase on, the increments show the flush completed: it completes it.
const expectedAt = (phases: number) => (phases === 0 ? 'dropped' : 'replayed');

describe('recovery', () => {
  it('a crash at any phase of a journalled write-back: the open completes it (or drops it, before any in-place write), no leak, no corruption', async () => {
    for (const phases of [0, 1, 2, 3]) {
      const c = await crashedImage(phases, 11 + phases);
      const raw = await checkDevice(new MemoryDevice('j', c.image, { readOnly: true }), 'j');
      expect(raw.corruptions + raw.checkErrors).toBe(0);
      const r = await recoverAndCheck(c.image);
      expect(r, `stopped after ${phases} phases`).toMatchObject({ corruptions: 0, leaks: 0, action: expectedAt(phases), warnings: [] });
    }
  });

  it('a write-back that grows the refcount table (a multi-step operation) is completed by recovery at every phase', async () => {
    // 1 KiB clusters with 64-bit refcounts: one refcount-table cluster covers 16 MiB of file
    for (const phases of [0, 1, 2, 3]) {
      const dev = new MemoryDevice('r.qcow2');
      await createOnDevice(dev, 'r.qcow2', { size: 32 << 20, clusterSize: 1024, refcountBits: 64 });
      const w = await openWriterOnDevice(dev, 'r.qcow2', { journalBytes: 8 << 20 });
      const trace: import('../src/engine/writer.ts').TraceEvent[] = [];
      (w as unknown as { trace: unknown }).trace = trace;
      (w as unknown as { stopAfterPhase: number }).stopAfterPhase = phases;
      let stopped = false;
      for (let i = 0; i < 18 * 16; i++) await w.write(i * 65536, new Uint8Array(65536).fill(1 + (i % 250)));
      await w.flush().catch((e: unknown) => {
        if (!(e instanceof QledgerError)) throw e;
        stopped = true;
      });
      expect(stopped, `stopped after ${phases}`).toBe(true);
      expect(trace.some((e) => e.type === 'record' && e.record.kind === 'reftable-swap')).toBe(true);
      const r = await recoverAndCheck(dev.snapshot());
      expect(r, `stopped after ${phases} phases`).toMatchObject({ corruptions: 0, leaks: 0, action: expectedAt(phases) });
    }
  });

  it('a replay whose writes would land on other metadata is ignored with the overlap named, and writes nothing', async () => {
    // a write-back that allocates an L2 table, stopped with only its transaction durable
    const made = new MemoryDevice('j.qcow2');
    await createOnDevice(made, 'j.qcow2', { size: 8 << 20, clusterSize: 4096, refcountBits: 64 });
    const w = await openWriterOnDevice(made, 'j.qcow2', { journalBytes: 1 << 20 });
    await w.write(0, new Uint8Array(4096).fill(1));
    await w.flush();
    (w as unknown as { stopAfterPhase: number }).stopAfterPhase = 0;
    // a rewrite of the first cluster too, so that the data is summed (not all in new clusters) and the
    // transaction, its data intact, is one recovery would complete
    await w.write(0, new Uint8Array(4096).fill(3));
    await w.write(6 << 20, new Uint8Array(4096).fill(2));
    await expect(w.flush()).rejects.toThrow(/stopped after 0 phases/);
    const image = made.snapshot();
    const { parsed, fileSize } = await loadQcow2(new MemoryDevice('j', image, { readOnly: true }));
    const d = await dumpJournal(new MemoryDevice('j', image, { readOnly: true }), parsed, fileSize);
    const newL2 = d.transactions.at(-1)!.records.find((r) => r.kind === 'table-new' && r.role === 'l2') as { offset: number } | undefined;
    expect(newL2).toBeDefined();
    const at = newL2!.offset.toString(16);
    // an unused refcount-table entry now names that cluster as a refcount block
    const damaged = image.slice();
    putU64(damaged, u64(damaged, 48) + 8 * 100, newL2!.offset);
    const dev = new MemoryDevice('j.qcow2', damaged.slice());
    const { recoverJournal } = await import('../src/engine/journal/replay.ts');
    const r = await recoverJournal(dev, 'j.qcow2', (await loadQcow2(dev)).parsed, fileSize);
    expect(r.action).toBe('ignored');
    expect(r.warnings.join()).toContain(`its replay would overwrite other metadata: replay: new l2 0x${at} at 0x${at} (4096 bytes) would overwrite the refcount block at 0x${at}`);
    expect(Buffer.from(dev.snapshot()).equals(Buffer.from(damaged))).toBe(true);
    // undamaged, the same transaction replays
    const ok = await recoverJournal(new MemoryDevice('j.qcow2', image.slice()), 'j.qcow2', parsed, fileSize);
    expect(ok.action).toBe('replayed');
  });

  /**
   * A journalled write-back of `length` bytes at guest 2 MiB, traced; the
   * writer is left open. Into new clusters, or with `overwrite`, over
   * clusters written before, with 4 KiB into a new cluster at guest 4 MiB
   * in the same write-back (so that it has a transaction whose data is not
   * all in clusters it allocates).
   */
  async function tracedWriteBack(length: number, stopAfterPhase?: number, overwrite = false) {
    const dev = new MemoryDevice('d.qcow2');
    await createOnDevice(dev, 'd.qcow2', { size: 8 << 20, clusterSize: 4096 });
    const w = await openWriterOnDevice(dev, 'd.qcow2', { journalBytes: 1 << 20 });
    await w.write(0, new Uint8Array(4096).fill(1));
    if (overwrite) await w.write(2 << 20, new Uint8Array(length).fill(2));
    await w.flush(); // the journal started: what follows is the steady state
    const trace: import('../src/engine/writer.ts').TraceEvent[] = [];
    (w as unknown as { trace: unknown }).trace = trace;
    if (stopAfterPhase !== undefined) (w as unknown as { stopAfterPhase: number }).stopAfterPhase = stopAfterPhase;
    const bytes = new Uint8Array(length).map((_, i) => 1 + (i % 251));
    await w.write(2 << 20, bytes);
    if (overwrite) await w.write(4 << 20, new Uint8Array(4096).fill(3));
    const flushed = await w.flush().then(
      () => true,
      (e: unknown) => {
        if (!(e instanceof QledgerError)) throw e;
        return false;
      },
    );
    const image = dev.snapshot();
    const { parsed, fileSize } = await loadQcow2(new MemoryDevice('d', image, { readOnly: true }));
    const d = await dumpJournal(new MemoryDevice('d', image, { readOnly: true }), parsed, fileSize);
    const records = d.transactions.at(-1)!.records;
    const sums = records.filter((r) => r.kind === 'data-crc') as Array<Extract<JournalRecord, { kind: 'data-crc' }>>;
    const fresh = records.filter((r) => r.kind === 'data-fresh') as Array<Extract<JournalRecord, { kind: 'data-fresh' }>>;
    return { w, trace, flushed, image, sums, fresh, bytes, flushes: trace.filter((e) => e.type === 'flush').length };
  }

  it('data into clusters the write-back allocates shares the frames\' flush, whatever its size: three flushes instead of four', async () => {
    for (const length of [4096, 256 << 10, 2 << 20]) {
      const c = await tracedWriteBack(length);
      expect(c.flushed).toBe(true);
      // frames with the data; refcount increments and new L2 table; the L2 entries
      expect(c.flushes, `${length} bytes`).toBe(3);
      expect(c.sums).toHaveLength(0);
      expect(c.fresh.reduce((n, r) => n + r.length, 0)).toBe(length);
      await c.w.close();
    }
  });

  it('other data shares the flush with its checksums up to 128 KiB, and is flushed on its own past that', async () => {
    const small = await tracedWriteBack(8192, undefined, true);
    expect(small.flushes).toBe(3);
    expect(small.fresh).toHaveLength(0);
    expect(small.sums.map((x) => x.length)).toEqual([8192, 4096]);
    expect(small.sums[0]!.crc).toBe(crc32(small.bytes));
    expect(crc32(small.image.subarray(small.sums[0]!.host, small.sums[0]!.host + 8192))).toBe(small.sums[0]!.crc);
    const big = await tracedWriteBack(256 << 10, undefined, true);
    expect(big.flushes).toBe(4);
    expect(big.sums).toHaveLength(0);
    expect(big.fresh).toHaveLength(0);
  });

  it('recovery drops a transaction whose summed data did not reach the disk, and completes it when it did', async () => {
    // stopped after the frames' flush: the data is durable with them
    const c = await tracedWriteBack(8192, 0, true);
    expect(c.flushed).toBe(false);
    expect(c.sums).toHaveLength(2);
    const whole = await recoverAndCheck(c.image.slice());
    expect(whole).toMatchObject({ corruptions: 0, leaks: 0, action: 'replayed' });
    // the same frames beside a torn new cluster (a power cut before that flush completed): the mapping
    // would show bytes that were never written, so nothing of the transaction may be completed
    const added = c.sums[1]!;
    const torn = c.image.slice();
    torn.fill(0xee, added.host + 2048, added.host + 4096);
    const dev = new MemoryDevice('d.qcow2', torn);
    const { writer, recovery } = await openSession(dev, undefined, 'd.qcow2', undefined, {});
    expect(recovery).toMatchObject({ action: 'dropped', warnings: [] });
    const got = new Uint8Array(4096);
    await writer.read(4 << 20, got);
    expect(Buffer.from(got).equals(Buffer.alloc(4096))).toBe(true);
    await writer.close();
    const r = await checkDevice(new MemoryDevice('d.qcow2', dev.snapshot(), { readOnly: true }), 'd.qcow2');
    expect(r.corruptions + r.checkErrors + r.leaks).toBe(0);
    // the checkpoint moved past it: a later open has nothing to weigh
    const again = await openSession(new MemoryDevice('d.qcow2', torn.slice()), undefined, 'd.qcow2', undefined, {});
    await again.writer.abandon();
    const { parsed, fileSize } = await loadQcow2(new MemoryDevice('d', dev.snapshot(), { readOnly: true }));
    const { recoverJournal } = await import('../src/engine/journal/replay.ts');
    expect((await recoverJournal(new MemoryDevice('d.qcow2', dev.snapshot()), 'd.qcow2', parsed, fileSize)).action).toBe('none');
  });

  it('data in new clusters: dropped while none of the refcount increments is on disk, completed once one is; refused where the transaction does not allocate it', async () => {
    // stopped after the frames' flush: the increments were not written, so that flush may not have
    // completed (the data may be torn) and nothing of the transaction is in place
    const before = await tracedWriteBack(64 << 10, 0);
    expect(before.fresh).toHaveLength(1);
    const torn = before.image.slice();
    torn.fill(0xee, before.fresh[0]!.host, before.fresh[0]!.host + 4096);
    const dev = new MemoryDevice('d.qcow2', torn);
    const { writer, recovery } = await openSession(dev, undefined, 'd.qcow2', undefined, {});
    expect(recovery).toMatchObject({ action: 'dropped', warnings: [] });
    const got = new Uint8Array(64 << 10);
    await writer.read(2 << 20, got);
    expect(Buffer.from(got).equals(Buffer.alloc(64 << 10))).toBe(true);
    await writer.close();
    const r = await checkDevice(new MemoryDevice('d.qcow2', dev.snapshot(), { readOnly: true }), 'd.qcow2');
    expect(r.corruptions + r.checkErrors + r.leaks).toBe(0);
    // stopped after the increments: the flush had completed, the data is there, and it is completed
    const after = await tracedWriteBack(64 << 10, 1);
    const done = await recoverAndCheck(after.image.slice());
    expect(done).toMatchObject({ corruptions: 0, leaks: 0, action: 'replayed' });
    const dev2 = new MemoryDevice('d.qcow2', after.image.slice());
    const o = await openSession(dev2, undefined, 'd.qcow2', undefined, {});
    const back = new Uint8Array(64 << 10);
    await o.writer.read(2 << 20, back);
    expect(Buffer.from(back).equals(Buffer.from(after.bytes))).toBe(true);
    await o.writer.abandon();
    // a range in a cluster the transaction does not allocate (the header's): not a journal qledger wrote
    const { parsed, fileSize } = await loadQcow2(new MemoryDevice('d', before.image, { readOnly: true }));
    const d = await dumpJournal(new MemoryDevice('d', before.image, { readOnly: true }), parsed, fileSize);
    const tx = d.transactions.at(-1)!;
    const forged = before.image.slice();
    const enc = log.encodeTransaction([...tx.records, { kind: 'data-fresh', host: 0, length: 512 }], { generation: d.area!.generation, tx: tx.tx, seq: tx.firstSeq });
    forged.set(enc.bytes, d.area!.offset + 512);
    const dev3 = new MemoryDevice('d.qcow2', forged.slice());
    const { recoverJournal } = await import('../src/engine/journal/replay.ts');
    const x = await recoverJournal(dev3, 'd.qcow2', parsed, fileSize);
    expect(x.action).toBe('ignored');
    expect(x.warnings.join()).toMatch(/its data at 0x0 is in a cluster it does not allocate/);
    expect(Buffer.from(dev3.snapshot()).equals(Buffer.from(forged))).toBe(true);
  });

  it('a transaction whose checksums cover more than 16 MiB is not one qledger wrote: ignored, nothing written', async () => {
    const c = await tracedWriteBack(4096, 0);
    const { parsed, fileSize } = await loadQcow2(new MemoryDevice('d', c.image, { readOnly: true }));
    const d = await dumpJournal(new MemoryDevice('d', c.image, { readOnly: true }), parsed, fileSize);
    const tx = d.transactions.at(-1)!;
    const forged = c.image.slice();
    const records: JournalRecord[] = [...tx.records, { kind: 'data-crc', host: 0, length: 17 << 20, crc: 0 }];
    const enc = log.encodeTransaction(records, { generation: d.area!.generation, tx: tx.tx, seq: tx.firstSeq });
    forged.set(enc.bytes, d.area!.offset + 512);
    const dev = new MemoryDevice('d.qcow2', forged.slice());
    const { recoverJournal } = await import('../src/engine/journal/replay.ts');
    const r = await recoverJournal(dev, 'd.qcow2', parsed, fileSize);
    expect(r.action).toBe('ignored');
    expect(r.warnings.join()).toContain('its data checksums cover more than 16777216 bytes');
    expect(Buffer.from(dev.snapshot()).equals(Buffer.from(forged))).toBe(true);
  });

  it('a damaged image with a transaction to replay is refused as it is: recovery writes nothing first (fuzz findings)', async () => {
    const { builtinImages } = await import('../src/harness/fuzz.ts');
    const { decodeHeader } = await import('../src/format/header.ts');
    const seed = (await builtinImages()).at(-1)!;
    expect(seed.name).toBe('v3-4k-crashed-journal');
    const p = decodeHeader(seed.bytes, seed.bytes.length);
    // undamaged, it replays
    const fine = await openSession(new MemoryDevice('c.qcow2', seed.bytes.slice()), undefined, 'c.qcow2', undefined, {});
    expect(fine.recovery.action).toBe('replayed');
    await fine.writer.abandon();
    const damage: Array<[string, (b: Uint8Array) => void, RegExp]> = [
      // a refcount table entry past the end of the file (the writer's open refuses it)
      ['refcount table', (b) => putU64(b, p.header.refcountTableOffset + 8 * 40, 2 ** 40), /refcount table entry 40 .* past the end of the file/],
      // reserved flags in the bitmap directory's entry (QEMU's directory check refuses it)
      ['bitmap directory', (b) => putU32(b, p.bitmaps!.directoryOffset + 12, u32(b, p.bitmaps!.directoryOffset + 12) | 0x100), /reserved flags are set/],
    ];
    for (const [what, hurt, message] of damage) {
      const bytes = seed.bytes.slice();
      hurt(bytes);
      const dev = new MemoryDevice('c.qcow2', bytes.slice());
      await expect(openSession(dev, undefined, 'c.qcow2', undefined, {}), what).rejects.toThrow(message);
      expect(Buffer.from(dev.snapshot()).equals(Buffer.from(bytes)), `${what}: nothing written`).toBe(true);
    }
    // metadata that overlaps already: not replayed (the writer then refuses writes), nothing written
    const bytes = seed.bytes.slice();
    const l2 = Number(u64big(bytes, p.header.l1TableOffset) & 0x00ff_ffff_ffff_fe00n);
    putU64(bytes, p.header.refcountTableOffset + 8 * 40, l2);
    const dev = new MemoryDevice('c.qcow2', bytes.slice());
    const warnings: string[] = [];
    const o = await openSession(dev, undefined, 'c.qcow2', undefined, { onWarning: (m) => warnings.push(m) });
    expect(o.recovery.action).toBe('ignored');
    expect(o.recovery.warnings.join()).toMatch(/not replayed, the image's .* already share the cluster at 0x[0-9a-f]+/);
    expect(o.writer.refusal).toMatch(/metadata overlaps/);
    await o.writer.abandon();
    expect(Buffer.from(dev.snapshot()).equals(Buffer.from(bytes))).toBe(true);
  });

  it('recovery touches only the area, the tables the transaction names and the header', async () => {
    const c = await crashedImage(1, 5);
    const dev = new MemoryDevice('j.qcow2', c.image.slice());
    const reads: Array<[number, number]> = [];
    const orig = dev.readInto.bind(dev);
    dev.readInto = async (b: Uint8Array, o: number) => {
      reads.push([o, b.length]);
      return orig(b, o);
    };
    const { parsed, fileSize } = await loadQcow2(new MemoryDevice('j', c.image, { readOnly: true }));
    const { recoverJournal } = await import('../src/engine/journal/replay.ts');
    const r = await recoverJournal(dev, 'j.qcow2', parsed, fileSize);
    expect(r.action).toBe('replayed');
    const bytes = reads.reduce((n, [, l]) => n + l, 0);
    // the area (1 MiB), the header, the L1 and refcount tables and the tables the transaction names
    const named = new Set<number>();
    const d = await dumpJournal(new MemoryDevice('j', c.image, { readOnly: true }), parsed, fileSize);
    for (const r of d.transactions.at(-1)!.records) if (r.kind === 'l2') named.add(r.table);
    expect(bytes).toBeLessThanOrEqual((1 << 20) + (named.size + 8) * 4096);
    expect(bytes).toBeLessThan(c.image.length / 2);
  });

  it('fuzzed journal bytes (flips, truncation, duplicated, reordered and renumbered frames) never corrupt the image or crash the open', async () => {
    const base = await crashedImage(0, 3);
    const A = base.areaAt;
    // frame boundaries of the committed transaction
    const frames: Array<{ at: number; len: number }> = [];
    for (let p = A + 512; u32(base.image, p) === log.FRAME_MAGIC; ) {
      const len = Math.ceil((40 + u32(base.image, p + 4)) / 512) * 512;
      frames.push({ at: p, len });
      p += len;
    }
    expect(frames.length).toBeGreaterThan(1);
    const end = frames[frames.length - 1]!.at + frames[frames.length - 1]!.len;
    const mutation = fc.oneof(
      fc.record({ k: fc.constant('flip' as const), at: fc.integer({ min: A, max: end - 1 }), bit: fc.nat(7) }),
      fc.record({ k: fc.constant('truncate' as const), at: fc.integer({ min: A + 512, max: end }) }),
      fc.record({ k: fc.constant('duplicate' as const), i: fc.nat(frames.length - 1) }),
      fc.record({ k: fc.constant('swap' as const), i: fc.nat(frames.length - 2) }),
      // valid CRC, wrong numbers: the sequence or transaction number changed and the checksum recomputed.
      // (A change of 0 is no renumbering: after a flip it would only re-sign altered record content,
      // a forgery the CRC cannot tell from the truth and journal-format.md does not claim to detect.)
      fc.record({ k: fc.constant('renumber' as const), i: fc.nat(frames.length - 1), field: fc.constantFrom(16, 24), delta: fc.integer({ min: -3, max: 3 }).filter((d) => d !== 0) }),
    );
    const fixCrc = (img: Uint8Array, at: number) => {
      const len = u32(img, at + 4);
      const f = img.slice(at, at + 40 + len);
      putU32(f, 36, 0);
      putU32(img, at + 36, crc32(f));
    };
    await fc.assert(
      fc.asyncProperty(fc.array(mutation, { minLength: 1, maxLength: 3 }), async (ms) => {
        const img = base.image.slice();
        for (const m of ms) {
          if (m.k === 'flip') img[m.at]! ^= 1 << m.bit;
          else if (m.k === 'truncate') img.fill(0, m.at, end);
          else if (m.k === 'duplicate') {
            const f = frames[m.i]!;
            if (m.i + 1 < frames.length) img.set(img.slice(f.at, f.at + f.len), frames[m.i + 1]!.at);
          } else if (m.k === 'swap') {
            const a = frames[m.i]!;
            const b = frames[m.i + 1]!;
            const fa = img.slice(a.at, a.at + a.len);
            const fb = img.slice(b.at, b.at + b.len);
            img.set(fb, a.at);
            img.set(fa, a.at + fb.length);
          } else {
            const f = frames[m.i]!;
            putU64(img, f.at + m.field, Math.max(0, Number(u64big(img, f.at + m.field)) + m.delta));
            fixCrc(img, f.at);
          }
        }
        let r;
        try {
          r = await recoverAndCheck(img);
        } catch (e) {
          // refusing to open is allowed only as a user-facing error, never a crash
          expect(e).toBeInstanceOf(QledgerError);
          return;
        }
        expect(r.corruptions, JSON.stringify(ms)).toBe(0);
      }),
      { numRuns: RUNS * 10 },
    );
  });
});

describe.skipIf(!qemuAvailable)('with QEMU', () => {
  async function crashedFile(name: string, phases: number): Promise<string> {
    const c = await crashedImage(phases, 9);
    const f = join(dir, name);
    writeFileSync(f, c.image);
    return f;
  }
  const check = (f: string) => spawnSync('qemu-img', ['check', f], { encoding: 'utf8' });

  it('a cleanly closed journalled image: qemu-img check finds no error and no leak, qemu-io reads the data', async () => {
    const f = join(dir, 'clean.qcow2');
    await Image.create(f, { size: 16 << 20 });
    const img = await Image.open(f, { write: true });
    await img.write(0, new Uint8Array(65536).fill(7));
    await img.truncate(200 << 20);
    await img.write(150 << 20, new Uint8Array(4096).fill(8));
    await img.close();
    expect((await readJournal(f)).state).toBe('valid');
    const q = check(f);
    expect(q.status, q.stdout).toBe(0);
    expect(q.stdout).toContain('No errors were found');
    expect(qemuIo(f, ['read -P 7 0 64k', 'read -P 8 150M 4k'])).not.toContain('Pattern verification failed');
  });

  it('after a crash QEMU opens the image and finds leaks at worst; after recovery none', async () => {
    for (const phases of [0, 1, 2, 3]) {
      const f = await crashedFile(`crash${phases}.qcow2`, phases);
      const before = check(f);
      expect([0, 3], before.stdout).toContain(before.status);
      const img = await Image.open(f, { write: true });
      expect(img.recovery?.action).toBe(expectedAt(phases));
      await img.close();
      expect(check(f).status).toBe(0);
    }
  });

  it('qledger check on a crashed image reports the leaks as qemu-img does, with a note that the journal will recover them', async () => {
    const f = await crashedFile('note.qcow2', 1);
    const r = await runCli('check', f);
    expect(r.code).toBe(3);
    expect(r.err).toMatch(/note: the image's journal holds a committed write-back/);
    const q = check(f);
    expect(r.out).toBe(q.stdout);
  });

  it('a journal made stale by a QEMU read-write open is detected and not replayed', async () => {
    const f = await crashedFile('stale.qcow2', 1);
    const bitBefore = u64big(readFileSync(f), 88) & AUTOCLEAR_JOURNAL;
    expect(bitBefore).toBe(AUTOCLEAR_JOURNAL);
    qemuImg(['check', '-r', 'leaks', f]); // QEMU opens read-write: clears the bit
    expect(u64big(readFileSync(f), 88) & AUTOCLEAR_JOURNAL).toBe(0n);
    const copy = join(dir, 'stale-copy.qcow2');
    copyFileSync(f, copy);
    const warnings: string[] = [];
    const img = await Image.open(f, { write: true, onWarning: (m) => warnings.push(m) });
    expect(img.recovery?.action).toBe('ignored');
    expect(warnings.join('\n')).toMatch(/stale.*not replayed/);
    await img.close();
    expect(check(f).status).toBe(0);
    // and nothing of the journal went in place: the metadata is QEMU's
    const a = readFileSync(f);
    const b = readFileSync(copy);
    expect(Buffer.compare(a.subarray(0x1000, 0x3000), b.subarray(0x1000, 0x3000))).toBe(0);
  });

  it('an invalid journal on a live image is ignored with a warning, and the open still works', async () => {
    const f = await crashedFile('invalid.qcow2', 2);
    const b = readFileSync(f);
    const { parsed, fileSize } = await loadQcow2(new MemoryDevice('x', b, { readOnly: true }));
    const d = await dumpJournal(new MemoryDevice('x', b, { readOnly: true }), parsed, fileSize);
    b[d.area!.offset + 20] = b[d.area!.offset + 20]! ^ 0xff; // area header generation: its CRC fails
    writeFileSync(f, b);
    const r = await runCli('io', '-c', 'write -P 1 0 512', f);
    expect(r.err).toMatch(/warning: .*journal ignored, it fails validation: journal area header: crc32 at offset 0x[0-9a-f]+: checksum mismatch/);
    expect([0, 3]).toContain(check(f).status);
  });

  it('journal dump prints the committed transaction as records, in human and JSON form', async () => {
    const f = await crashedFile('dump.qcow2', 1);
    const h = await runCli('journal', 'dump', f);
    expect(h.code).toBe(0);
    expect(h.out).toMatch(/^journal area 0x[0-9a-f]+, 1048576 bytes, generation 0x[0-9a-f]+, applied up to tx \d+, live$/m);
    expect(h.out).toMatch(/^tx \d+: \d+ frames? from seq \d+, committed, not applied$/m);
    expect(h.out).toMatch(/^  l1 swap 0x[0-9a-f]+ \(\d+ entries\) -> 0x[0-9a-f]+ \(\d+ entries\)$/m);
    expect(h.out).toMatch(/^  refcount cluster 0x[0-9a-f]+: 0 -> 1$/m);
    const j = await runCli('journal', 'dump', '--output=json', f);
    const o = JSON.parse(j.out);
    expect(o.state).toBe('valid');
    const tx = o.transactions.at(-1);
    expect(tx.committed).toBe(true);
    expect(tx.records.some((r: { kind: string }) => r.kind === 'image')).toBe(true);
    expect((await runCli('journal', 'dump', join(dir, 'nope.qcow2'))).code).toBe(1);
    expect((await runCli('journal', 'frob', f)).err).toMatch(/unknown subcommand 'frob'/);
  });

  it('journalling off: no extension is added, the bit is cleared, and a crash leaves QEMU-style leaks', async () => {
    const f = join(dir, 'off.qcow2');
    await Image.create(f, { size: 16 << 20 });
    const img = await Image.open(f, { write: true, journal: false });
    await img.write(0, new Uint8Array(4096).fill(1));
    await img.close();
    expect((await readJournal(f)).state).toBe('absent');
    const f2 = await crashedFile('off2.qcow2', 2);
    const r = await runCli('io', '--journal=off', '-c', 'write -P 2 0 4k', f2);
    expect(r.code).toBe(0);
    // a live journal is recovered even when this session keeps none; the bit then goes
    expect(u64big(readFileSync(f2), 88) & AUTOCLEAR_JOURNAL).toBe(0n);
    expect(check(f2).status).toBe(0);
    expect((await runCli('io', '--journal=maybe', '-c', 'flush', f2)).err).toMatch(/--journal expects on or off/);
  });
});

describe("qledger's own extensions past 2^53 (issue 20, item 2)", () => {
  it('journal and dedup-index extension values and the area header are refused with their exact value, never rounded', async () => {
    const { decodeDedupExtension } = await import('../src/format/dedup-index-area.ts');
    const ext = new Uint8Array(16);
    putU64(ext, 0, 2n ** 60n + 1n);
    putU64(ext, 8, 1 << 23);
    expect(() => log.decodeJournalExtension(ext, 0x100)).toThrow(/area offset at offset 0x108: 0x1000000000000001 is above 2\^53/);
    expect(() => decodeDedupExtension(ext, 0x200)).toThrow(/area offset at offset 0x200: 0x1000000000000001 is above 2\^53/);
    putU64(ext, 0, 2n ** 53n);
    expect(log.decodeJournalExtension(ext, 0x100).offset).toBe(2 ** 53);
    // an area header whose checksum holds but whose applied transaction a number would round
    const h = log.encodeAreaHeader({ generation: 7n, size: 1 << 23, appliedTx: 1 });
    putU64(h, 32, 2n ** 60n + 1n);
    putU32(h, 44, 0);
    putU32(h, 44, crc32(h));
    expect(() => log.decodeAreaHeader(h, 0x10000)).toThrow(/applied_tx at offset 0x10020: 0x1000000000000001 is above 2\^53/);
  });

  it('a record whose offset a number would round (a frame qledger did not write) does not decode', async () => {
    const { encodeRecord, decodeRecord } = await import('../src/journal/codec.ts');
    const b = encodeRecord({ kind: 'refcount', cluster: 5, old: 0, new: 1 });
    expect(decodeRecord(b).record).toEqual({ kind: 'refcount', cluster: 5, old: 0, new: 1 });
    putU64(b, 8, 2n ** 60n + 1n);
    expect(() => decodeRecord(b)).toThrow(/0x1000000000000001 is above 2\^53/);
  });
});
