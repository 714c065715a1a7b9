/**
 * Model-based tests of the write engine (fast-check, one command class per
 * operation): random write / write-zeroes / discard / flush / reopen / read
 * sequences run against a plain byte array, on images of many kinds. After
 * each run the image must read back as the model, through qledger and
 * through `qemu-img convert`, and `qemu-img check` must find no error and
 * no leak.
 *
 * Budget: QLEDGER_PROPERTY_RUNS (default 15 runs per image kind; the long
 * budget is e.g. QLEDGER_PROPERTY_RUNS=500). A failure prints fast-check's
 * seed and path and the shrunk command list, which reads as qemu-io commands.
 */

import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import fc from 'fast-check';
import { copyFileSync, readFileSync, rmSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { Image } from '../src/engine/image.ts';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';

const RUNS = Number(process.env['QLEDGER_PROPERTY_RUNS'] ?? 15);
const SIZE = 4 * 1024 * 1024;

interface Kind {
  readonly name: string;
  /** build the pristine image (and its backing files) in dir; returns its file name */
  readonly build: (dir: string) => Promise<string>;
  readonly clusterSize: number;
  readonly v2: boolean;
  readonly backing: boolean;
}

const mk = (name: string, opts: string, extra: Partial<Kind> = {}): Kind => ({
  name,
  clusterSize: Number(/cluster_size=(\d+)/.exec(opts)?.[1] ?? 65536),
  v2: opts.includes('compat=0.10'),
  backing: false,
  build: async (dir) => {
    const o = new Map(opts.split(',').filter(Boolean).map((kv) => kv.split('=') as [string, string]));
    await Image.create(join(dir, 'img.qcow2'), {
      size: SIZE,
      clusterSize: o.has('cluster_size') ? Number(o.get('cluster_size')) : undefined,
      compat: o.get('compat'),
      refcountBits: o.has('refcount_bits') ? Number(o.get('refcount_bits')) : undefined,
      extendedL2: o.get('extended_l2') === 'on',
      lazyRefcounts: o.get('lazy_refcounts') === 'on',
    });
    return 'img.qcow2';
  },
  ...extra,
});

/** An image QEMU wrote: a base with data, then `setup` qemu-io commands and options. */
const fromQemu = (name: string, opts: string, setup: (dir: string) => string, extra: Partial<Kind> = {}): Kind => ({
  name,
  clusterSize: Number(/cluster_size=(\d+)/.exec(opts)?.[1] ?? 65536),
  v2: opts.includes('compat=0.10'),
  backing: false,
  build: async (dir) => setup(dir),
  ...extra,
});

const KINDS: Kind[] = [
  mk('qledger-created, 64 KiB clusters', ''),
  mk('512 B clusters, 64-bit refcounts, 3 MiB prefilled (refcount table growth)', 'cluster_size=512,refcount_bits=64', {
    build: async (dir) => {
      const f = join(dir, 'img.qcow2');
      await Image.create(f, { size: SIZE, clusterSize: 512, refcountBits: 64 });
      const img = await Image.open(f, { write: true });
      // 3 MiB of data needs more refcount blocks than one refcount-table cluster holds (64 x 64 clusters)
      await img.write(0, new Uint8Array(3 << 20).fill(0x5a));
      await img.close();
      return 'img.qcow2';
    },
  }),
  mk('4 KiB clusters, 1-bit refcounts', 'cluster_size=4096,refcount_bits=1'),
  mk('v2 (compat=0.10), 4 KiB clusters', 'compat=0.10,cluster_size=4096'),
  mk('extended L2, 32 KiB clusters', 'extended_l2=on,cluster_size=32768'),
  mk('lazy refcounts, 8-bit refcounts', 'lazy_refcounts=on,refcount_bits=8,cluster_size=4096'),
  fromQemu('over a backing file (QEMU-written)', 'cluster_size=4096', (dir) => {
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', join(dir, 'base.qcow2'), String(SIZE)]);
    qemuIo(join(dir, 'base.qcow2'), ['write -P 0x11 0 1M', 'write -P 0x22 2M 1536k', 'write -z 64k 64k']);
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'img.qcow2')]);
    qemuIo(join(dir, 'img.qcow2'), ['write -P 0x33 512k 100k']);
    return 'img.qcow2';
  }, { backing: true }),
  {
    name: 'qledger-created over a backing file',
    clusterSize: 8192,
    v2: false,
    backing: true,
    build: async (dir) => {
      qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), String(SIZE)]);
      qemuIo(join(dir, 'base.qcow2'), ['write -P 0x12 0 3M']);
      // no size: taken from the backing file, whose data must show through
      await Image.create(join(dir, 'img.qcow2'), { clusterSize: 8192, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
      return 'img.qcow2';
    },
  },
  fromQemu('v2 over a backing file', 'compat=0.10,cluster_size=4096', (dir) => {
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4096', join(dir, 'base.qcow2'), String(SIZE)]);
    qemuIo(join(dir, 'base.qcow2'), ['write -P 0x44 0 3M']);
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4096', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'img.qcow2')]);
    return 'img.qcow2';
  }, { backing: true, v2: true }),
  fromQemu('extended L2 over a backing file', 'extended_l2=on,cluster_size=16384', (dir) => {
    qemuImg(['create', '-q', '-f', 'raw', join(dir, 'base.raw'), String(SIZE)]);
    qemuIo(join(dir, 'base.raw'), ['write -P 0x55 0 4M'], ['-f', 'raw']);
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=16384', '-b', 'base.raw', '-F', 'raw', join(dir, 'img.qcow2')]);
    qemuIo(join(dir, 'img.qcow2'), ['write -P 0x66 1000 5000', 'write -z 40k 8k']);
    return 'img.qcow2';
  }, { backing: true }),
  fromQemu('internal snapshots sharing clusters', 'cluster_size=4096', (dir) => {
    const f = join(dir, 'img.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, String(SIZE)]);
    qemuIo(f, ['write -P 0x77 0 4M']);
    qemuImg(['snapshot', '-c', 'one', f]);
    qemuIo(f, ['write -P 0x78 1M 1M']);
    qemuImg(['snapshot', '-c', 'two', f]);
    return 'img.qcow2';
  }),
  fromQemu('compressed clusters (qemu-img convert -c)', 'cluster_size=4096', (dir) => {
    const raw = join(dir, 'src.raw');
    qemuImg(['create', '-q', '-f', 'raw', raw, String(SIZE)]);
    qemuIo(raw, ['write -P 0x99 0 1M', 'write -P 0x9a 1536k 2M'], ['-f', 'raw']);
    qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, join(dir, 'img.qcow2')]);
    rmSync(raw);
    return 'img.qcow2';
  }),
];

// ---- model and commands ------------------------------------------------

interface Model {
  data: Uint8Array;
  readonly kind: Kind;
  /** what v2 discard shows over a backing file */
  readonly backingData: Uint8Array | undefined;
}

interface Real {
  img: Image;
  readonly path: string;
}

class WriteCmd implements fc.AsyncCommand<Model, Real> {
  constructor(readonly off: number, readonly len: number, readonly pat: number) {}
  check = () => true;
  async run(m: Model, r: Real) {
    await r.img.write(this.off, new Uint8Array(this.len).fill(this.pat));
    m.data.fill(this.pat, this.off, this.off + this.len);
  }
  toString = () => `write -P ${this.pat} ${this.off} ${this.len}`;
}

/** qemu-io write -c of one cluster: refused (guest unchanged) when the cluster already holds data. */
class CompressCmd implements fc.AsyncCommand<Model, Real> {
  constructor(readonly off: number, readonly len: number, readonly pat: number) {}
  check = () => true;
  async run(m: Model, r: Real) {
    try {
      await r.img.writeCompressed(this.off, new Uint8Array(this.len).fill(this.pat));
      m.data.fill(this.pat, this.off, this.off + this.len);
    } catch (e) {
      expect((e as { code?: string }).code).toBe('E_IO');
    }
  }
  toString = () => `write -c -P ${this.pat} ${this.off} ${this.len}`;
}

class ZeroCmd implements fc.AsyncCommand<Model, Real> {
  constructor(readonly off: number, readonly len: number, readonly unmap: boolean) {}
  check = () => true;
  async run(m: Model, r: Real) {
    await r.img.writeZeroes(this.off, this.len, { unmap: this.unmap });
    m.data.fill(0, this.off, this.off + this.len);
  }
  toString = () => `write -z${this.unmap ? ' -u' : ''} ${this.off} ${this.len}`;
}

class DiscardCmd implements fc.AsyncCommand<Model, Real> {
  constructor(readonly off: number, readonly len: number) {}
  check = () => true;
  async run(m: Model, r: Real) {
    await r.img.discard(this.off, this.len);
    // QEMU's semantics: whole clusters only; they read as zero, except on v2
    // over a backing file, where the backing data shows through again.
    const cs = m.kind.clusterSize;
    const first = Math.ceil(this.off / cs) * cs;
    const end = this.off + this.len;
    const last = end === SIZE ? end : end - (end % cs);
    for (let c = first; c < last; c += cs) {
      if (m.kind.v2 && m.backingData) m.data.set(m.backingData.subarray(c, c + cs), c);
      else m.data.fill(0, c, c + cs);
    }
  }
  toString = () => `discard ${this.off} ${this.len}`;
}

class FlushCmd implements fc.AsyncCommand<Model, Real> {
  check = () => true;
  async run(_m: Model, r: Real) {
    await r.img.flush();
  }
  toString = () => 'flush';
}

class ReopenCmd implements fc.AsyncCommand<Model, Real> {
  check = () => true;
  async run(_m: Model, r: Real) {
    await r.img.close();
    r.img = await Image.open(r.path, { write: true, cacheBytes: 0 });
  }
  toString = () => 'reopen';
}

class ReadCmd implements fc.AsyncCommand<Model, Real> {
  constructor(readonly off: number, readonly len: number) {}
  check = () => true;
  async run(m: Model, r: Real) {
    const got = await r.img.read(this.off, this.len);
    expect(Buffer.from(got).equals(Buffer.from(m.data.subarray(this.off, this.off + this.len)))).toBe(true);
  }
  toString = () => `read ${this.off} ${this.len}`;
}

/** Offsets and lengths biased towards cluster and table boundaries. */
function range(cs: number) {
  const aligned = fc.tuple(fc.integer({ min: 0, max: SIZE / cs - 1 }), fc.integer({ min: 1, max: 24 })).map(([c, n]) => [c * cs, Math.min(n * cs, SIZE - c * cs)] as const);
  const any = fc.tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 3 * cs + 700 })).map(([o, l]) => [o, Math.min(l, SIZE - o)] as const);
  const sectors = fc.tuple(fc.integer({ min: 0, max: SIZE / 512 - 1 }), fc.integer({ min: 1, max: 64 })).map(([s, n]) => [s * 512, Math.min(n * 512, SIZE - s * 512)] as const);
  return fc.oneof(aligned, any, sectors);
}

function commands(kind: Kind) {
  const r = range(kind.clusterSize);
  return fc.commands(
    [
      fc.tuple(r, fc.integer({ min: 0, max: 255 })).map(([[o, l], p]) => new WriteCmd(o, l, p)),
      fc.tuple(r, fc.boolean()).map(([[o, l], u]) => new ZeroCmd(o, l, u)),
      fc.tuple(fc.integer({ min: 0, max: SIZE / kind.clusterSize - 1 }), fc.integer({ min: 0, max: 255 })).map(
        ([c, p]) => new CompressCmd(c * kind.clusterSize, kind.clusterSize, p),
      ),
      r.map(([o, l]) => new DiscardCmd(o, l)),
      fc.constant(new FlushCmd()),
      fc.constant(new ReopenCmd()),
      r.map(([o, l]) => new ReadCmd(o, l)),
    ],
    { maxCommands: 25 },
  );
}

describe.skipIf(!qemuAvailable)('write engine against a byte-array model', () => {
  let tmp: { dir: string; cleanup: () => void };
  beforeAll(() => {
    tmp = tempDir('qledger-model-');
  });
  afterAll(() => tmp.cleanup());

  for (const kind of KINDS) {
    it(kind.name, async () => {
      const dir = join(tmp.dir, kind.name.replace(/[^a-z0-9]+/gi, '-'));
      spawnSync('mkdir', ['-p', dir]);
      const name = await kind.build(dir);
      const pristine = join(dir, name);
      const pristineBytes = readFileSync(pristine);
      const work = join(dir, 'work.qcow2');
      const initial = new Uint8Array(qemuConvert(pristine, join(dir, 'initial.raw')));
      let backingData: Uint8Array | undefined;
      if (kind.backing) {
        const base = existsSync(join(dir, 'base.qcow2')) ? join(dir, 'base.qcow2') : join(dir, 'base.raw');
        backingData = new Uint8Array(qemuConvert(base, join(dir, 'backing.raw')));
      }
      await fc.assert(
        fc.asyncProperty(commands(kind), async (cmds) => {
          copyFileSync(pristine, work);
          const real: Real = { img: await Image.open(work, { write: true, cacheBytes: 0 }), path: work };
          const model: Model = { data: initial.slice(), kind, backingData };
          try {
            await fc.asyncModelRun(() => ({ model, real }), cmds);
          } finally {
            await real.img.close();
          }
          const check = spawnSync('qemu-img', ['check', work], { encoding: 'utf8' });
          if (check.status !== 0) throw new Error(`qemu-img check exit ${check.status}:\n${check.stdout}${check.stderr}`);
          const viaQemu = qemuConvert(work, join(dir, 'out.raw'));
          expect(Buffer.compare(viaQemu, Buffer.from(model.data))).toBe(0);
          const img = await Image.open(work);
          try {
            expect(Buffer.from(await img.read(0, SIZE)).equals(Buffer.from(model.data))).toBe(true);
          } finally {
            await img.close();
          }
        }),
        { numRuns: RUNS, verbose: 1 },
      );
      // the pristine image was never touched
      expect(readFileSync(pristine).equals(pristineBytes)).toBe(true);
    });
  }
});

function qemuConvert(src: string, out: string): Buffer {
  qemuImg(['convert', '-O', 'raw', src, out]);
  const b = readFileSync(out);
  rmSync(out);
  return b;
}
