/**
 * Internal snapshots (qledger snapshot -c/-a/-d, img.snapshots) against
 * qemu-img snapshot: the same command sequence on copies of the same image
 * gives the same exit codes and messages, the same snapshot list and info
 * (dates aside), the same guest content of the active state and of every
 * snapshot; qledger's images pass qemu-img check with no error, and images
 * either tool changed keep working in the other. Refusals leave the file
 * untouched.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';
import { Image } from '../src/index.ts';

const { dir, cleanup } = tempDir('qledger-snapshot-');
afterAll(cleanup);

const d = qemuAvailable ? describe : describe.skip;
if (!qemuAvailable) console.warn('\n*** snapshot.test.ts: qemu-img/qemu-io not found; the interop tests are SKIPPED (CI installs qemu-utils) ***\n');

/** One step: a snapshot command (both tools) or qemu-io commands (the same tool on both copies). */
type Step = readonly ['c' | 'a' | 'd', string] | readonly ['io', ...string[]] | readonly ['resize', string];

const norm = (s: string, q: string, l: string) => s.replaceAll('qemu-img', 'qledger').replaceAll(q, l);

/** Run `steps` with qemu-img on one copy and qledger on the other; exit codes and messages must agree at every step. */
async function both(src: string, steps: readonly Step[], tag: string) {
  const q = join(dir, `${tag}-q.qcow2`);
  const l = join(dir, `${tag}-l.qcow2`);
  copyFileSync(src, q);
  copyFileSync(src, l);
  for (const s of steps) {
    if (s[0] === 'io') {
      qemuIo(q, s.slice(1) as string[]);
      qemuIo(l, s.slice(1) as string[]);
      continue;
    }
    if (s[0] === 'resize') {
      qemuImg(['resize', q, s[1]]);
      qemuImg(['resize', l, s[1]]);
      continue;
    }
    const qr = spawnSync('qemu-img', ['snapshot', `-${s[0]}`, s[1], q], { encoding: 'utf8' });
    const lr = await runCli('snapshot', `-${s[0]}`, s[1], l);
    expect({ code: lr.code, out: lr.out, err: lr.err }, `step ${s.join(' ')}`).toEqual({ code: qr.status, out: qr.stdout, err: norm(qr.stderr, q, l) });
  }
  return { q, l };
}

/** qemu-img snapshot -l without the date column (the two runs are seconds apart). */
const list = (f: string) => qemuImg(['snapshot', '-l', f]).split('\n').map((line) => line.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/, 'DATE'));
const info = (f: string) => {
  const j = JSON.parse(qemuImg(['info', '--output=json', f]));
  delete j.filename;
  delete j['actual-size'];
  delete j['dirty-flag'];
  for (const s of j.snapshots ?? []) {
    delete s['date-sec'];
    delete s['date-nsec'];
  }
  return j;
};

/** Everything qemu-img says about the two results agrees, and qledger's checks clean. */
function sameResult(q: string, l: string) {
  const ck = spawnSync('qemu-img', ['check', l], { encoding: 'utf8' });
  expect(ck.status, ck.stdout + ck.stderr).toBe(0);
  expect(list(l)).toEqual(list(q));
  expect(info(l)).toEqual(info(q));
  expect(spawnSync('qemu-img', ['compare', q, l]).status).toBe(0);
  const ids = JSON.parse(qemuImg(['info', '--output=json', q])).snapshots?.map((s: { id: string }) => s.id) ?? [];
  for (const id of ids) {
    const qa = join(dir, 'snap-q.raw');
    const la = join(dir, 'snap-l.raw');
    qemuImg(['convert', '-O', 'raw', '-l', `snapshot.id=${id}`, q, qa]);
    qemuImg(['convert', '-O', 'raw', '-l', `snapshot.id=${id}`, l, la]);
    expect(readFileSync(la).equals(readFileSync(qa)), `snapshot ${id}`).toBe(true);
  }
}

const KINDS: ReadonlyArray<readonly [string, string]> = [
  ['64 KiB clusters', 'cluster_size=65536'],
  ['4 KiB clusters, compressed and zero clusters', 'cluster_size=4096'],
  ['v2 (compat=0.10), 8 KiB clusters', 'compat=0.10,cluster_size=8192'],
  ['extended L2, 32 KiB clusters', 'extended_l2=on,cluster_size=32768'],
  ['64-bit refcounts, 512-byte clusters', 'refcount_bits=64,cluster_size=512'],
  ['lazy refcounts', 'lazy_refcounts=on,cluster_size=4096'],
];

d('snapshot create, apply and delete: as qemu-img', () => {
  for (const [name, opts] of KINDS) {
    it(name, async () => {
      const base = join(dir, `base-${opts}.qcow2`);
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, base, '4M']);
      qemuIo(base, ['write -P 1 0 256k', 'write -c -P 2 1M 64k', 'write -z 2M 64k', 'write -P 3 3M 128k']);
      const { q, l } = await both(
        base,
        [
          ['c', 'first'],
          ['io', 'write -P 4 0 8k', 'write -P 5 512k 64k', 'discard 3M 64k'],
          ['c', 'second'],
          ['io', 'write -P 6 4k 4k', 'write -z 1M 64k'],
          ['c', 'first'], // names may repeat; ids do not
          ['a', 'first'], // the first named so (id 1)
          ['io', 'write -P 7 2M 4k'],
          ['d', 'second'],
          ['a', '3'], // by id
          ['d', 'first'], // the first with that name: id 1
          ['d', 'nope'],
          ['a', 'nope'],
        ],
        `seq-${opts}`,
      );
      sameResult(q, l);
    });
  }

  it('a preallocated image: every table of a tree, tables among their data, refcount blocks counted densely', async () => {
    // 4 KiB clusters, 20,000 allocated: 40 L2 tables, each before its 512 data clusters, 10 refcount blocks filled
    const base = join(dir, 'prealloc.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,preallocation=metadata', base, String(20_000 * 4096)]);
    qemuIo(base, ['write -P 9 0 64k', 'write -z 1M 8k']);
    const { q, l } = await both(
      base,
      [
        ['c', 'one'],
        ['io', 'write -P 1 8k 4k', 'write -P 2 40M 8k'],
        ['c', 'two'],
        ['a', 'one'],
        ['d', 'two'],
        ['io', 'write -P 3 60M 4k'],
        ['d', 'one'],
      ],
      'prealloc',
    );
    sameResult(q, l);
  });

  it('apply brings the snapshot\'s virtual size back (v3 grown since)', async () => {
    const base = join(dir, 'size.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);
    qemuIo(base, ['write -P 1 0 1M']);
    const { q, l } = await both(base, [['c', 'small'], ['resize', '3M'], ['io', 'write -P 2 2M 64k'], ['a', 'small']], 'size');
    sameResult(q, l);
    expect(JSON.parse(qemuImg(['info', '--output=json', l]))['virtual-size']).toBe(1 << 20);
  });

  it('every snapshot deleted: the header names no table, and nothing leaks', async () => {
    const base = join(dir, 'all.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', base, '2M']);
    qemuIo(base, ['write -P 1 0 1M']);
    const { q, l } = await both(base, [['c', 'a'], ['io', 'write -P 2 0 512k'], ['c', 'b'], ['d', 'a'], ['d', 'b']], 'all');
    sameResult(q, l);
    const h = readFileSync(l);
    expect([h.readUInt32BE(60), Number(h.readBigUInt64BE(64))]).toEqual([0, 0]);
    // only the active tree and the structures are left: the same allocation as QEMU's
    expect(qemuImg(['check', l]).split('\n')[1]).toBe(qemuImg(['check', q]).split('\n')[1]);
  });
});

d('images either tool changed keep working in the other', () => {
  it('qledger applies and deletes snapshots QEMU made; QEMU applies and deletes snapshots qledger made', async () => {
    const a = join(dir, 'mix.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', a, '2M']);
    qemuIo(a, ['write -P 1 0 1M']);
    qemuImg(['snapshot', '-c', 'q1', a]);
    qemuIo(a, ['write -P 2 0 64k']);
    expect((await runCli('snapshot', '-c', 'l1', a)).code).toBe(0);
    qemuIo(a, ['write -P 3 64k 64k']);
    qemuImg(['snapshot', '-c', 'q2', a]);
    expect((await runCli('snapshot', '-a', 'q1', a)).code).toBe(0);
    expect(qemuIo(a, ['read -P 1 0 128k'])).toMatch(/read 131072\/131072/);
    qemuImg(['snapshot', '-a', 'l1', a]);
    expect(qemuIo(a, ['read -P 2 0 64k', 'read -P 1 64k 64k'])).not.toMatch(/Pattern verification failed/);
    expect((await runCli('snapshot', '-d', 'q1', a)).code).toBe(0);
    qemuImg(['snapshot', '-d', 'l1', a]);
    expect((await runCli('snapshot', '-a', 'q2', a)).code).toBe(0);
    expect(qemuIo(a, ['read -P 2 0 64k', 'read -P 3 64k 64k', 'read -P 1 128k 896k'])).not.toMatch(/Pattern verification failed/);
    expect(spawnSync('qemu-img', ['check', a]).status).toBe(0);
    expect((await runCli('check', a)).code).toBe(0);
  });
});

d('refusals: qemu-img\'s message and exit code, the file untouched', () => {
  const cases: ReadonlyArray<readonly [string, string, string[]]> = [
    ['1-bit refcounts cannot count a second tree (QEMU leaks a cluster here; qledger writes nothing)', 'refcount_bits=1', ['-c', 'x']],
    ['apply a snapshot that is not there', 'cluster_size=65536', ['-a', 'x']],
    ['delete looks up names only, not ids', 'cluster_size=65536', ['-d', '1']],
    ['-c and -d together', 'cluster_size=65536', ['-c', 'x', '-d', 'y']],
  ];
  for (const [what, opts, args] of cases) {
    it(what, async () => {
      const f = join(dir, `refuse-${args.join('')}.qcow2`);
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, f, '1M']);
      qemuIo(f, ['write -P 1 0 64k']);
      if (args[0] === '-d') qemuImg(['snapshot', '-c', 'named', f]);
      const g = join(dir, `refuse-${args.join('')}-q.qcow2`);
      copyFileSync(f, g);
      const before = readFileSync(f);
      const lr = await runCli('snapshot', ...args, f);
      const qr = spawnSync('qemu-img', ['snapshot', ...args, g], { encoding: 'utf8' });
      expect({ code: lr.code, out: lr.out, err: lr.err }).toEqual({ code: qr.status, out: qr.stdout, err: norm(qr.stderr, g, f) });
      expect(lr.code).toBe(1);
      expect(readFileSync(f).equals(before)).toBe(true);
    });
  }

  it('an external data file: -95 (Operation not supported), as qemu-img', async () => {
    const f = join(dir, 'df.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, 'df.raw')}`, f, '1M']);
    const before = readFileSync(f);
    const lr = await runCli('snapshot', '-c', 's', f);
    expect(lr.err).toBe("qledger: Could not create snapshot 's': -95 (Operation not supported)\n");
    expect(lr.code).toBe(1);
    expect(readFileSync(f).equals(before)).toBe(true);
  });

  it('a raw image has no snapshots', async () => {
    const f = join(dir, 'r.raw');
    qemuImg(['create', '-q', '-f', 'raw', f, '1M']);
    expect((await runCli('snapshot', '-c', 's', f)).err).toBe("qledger: Could not create snapshot 's': -95 (Operation not supported)\n");
    expect((await runCli('snapshot', '-a', 's', f)).err).toBe("qledger: Could not apply snapshot 's': Block driver does not support snapshots\n");
  });
});

d('the library: img.snapshots', () => {
  it('create, apply and delete on an open image; reads follow at once; read-only opens refuse', async () => {
    const f = join(dir, 'lib.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '4M']);
    {
      await using img = await Image.open(f, { write: true });
      await img.write(0, new Uint8Array(65536).fill(1));
      const s = await img.snapshots.create('before');
      expect([s.id, s.name, s.diskSize, s.vmStateSize]).toEqual(['1', 'before', 4 << 20, 0]);
      await img.write(0, new Uint8Array(4096).fill(2));
      expect((await img.read(0, 1))[0]).toBe(2);
      await img.snapshots.apply('before');
      expect((await img.read(0, 1))[0]).toBe(1);
      expect([...img.snapshots].map((x) => x.name)).toEqual(['before']);
      expect(img.snapshots.find('1')?.name).toBe('before');
      await expect(img.snapshots.delete('nope')).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
      await img.snapshots.delete('before');
      expect(img.snapshots.length).toBe(0);
    }
    expect(spawnSync('qemu-img', ['check', f]).status).toBe(0);
    const ro = await Image.open(f);
    await expect(ro.snapshots.create('x')).rejects.toMatchObject({ code: 'E_READ_ONLY' });
    await ro.close();
  });
});

/** Patch 64-bit fields of the first snapshot table entry of `f` (entry layout of the qcow2 spec). */
function patchSnapshot(f: string, fields: { vmClockNsec?: bigint; vmStateSizeLarge?: bigint; diskSize?: bigint; icount?: bigint }): void {
  const b = readFileSync(f);
  const at = Number(b.readBigUInt64BE(64)); // snapshots_offset
  if (fields.vmClockNsec !== undefined) b.writeBigUInt64BE(fields.vmClockNsec, at + 24);
  if (fields.vmStateSizeLarge !== undefined) b.writeBigUInt64BE(fields.vmStateSizeLarge, at + 40);
  if (fields.diskSize !== undefined) b.writeBigUInt64BE(fields.diskSize, at + 48);
  if (fields.icount !== undefined) b.writeBigUInt64BE(fields.icount, at + 56);
  writeFileSync(f, b);
}

d('64-bit snapshot fields, exactly (issue 20, item 2)', () => {
  it('info and snapshot -l print VM clock, VM state size and icount past 2^53 as qemu-img does; a table rewritten for a new snapshot keeps them', async () => {
    const f = join(dir, 'big-fields.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '1M']);
    qemuImg(['snapshot', '-c', 's1', f]);
    patchSnapshot(f, { vmClockNsec: 2n ** 60n + 1n, vmStateSizeLarge: 2n ** 62n + 3n, icount: 2n ** 63n + 7n });
    const same = async (args: string[]) => {
      const r = await runCli(...args, f);
      expect(r.out).toBe(qemuImg([...args, f]));
      return r.out;
    };
    const j = await same(['info', '--output=json']);
    expect(j).toContain('"icount": -9223372036854775801'); // int64, as QEMU prints it
    expect(j).toContain('"vm-clock-nsec": 606846977'); // (2^60 + 1) mod 10^9: rounded, it ends in 6
    expect(j).toContain('"vm-state-size": 4611686018427387907');
    await same(['info']);
    await same(['snapshot', '-l']);
    expect((await runCli('snapshot', '-c', 's2', f)).code).toBe(0);
    const after = qemuImg(['info', '--output=json', f]);
    expect(after).toContain('"icount": -9223372036854775801');
    expect(after).toContain('"vm-clock-nsec": 606846977');
    expect(after).toContain('"vm-state-size": 4611686018427387907');
  });

  it("apply judges the snapshot's disk size exactly, first: refusals in qemu-img's words with nothing written; a size whose L1 table is larger grows it", async () => {
    for (const [size, tag] of [[2n ** 60n + 1n, 'odd'], [2n ** 52n, 'huge'], [2n ** 51n, 'grow'], [1n << 19n, 'shrink']] as const) {
      const src = join(dir, `apply-size-${tag}.qcow2`);
      qemuImg(['create', '-q', '-f', 'qcow2', src, '1M']);
      qemuIo(src, ['write -P 3 0 1M']);
      qemuImg(['snapshot', '-c', 's1', src]);
      patchSnapshot(src, { diskSize: size });
      const before = readFileSync(src);
      const { q, l } = await both(src, [['a', 's1']], `apply-size-${tag}`);
      if (tag === 'odd' || tag === 'huge') expect(readFileSync(l).equals(before)).toBe(true);
      else {
        expect(spawnSync('qemu-img', ['check', l]).status).toBe(0);
        expect(spawnSync('qemu-img', ['compare', q, l], { encoding: 'utf8' }).stdout.trim()).toBe('Images are identical.');
      }
    }
  });
});
