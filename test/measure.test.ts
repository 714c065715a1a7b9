/**
 * qledger measure against qemu-img measure: the same arguments give the same
 * lines (human and JSON), the same exit code and the same messages, for
 * sizes, for inputs QEMU wrote (data, zero and compressed clusters, backing
 * chains, snapshots, persistent bitmaps, sparse raw files, preallocated
 * metadata) and for the output options (cluster size, refcount width,
 * extended L2, compat, preallocation, backing file), and for random images
 * (property: seed and path printed on failure).
 */

import { describe, it, expect, afterAll } from 'vitest';
import fc from 'fast-check';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';

const { dir, cleanup } = tempDir('qledger-measure-');
afterAll(cleanup);
const runs = Number(process.env['QLEDGER_PROPERTY_RUNS'] ?? 15);

async function same(args: string[]): Promise<{ code: number; out: string }> {
  const q = spawnSync('qemu-img', ['measure', ...args], { encoding: 'utf8', cwd: dir });
  const l = await runCli('measure', ...args);
  expect({ code: l.code, out: l.out, err: l.err.replaceAll('qledger', 'qemu-img') }, `measure ${args.join(' ')}`).toEqual({ code: q.status, out: q.stdout, err: q.stderr });
  return l;
}

const d = qemuAvailable ? describe : describe.skip;

d('measure, as qemu-img', () => {
  const f = (n: string) => join(dir, n);
  qemuImg(['create', '-q', '-f', 'qcow2', f('a.qcow2'), '1G']);
  qemuIo(f('a.qcow2'), ['write 0 1M', 'write -z 2M 1M', 'write 100M 4k', 'write -c 200M 64k', 'write 1023M 1M']);
  qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', f('top.qcow2')]);
  qemuIo(f('top.qcow2'), ['write 500M 300k', 'write -z 0 64k']);
  qemuImg(['snapshot', '-c', 'snap', f('a.qcow2')]);
  qemuIo(f('a.qcow2'), ['write 300M 2M', 'discard 0 1M']);
  qemuImg(['create', '-q', '-f', 'qcow2', f('bm.qcow2'), '8G']);
  qemuImg(['bitmap', '--add', f('bm.qcow2'), 'b0']);
  qemuImg(['bitmap', '--add', '-g', '512k', f('bm.qcow2'), 'a-longer-bitmap-name']);
  qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', f('pre.qcow2'), '256M']);
  qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', f('v2.qcow2'), '64M']);
  qemuIo(f('v2.qcow2'), ['write 1M 3M']);
  qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', f('ext.qcow2'), '64M']);
  qemuIo(f('ext.qcow2'), ['write 4k 4k', 'write 10M 1M']);
  qemuImg(['create', '-q', '-f', 'raw', f('sparse.raw'), '100M']);
  qemuIo(f('sparse.raw'), ['write 10M 5M', 'write 99M 1000'], ['-f', 'raw']);

  const cases: string[][] = [
    ['--size', '1G'],
    ['-O', 'qcow2', '--size', '1G'],
    ['-O', 'qcow2', '--size', '1000'],
    ['-O', 'raw', '--size', '1000'],
    ['-O', 'qcow2', '-o', 'cluster_size=4k,refcount_bits=64', '--size', '3T'],
    ['-O', 'qcow2', '-o', 'cluster_size=2M,refcount_bits=1', '--size', '100T'],
    ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', '--size', '5G'],
    ['-O', 'qcow2', '-o', 'preallocation=falloc', '--size', '10G'],
    ['-O', 'qcow2', '--output=json', '--size', '7G'],
    ['-O', 'qcow2', f('a.qcow2')],
    ['-O', 'qcow2', '--output=json', f('a.qcow2')],
    ['-O', 'qcow2', '-l', 'snap', f('a.qcow2')],
    ['-O', 'qcow2', f('top.qcow2')],
    ['-O', 'qcow2', '-o', 'backing_file=a.qcow2', f('top.qcow2')],
    ['-O', 'qcow2', '-o', 'cluster_size=4k', f('top.qcow2')],
    ['-O', 'qcow2', f('bm.qcow2')],
    ['-O', 'qcow2', '--output=json', '-o', 'cluster_size=512', f('bm.qcow2')],
    ['-O', 'qcow2', '-o', 'compat=0.10', f('bm.qcow2')],
    ['-O', 'qcow2', f('pre.qcow2')],
    ['-O', 'qcow2', f('v2.qcow2')],
    ['-O', 'qcow2', f('ext.qcow2')],
    ['-O', 'qcow2', '-f', 'raw', f('sparse.raw')],
    ['-O', 'raw', '-f', 'raw', f('sparse.raw')],
    ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-f', 'raw', f('sparse.raw')],
    ['-O', 'qcow2', `json:{"driver":"qcow2","file":{"driver":"file","filename":"${f('a.qcow2')}"}}`],
  ];
  for (const args of cases) {
    it(args.map((a) => a.replace(dir + '/', '')).join(' '), async () => {
      const r = await same(args);
      expect(r.code).toBe(0);
    });
  }

  const refused: string[][] = [
    [],
    ['-O', 'qcow2', '--size', '1G', f('a.qcow2')],
    ['-O', 'qcow2', '--size', 'abc'],
    ['-O', 'qcow2', '--size', '1G', '-l', 'x'],
    ['-O', 'qcow2', '-o', 'cluster_size=1000', '--size', '1G'],
    ['-O', 'qcow2', '-o', 'compat=0.9', '--size', '1G'],
    ['-O', 'qcow2', '-o', 'refcount_bits=3', '--size', '1G'],
    ['-O', 'qcow2', '-o', 'compat=0.10,refcount_bits=8', '--size', '1G'],
    ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=4k', '--size', '1G'],
    ['-O', 'qcow2', '-o', 'preallocation=bogus', '--size', '1G'],
    ['-O', 'qcow2', '-o', 'lazy_refcounts=maybe', '--size', '1G'],
    ['-O', 'qcow2', '-o', 'bogus=1', '--size', '1G'],
    ['-O', 'qcow2', '-o', 'cluster_size=512', '--size', '64T'],
    ['-O', 'foo', '--size', '1G'],
    ['-O', 'qcow2', '--output=xml', '--size', '1G'],
  ];
  for (const args of refused) {
    it(`refused: ${args.join(' ') || '(no arguments)'}`, async () => {
      const r = await same(args);
      expect(r.code).toBe(1);
    });
  }

  it('random images: the same required and fully allocated sizes (property)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(512, 4096, 65536, 2 ** 21),
        fc.constantFrom(4096, 65536, 1 << 20),
        fc.array(fc.tuple(fc.integer({ min: 0, max: (64 << 20) - 1 }), fc.integer({ min: 1, max: 3 << 20 }), fc.constantFrom('write', 'write -z', 'write -c')), { maxLength: 12 }),
        async (inCluster, outCluster, writes) => {
          const img = f(`p-${inCluster}.qcow2`);
          qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${inCluster}`, img, '64M']);
          const cmds = writes.map(([o, l, w]) => {
            const off = w === 'write -c' ? Math.floor(o / inCluster) * inCluster : o;
            const len = w === 'write -c' ? inCluster : Math.min(l, (64 << 20) - off);
            return `${w} ${off} ${len}`;
          });
          // a compressed write onto a cluster that has data fails in qemu-io, and the others go on
          if (cmds.length) spawnSync('qemu-io', [...cmds.flatMap((c) => ['-c', c]), img]);
          await same(['-O', 'qcow2', '-o', `cluster_size=${outCluster}`, '--output=json', img]);
        },
      ),
      { numRuns: runs },
    );
  });
});
