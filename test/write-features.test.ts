/**
 * Write-engine features that need a particular image state: lazy refcounts
 * and the dirty bit (set before the first deferred refcount, rebuilt on a
 * read-write open after a crash), autoclear bits, COPIED flags after
 * copy-on-write of snapshot-shared clusters.
 */

import { AUTOCLEAR_JOURNAL } from '../src/format/features.ts';
import { describe, it, expect, afterAll } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { Image } from '../src/engine/image.ts';
import { main } from '../src/cli/main.ts';
import type { TraceEvent } from '../src/engine/writer.ts';
import { putU64, u64big } from '../src/format/bytes.ts';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';

const { dir, cleanup } = tempDir('qledger-feat-');
afterAll(cleanup);

const dirtyBit = (f: string) => (u64big(readFileSync(f), 72) & 1n) === 1n;
const check = (f: string) => spawnSync('qemu-img', ['check', f], { encoding: 'utf8' });
const quiet = { out: () => {}, err: () => {} };

describe.skipIf(!qemuAvailable)('lazy refcounts', () => {
  it('the dirty bit is durable before the first L2 write, and cleared on close', async () => {
    const f = join(dir, 'lazy.qcow2');
    await Image.create(f, { size: 8 << 20, lazyRefcounts: true, clusterSize: 4096 });
    const trace: TraceEvent[] = [];
    const img = await Image.open(f, { write: true, trace });
    await img.write(0, new Uint8Array(8192).fill(3));
    await img.flush();
    expect(dirtyBit(f)).toBe(true);
    await img.close();
    expect(dirtyBit(f)).toBe(false);
    const dirty = trace.findIndex((e) => e.type === 'write' && e.what === 'header (dirty bit)');
    const flushAfter = trace.findIndex((e, i) => i > dirty && e.type === 'flush');
    const firstRef = trace.findIndex((e) => e.type === 'write' && /^(l1|l2 )/.test(e.what));
    expect(dirty).toBeGreaterThanOrEqual(0);
    expect(flushAfter).toBeLessThan(firstRef);
    expect(check(f).status).toBe(0);
  });

  it('a crash leaves the image dirty; a read-write open rebuilds the refcounts', async () => {
    const f = join(dir, 'crash.qcow2');
    await Image.create(f, { size: 8 << 20, lazyRefcounts: true, clusterSize: 4096 });
    const code = await main(['io', '-c', 'write -P 9 0 1M', '-c', 'flush', '-c', 'write -P 8 2M 64k', '-c', 'discard 0 64k', '-c', 'flush', '-c', 'abort', f], quiet);
    expect(code).toBe(134);
    expect(dirtyBit(f)).toBe(true);
    expect(spawnSync('qemu-img', ['check', f]).status).not.toBe(0); // stale refcounts: QEMU sees them too
    const img = await Image.open(f, { write: true });
    await img.close();
    expect(dirtyBit(f)).toBe(false);
    const c = check(f);
    expect(c.status, c.stdout).toBe(0);
    expect(qemuIo(f, ['read -P 9 64k 960k', 'read -P 8 2M 64k', 'read -P 0 0 64k'])).not.toContain('Pattern verification failed');
  });

  it('an image QEMU left dirty (killed qemu-io) is repaired by a read-write open', async () => {
    const f = join(dir, 'qemu-dirty.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=4096', f, '16M']);
    spawnSync('qemu-io', ['-c', 'write -P 0x5a 0 3M', '-c', 'write -P 0x5b 8M 100k', '-c', 'sigraise 9', f]);
    expect(dirtyBit(f)).toBe(true);
    const img = await Image.open(f, { write: true });
    await img.write(12 << 20, new Uint8Array(4096).fill(1));
    await img.close();
    expect(dirtyBit(f)).toBe(false);
    const c = check(f);
    expect(c.status, c.stdout).toBe(0);
    expect(qemuIo(f, ['read -P 0x5a 0 3M', 'read -P 0x5b 8M 100k', 'read -P 1 12M 4k'])).not.toContain('Pattern verification failed');
  });
});

describe.skipIf(!qemuAvailable)('header bits', () => {
  it('unknown autoclear bits (and the bitmaps bit) are cleared before the first write; known incompatible bits stay', async () => {
    const f = join(dir, 'autoclear.qcow2');
    await Image.create(f, { size: 1 << 20, extendedL2: true });
    const b = readFileSync(f);
    putU64(b, 88, (1n << 33n) | 1n); // unknown bit 33 and the bitmaps bit
    writeFileSync(f, b);
    const trace: TraceEvent[] = [];
    const img = await Image.open(f, { write: true, trace });
    expect(u64big(readFileSync(f), 88)).toBe(0n); // on disk before any write was asked for
    await img.write(0, new Uint8Array(512).fill(1));
    await img.close();
    const after = readFileSync(f);
    // only qledger's own journal bit, set when the journal started (QEMU clears it again on a read-write open)
    expect(u64big(after, 88)).toBe(AUTOCLEAR_JOURNAL);
    expect(u64big(after, 72)).toBe(1n << 4n); // extended L2 kept
    const first = trace.findIndex((e) => e.type === 'record' && e.record.kind === 'header');
    const firstData = trace.findIndex((e) => e.type === 'write' && e.what.startsWith('data'));
    expect(first).toBeGreaterThanOrEqual(0);
    expect(first).toBeLessThan(firstData);
    expect(check(f).status).toBe(0);
  });

  it('a zero write over whole tables is one l2s record per table (seed 001: batched L2 updates); an unmapping one keeps each entry before its reference is dropped', async () => {
    const f = join(dir, 'batched.qcow2');
    await Image.create(f, { size: 8 << 20, clusterSize: 4096 });
    const img0 = await Image.open(f, { write: true });
    await img0.write(0, new Uint8Array(6 << 20).fill(9));
    await img0.close();
    const trace: TraceEvent[] = [];
    const img = await Image.open(f, { write: true, trace });
    // 4 KiB clusters: 512 entries, 2 MiB, per table; [1 MiB, 5 MiB) touches three tables
    await img.writeZeroes(1 << 20, 4 << 20);
    const recs = trace.flatMap((e) => (e.type === 'record' && (e.record.kind === 'l2' || e.record.kind === 'l2s') ? [e.record] : []));
    expect(recs.map((r) => (r.kind === 'l2s' ? r.index.length : 1))).toEqual([256, 512, 256]);
    trace.length = 0;
    await img.writeZeroes(0, 1 << 20, { unmap: true });
    const kinds = trace.flatMap((e) => (e.type === 'record' && /^(l2|refcount)/.test(e.record.kind) ? [e.record.kind] : []));
    expect(kinds.filter((k) => k === 'l2s')).toEqual([]);
    expect(kinds.filter((k) => k === 'l2').length).toBe(256);
    // each entry's record comes before its cluster's reference is dropped
    expect(kinds[0]).toBe('l2');
    await img.close();
    expect(check(f).status).toBe(0);
    expect(qemuIo(f, ['read -P 0 0 5M', 'read -P 9 5M 1M', 'read -P 0 6M 2M'])).not.toContain('Pattern verification failed');
    expect(qemuImg(['map', '--output=json', f])).toContain('"zero": true');
  });

  it('COPIED flags are right after copy-on-write of snapshot-shared clusters (qemu-img check counts them)', async () => {
    const f = join(dir, 'copied.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, '4M']);
    qemuIo(f, ['write -P 1 0 4M']);
    qemuImg(['snapshot', '-c', 'a', f]);
    qemuImg(['snapshot', '-c', 'b', f]);
    const img = await Image.open(f, { write: true });
    await img.write(100, new Uint8Array(9000).fill(2));
    await img.writeZeroes(1 << 20, 64 << 10, { unmap: true });
    await img.discard(2 << 20, 1 << 20);
    await img.close();
    const c = check(f);
    expect(c.status, c.stdout).toBe(0);
    qemuImg(['snapshot', '-d', 'a', f]);
    qemuImg(['snapshot', '-d', 'b', f]);
    const c2 = check(f);
    expect(c2.status, c2.stdout).toBe(0);
    expect(qemuIo(f, ['read -P 2 100 9000', 'read -P 0 1M 64k', 'read -P 1 1088k 960k'])).not.toContain('Pattern verification failed');
  });
});

describe.skipIf(!qemuAvailable)('external data files', () => {
  for (const raw of [false, true]) {
    it(`create, write, zero and discard with data_file${raw ? ', data_file_raw' : ''}: qemu-img check clean, content equal to qemu-io's`, async () => {
      const d = join(dir, `df-${raw}`);
      spawnSync('mkdir', ['-p', d]);
      const opts = `data_file=${raw ? 'ours-raw.data' : 'ours.data'}${raw ? ',data_file_raw=on' : ''}`;
      const code = await main(['create', '-q', '-f', 'qcow2', '-o', opts, join(d, 'ours.qcow2'), '4M'], quiet);
      expect(code).toBe(0);
      // QEMU 7.2 resolves a relative data file name against its working directory
      spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts.replaceAll('ours', 'theirs'), 'theirs.qcow2', '4M'], { cwd: d });
      const cmds = ['write -P 5 1000 200000', 'write -z 64k 64k', 'discard 1M 1M', 'write -P 6 3M 4096'];
      expect(await main(['io', ...cmds.flatMap((c) => ['-c', c]), join(d, 'ours.qcow2')], quiet)).toBe(0);
      spawnSync('qemu-io', [...cmds.flatMap((c) => ['-c', c]), 'theirs.qcow2'], { cwd: d });
      const c = spawnSync('qemu-img', ['check', 'ours.qcow2'], { cwd: d, encoding: 'utf8' });
      expect(c.status, c.stdout + c.stderr).toBe(0);
      const cmp = spawnSync('qemu-img', ['compare', 'ours.qcow2', 'theirs.qcow2'], { cwd: d, encoding: 'utf8' });
      expect(cmp.stdout.trim(), cmp.stderr).toBe('Images are identical.');
    });
  }
});

describe.skipIf(!qemuAvailable)('zero detection (detect-zeroes=unmap, the default)', () => {
  const script = ['write -P 1 0 4M', 'write -P 0 64k 128k', 'write -P 0 1M 4k', 'write -z -u 2M 64k', 'write -P 0 3M 1M', 'discard 1536k 64k', 'write -P 0 1000 3000', 'flush'];
  for (const opts of ['cluster_size=65536', 'cluster_size=4096', 'compat=0.10,cluster_size=4096', 'extended_l2=on,cluster_size=65536']) {
    it(`zero-heavy workload, -o ${opts}: same map as QEMU with detect-zeroes=unmap, check clean`, async () => {
      const d = join(dir, `dz-${opts.replace(/[^a-z0-9]+/gi, '-')}`);
      spawnSync('mkdir', ['-p', d]);
      const ours = join(d, 'ours.qcow2');
      const theirs = join(d, 'theirs.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, ours, '4M']);
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, theirs, '4M']);
      expect(await main(['io', ...script.flatMap((c) => ['-c', c]), ours], quiet)).toBe(0);
      const q = spawnSync('qemu-io', ['--image-opts', ...script.flatMap((c) => ['-c', c]), `driver=qcow2,file.filename=${theirs},detect-zeroes=unmap,discard=unmap`], { encoding: 'utf8' });
      expect(q.status, q.stderr).toBe(0);
      expect(check(ours).status).toBe(0);
      const map = (f: string) => JSON.parse(qemuImg(['map', '--output=json', f])) as Array<Record<string, unknown>>;
      // zero and data extents agree; host offsets may differ where allocation order does
      const shape = (m: Array<Record<string, unknown>>) => m.map(({ offset: _o, ...rest }) => rest);
      expect(shape(map(ours))).toEqual(shape(map(theirs)));
      expect(spawnSync('qemu-img', ['compare', ours, theirs]).status).toBe(0);
    });
  }

  it('--detect-zeroes=off stores zeros as data, as QEMU does by default', async () => {
    const f = join(dir, 'dz-off.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '1M']);
    expect(await main(['io', '--detect-zeroes=off', '-c', 'write -P 0 0 64k', f], quiet)).toBe(0);
    const m = JSON.parse(qemuImg(['map', '--output=json', f]));
    expect(m[0]).toMatchObject({ start: 0, length: 65536, data: true, zero: false });
  });
});

describe.skipIf(!qemuAvailable)('preallocation, at create and on growth, against qemu-img', () => {
  for (const mode of ['metadata', 'falloc', 'full'] as const) {
    it(`preallocation=${mode}: same map flags per cluster and about the same disk use as QEMU`, async () => {
      const d = join(dir, `prealloc-${mode}`);
      spawnSync('mkdir', ['-p', d]);
      const ours = join(d, 'ours.qcow2');
      const theirs = join(d, 'theirs.qcow2');
      const cmds = ['write -P 3 1M 64k', `truncate -m ${mode} 20M`, 'write -P 4 19M 4k'];
      expect(await main(['create', '-q', '-f', 'qcow2', '-o', `preallocation=${mode}`, ours, '8M'], quiet)).toBe(0);
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', `preallocation=${mode}`, theirs, '8M']);
      expect(await main(['io', ...cmds.flatMap((c) => ['-c', c]), ours], quiet)).toBe(0);
      qemuIo(theirs, cmds);
      expect(check(ours).status).toBe(0);
      expect(spawnSync('qemu-img', ['compare', ours, theirs]).status).toBe(0);
      // per 64 KiB cluster: present / zero / data as qemu-img map reports them
      const flags = (f: string) => {
        const out: string[] = [];
        for (const e of JSON.parse(qemuImg(['map', '--output=json', f])) as Array<{ start: number; length: number; present: boolean; zero: boolean; data: boolean }>) {
          for (let o = e.start; o < e.start + e.length; o += 65536) out.push(`${e.present}/${e.zero}/${e.data}`);
        }
        return out;
      };
      expect(flags(ours)).toEqual(flags(theirs));
      const du = (f: string) => Number(spawnSync('du', ['-B1', f], { encoding: 'utf8' }).stdout.split('\t')[0]);
      expect(Math.abs(du(ours) - du(theirs)) / du(theirs)).toBeLessThan(0.05);
    });
  }
});

describe.skipIf(!qemuAvailable)('v2 over a backing file: the shared zero cluster', () => {
  it('zero clusters share one host cluster, found again by the next session; a single reference never remains', async () => {
    const d = join(dir, 'v2zero');
    spawnSync('mkdir', ['-p', d]);
    qemuImg(['create', '-q', '-f', 'raw', join(d, 'base.raw'), '4M']);
    qemuIo(join(d, 'base.raw'), ['write -P 9 0 4M'], ['-f', 'raw']);
    const f = join(d, 'img.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4096', '-b', 'base.raw', '-F', 'raw', f]);
    const hostOf = (guestOff: number) => {
      const m = JSON.parse(qemuImg(['map', '--output=json', f])) as Array<{ start: number; length: number; offset?: number }>;
      const e = m.find((x) => x.start <= guestOff && guestOff < x.start + x.length)!;
      return e.offset === undefined ? undefined : e.offset + (guestOff - e.start);
    };
    // session 1: two zero clusters hide the backing data through one shared cluster
    expect(await main(['io', '-c', 'write -z 0 8k', f], quiet)).toBe(0);
    const z = hostOf(0);
    expect(z).toBeDefined();
    expect(hostOf(4096)).toBe(z);
    // session 2: a single zero cluster joins it, found again instead of a new one
    expect(await main(['io', '-c', 'write -P 0 1M 4k', f], quiet)).toBe(0);
    expect(hostOf(1 << 20)).toBe(z);
    expect(check(f).status).toBe(0);
    // overwrite two of the three: the last one gets a cluster of its own, the shared one is freed
    expect(await main(['io', '-c', 'write -P 1 0 4k', '-c', 'write -P 2 1M 4k', f], quiet)).toBe(0);
    expect(hostOf(4096)).not.toBe(z);
    const c = check(f);
    expect(c.status, c.stdout).toBe(0);
    expect(qemuIo(f, ['read -P 1 0 4k', 'read -P 0 4k 4k', 'read -P 2 1M 4k', 'read -P 9 8k 4k'])).not.toContain('Pattern verification failed');
  });
});

describe('freed clusters go back to the file system', () => {
  it('after the write-back that frees them, their space is punched out of the file (native helper)', async (ctx) => {
    const { native } = await import('../src/io/native.ts');
    if (!native) {
      console.warn('native helper not built: hole punching is not tested');
      ctx.skip();
    }
    const f = join(dir, 'punch.qcow2');
    await Image.create(f, { size: 8 << 20 });
    const img = await Image.open(f, { write: true });
    await img.write(0, new Uint8Array(4 << 20).fill(7));
    await img.flush();
    const du = () => Number(spawnSync('du', ['-B1', f], { encoding: 'utf8' }).stdout.split('\t')[0]);
    const before = du();
    await img.discard(0, 4 << 20);
    await img.close();
    expect(before - du()).toBeGreaterThanOrEqual(4 << 20);
    if (qemuAvailable) expect(check(f).status).toBe(0);
  });
});

describe('compressed packing', () => {
  it('a packing cluster freed (discard, make_empty) is never packed into again, even once it holds data', async () => {
    const { MemoryDevice } = await import('../src/io/memory-device.ts');
    const { checkDevice } = await import('../src/engine/check/check.ts');
    for (const empty of [true, false]) {
      const dev = new MemoryDevice('p.qcow2');
      await Image.create(dev, { size: 1 << 20, clusterSize: 4096 });
      const img = await Image.open(dev, { write: true });
      await img.writeCompressed(0, new Uint8Array(4096));
      if (empty) await img.makeEmpty();
      else {
        await img.discard(0, 4096);
        await img.flush();
      }
      // the freed cluster is reused for data, and a later compressed write must not pack into it
      await img.write(0, new Uint8Array(4096).fill(1));
      await img.writeCompressed(4096, new Uint8Array(4096));
      const back = await img.read(0, 4096);
      await img.close();
      expect(back.every((x) => x === 1)).toBe(true);
      const r = await checkDevice(new MemoryDevice('p.qcow2', dev.snapshot(), { readOnly: true }), 'p.qcow2');
      expect(r.corruptions + r.checkErrors).toBe(0);
    }
  });
});

describe('runs longer than a refcount block covers (issue 20: create looped for ever)', () => {
  const { dir, cleanup } = tempDir('qledger-longrun-');
  afterAll(cleanup);
  const cases: ReadonlyArray<readonly [string, number]> = [
    ['cluster_size=1024', 8 * 2 ** 30],
    ['cluster_size=512', 64 * 2 ** 30],
  ];
  for (const [opts, size] of cases) {
    it(`create -o ${opts} of ${size / 2 ** 30} GiB: the L1 table needs more clusters than one refcount block counts; done in seconds, and it checks clean`, async () => {
      const f = join(dir, `${opts}.qcow2`);
      const t0 = Date.now();
      const r = await Image.create(f, { size, clusterSize: Number(opts.split('=')[1]) });
      expect(r).toContain('Formatting');
      expect(Date.now() - t0).toBeLessThan(30_000);
      if (qemuAvailable) {
        const ck = spawnSync('qemu-img', ['check', f], { encoding: 'utf8' });
        expect(ck.status, ck.stdout + ck.stderr).toBe(0);
        expect(JSON.parse(qemuImg(['info', '--output=json', f]))['virtual-size']).toBe(size);
      }
      // and the image takes writes at both ends
      const img = await Image.open(f, { write: true });
      await img.write(0, new Uint8Array(4096).fill(1));
      await img.write(size - 4096, new Uint8Array(4096).fill(2));
      await img.close();
      if (qemuAvailable) expect(spawnSync('qemu-img', ['check', f]).status).toBe(0);
    }, 60_000);
  }
});
