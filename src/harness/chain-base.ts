/**
 * The backing file of a crash workload as an image of its own, for the
 * workloads' `commit` (qemu-img commit: the top's data written into its
 * backing file through that file's write engine, made durable, then the top
 * emptied). The backing file is recorded like the top, so the harness can
 * judge the chain at every crash point: while the commit copies, the top
 * is untouched and shadows every range the copy writes, so any state of
 * the backing file reads the same through it; once the top's emptying
 * begins, the backing file is what was durable by then.
 */

import { MemoryDevice } from '../io/memory-device.ts';
import { RecordingDevice, crashStates, replayOps, type RecordedOp } from '../io/crash-device.ts';
import { readGuest } from '../engine/read.ts';
import { openQcow2Layer } from '../engine/qcow2-layer.ts';
import { RawLayer } from '../engine/raw-layer.ts';
import { allocatedHere, guest, type Layer } from '../engine/layer.ts';
import { createOnDevice, openWriterOnDevice } from '../engine/writable.ts';
import type { Qcow2Writer } from '../engine/writer.ts';

/** An in-memory image as a read-only layer (raw, or qcow2 over an optional backing layer). */
export async function memLayer(name: string, bytes: Uint8Array, format: 'raw' | 'qcow2', backing?: Layer): Promise<Layer> {
  const dev = new MemoryDevice(name, bytes, { readOnly: true });
  if (format === 'raw') return new RawLayer(name, dev, bytes.length);
  return openQcow2Layer(dev, name, { backing });
}

/**
 * A backing file for crash workloads (qledger crash-test --backing FMT,
 * the chain tests): raw, every sector a byte value of its own; or qcow2
 * with 4 KiB clusters, data in every other cluster and a run of zero
 * clusters, so that a commit or a rebase has both to carry.
 */
export async function makeBacking(format: 'raw' | 'qcow2', size: number): Promise<Uint8Array> {
  if (format === 'raw') {
    const b = new Uint8Array(size);
    for (let i = 0; i < size; i += 512) b.fill(((i >> 9) % 251) + 1, i, Math.min(size, i + 512));
    return b;
  }
  const dev = new MemoryDevice('backing.qcow2');
  await createOnDevice(dev, 'backing.qcow2', { size, clusterSize: 4096 });
  const w = await openWriterOnDevice(dev, 'backing.qcow2', { journal: false });
  for (let c = 0; c < Math.floor(size / 4096); c += 2) await w.write(c * 4096, new Uint8Array(4096).fill((c % 200) + 3));
  if (size >= 80 * 4096) await w.writeZeroes(64 * 4096, 16 * 4096);
  await w.close();
  return dev.snapshot();
}

export class CrashBase {
  readonly rec: RecordingDevice;
  /** the backing file's recording length when the top's emptying began (-1: no commit yet) */
  private atEmpty = -1;
  /** the top's recording length then: crash points past it see the backing file as it was durable at atEmpty */
  topAtEmpty = -1;
  /** what the chain read when the commit began */
  private expected: Uint8Array | undefined;
  private readonly initialLayer: Promise<Layer>;
  private finalLayer: Promise<Layer> | undefined;
  private durableLayer: Promise<Layer> | undefined;

  constructor(
    readonly name: string,
    readonly initial: Uint8Array,
    readonly format: 'raw' | 'qcow2',
  ) {
    this.rec = new RecordingDevice(name, initial);
    this.initialLayer = memLayer(name, initial, format);
  }

  get committed(): boolean {
    return this.atEmpty >= 0;
  }

  /** What later sessions read as the backing file. */
  current(): Promise<Layer> {
    return this.committed ? (this.finalLayer ??= memLayer(this.name, this.rec.snapshot(), this.format)) : this.initialLayer;
  }

  /** The backing file a top crash state at `crashPoint` reads through (see the module comment). */
  at(crashPoint: number): Promise<Layer> {
    if (!this.committed || crashPoint <= this.topAtEmpty) return this.initialLayer;
    this.durableLayer ??= (() => {
      // every write before the last flush that came before the emptying
      let lastFlush = 0;
      for (let i = 0; i < this.atEmpty; i++) if (this.rec.ops[i]!.kind === 'flush') lastFlush = i;
      return memLayer(this.name, replayOps(this.initial, this.rec.ops, lastFlush), this.format);
    })();
    return this.durableLayer;
  }

  /**
   * qemu-img commit of session `top` (closed first, as qemu-img commit runs
   * on closed images; `reopen` opens it again) into this backing file:
   * every range the top allocates, as the chain reads it (zeros as zero
   * writes), through the backing file's own write engine, made durable;
   * then `empty` empties the top. With `early` (the fault
   * 'commit-empty-early') the top is emptied before the backing file's
   * writes are flushed. Returns the top's new session.
   */
  async commit(top: Qcow2Writer, topOps: () => number, reopen: () => Promise<Qcow2Writer>, early: boolean): Promise<Qcow2Writer> {
    const size = top.size;
    this.expected = new Uint8Array(size);
    await top.read(0, this.expected);
    const ranges: Array<{ at: number; data: Uint8Array | undefined; length: number }> = [];
    for (let pos = 0; pos < size; ) {
      const st = await top.layer.status(guest(pos), size - pos);
      if (allocatedHere(st)) {
        const zero = st.type === 'zero-plain' || st.type === 'zero-alloc';
        const data = zero ? undefined : new Uint8Array(st.length);
        if (data) await top.read(pos, data);
        ranges.push({ at: pos, data, length: st.length });
      }
      pos += st.length;
    }
    await top.close();
    const qcow2 = this.format === 'qcow2' ? await openWriterOnDevice(this.rec, this.name, { cacheBytes: 0 }) : undefined;
    for (const r of ranges) {
      if (qcow2) await (r.data ? qcow2.write(r.at, r.data) : qcow2.writeZeroes(r.at, r.length, { unmap: true }));
      else if (r.data) await this.rec.write(r.at, r.data);
      else await this.rec.write(r.at, new Uint8Array(r.length));
    }
    const settle = async () => (qcow2 ? qcow2.close() : this.rec.flush());
    if (!early) await settle();
    this.atEmpty = this.rec.ops.length;
    this.topAtEmpty = topOps();
    const w = await reopen();
    await w.makeEmpty();
    await w.flush();
    if (early) await settle();
    this.finalLayer = undefined;
    this.durableLayer = undefined;
    return w;
  }

  /**
   * The copy's crash states: the top as it was when the copy began (closed,
   * so all of it durable; `topInitial` and `topOps` replayed to that
   * point) over each crash state of this backing file; the chain must read
   * what it read then. Returns the number of states and their failures.
   */
  async judgeCopy(topName: string, topInitial: Uint8Array, topOps: readonly RecordedOp[], maxStates: number, seed: number): Promise<{ states: number; failures: Array<{ state: string; problem: string }> }> {
    const failures: Array<{ state: string; problem: string }> = [];
    if (!this.committed || !this.expected) return { states: 0, failures };
    const top = replayOps(topInitial, topOps, this.topAtEmpty);
    let states = 0;
    for (const st of crashStates(this.initial, this.rec.ops.slice(0, this.atEmpty), { maxStates, seed })) {
      states++;
      try {
        const chain = await memLayer(topName, top, 'qcow2', await memLayer(this.name, st.image, this.format));
        const got = new Uint8Array(chain.size);
        await readGuest(chain, guest(0), got);
        const bad = got.length !== this.expected.length ? 0 : got.findIndex((b, i) => b !== this.expected![i]);
        if (bad >= 0) failures.push({ state: `commit copy, backing file ${st.description}`, problem: `the chain reads otherwise than when the commit began, first at guest offset 0x${bad.toString(16)}` });
      } catch (e) {
        failures.push({ state: `commit copy, backing file ${st.description}`, problem: `read failed: ${(e as Error).message}` });
      }
    }
    return { states, failures };
  }
}
