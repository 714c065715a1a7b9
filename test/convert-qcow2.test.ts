/**
 * qledger convert -O qcow2 against qemu-img convert -O qcow2 on the same
 * inputs: the output passes qemu-img check, reads as the input
 * (qemu-img compare), maps as qemu-img's output maps (offsets aside: data
 * and zero ranges, compressed or not) and has its header options; -n writes
 * into an existing image; refusals in qemu-img's words, nothing written.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';
import { Image } from '../src/index.ts';

const { dir, cleanup } = tempDir('qledger-convq-');
afterAll(cleanup);
const f = (n: string) => join(dir, n);
const root = new URL('..', import.meta.url).pathname;
const d = qemuAvailable ? describe : describe.skip;

/** qemu-img map --output=json without host offsets, neighbours with the same flags merged (host placement differs). */
function mapOf(p: string): Array<Record<string, unknown>> {
  const out: Array<Record<string, unknown>> = [];
  for (const e of JSON.parse(qemuImg(['map', '--output=json', p])) as Array<Record<string, unknown>>) {
    const { offset: _host, ...flags } = e;
    const last = out[out.length - 1];
    const key = (x: Record<string, unknown>) => JSON.stringify([x['depth'], x['present'], x['zero'], x['data']]);
    if (last && key(last) === key(flags) && (last['start'] as number) + (last['length'] as number) === flags['start']) last['length'] = (last['length'] as number) + (flags['length'] as number);
    else out.push(flags);
  }
  return out;
}
const infoOf = (p: string) => {
  const j = JSON.parse(qemuImg(['info', '--output=json', p]));
  return { size: j['virtual-size'], cluster: j['cluster-size'], specific: j['format-specific'] };
};

d('convert -O qcow2, as qemu-img', () => {
  qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f('in.qcow2'), '64M']);
  qemuIo(f('in.qcow2'), ['write -P 1 0 1M', 'write -z 2M 1M', 'write -P 2 10M 4k', 'write -c -P 3 20M 64k', 'write -P 4 63M 1M', 'write -P 5 30M 100']);
  qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'in.qcow2', '-F', 'qcow2', f('top.qcow2')]);
  qemuIo(f('top.qcow2'), ['write -P 6 5M 300k', 'write -z 0 64k']);
  qemuImg(['create', '-q', '-f', 'raw', f('in.raw'), '10000000']);
  qemuIo(f('in.raw'), ['write -P 7 1M 5M', 'write -P 8 9999000 1000'], ['-f', 'raw']);

  const cases: Array<[string, string[], string]> = [
    ['a qcow2 input', [], 'in.qcow2'],
    ['with 4 KiB output clusters and 64-bit refcounts', ['-o', 'cluster_size=4k,refcount_bits=64'], 'in.qcow2'],
    ['compat=0.10', ['-o', 'compat=0.10'], 'in.qcow2'],
    ['extended L2', ['-o', 'extended_l2=on,cluster_size=128k'], 'in.qcow2'],
    ['compressed', ['-c'], 'in.qcow2'],
    ['compressed, 512-byte clusters', ['-c', '-o', 'cluster_size=512'], 'in.qcow2'],
    ['compressed with zstd', ['-c', '-o', 'compression_type=zstd'], 'in.qcow2'],
    ['compressed with zstd, 4 KiB clusters, a raw input', ['-f', 'raw', '-c', '-o', 'compression_type=zstd,cluster_size=4k'], 'in.raw'],
    ['a backing chain, flattened', [], 'top.qcow2'],
    ['a raw input of an odd size', ['-f', 'raw'], 'in.raw'],
    ['a raw input, compressed', ['-f', 'raw', '-c', '-o', 'cluster_size=16k'], 'in.raw'],
    ['preallocation=metadata', ['-o', 'preallocation=metadata'], 'in.qcow2'],
  ];
  for (const [name, opts, input] of cases) {
    it(name, async () => {
      const tag = name.replace(/\W+/g, '-');
      const q = f(`${tag}-q.qcow2`);
      const l = f(`${tag}-l.qcow2`);
      qemuImg(['convert', ...opts, '-O', 'qcow2', f(input), q]);
      const r = await runCli('convert', ...opts, '-O', 'qcow2', f(input), l);
      expect(r).toEqual({ code: 0, out: '', err: '' });
      expect(spawnSync('qemu-img', ['check', l]).status).toBe(0);
      expect(spawnSync('qemu-img', ['compare', '-f', input.endsWith('raw') ? 'raw' : 'qcow2', '-F', 'qcow2', f(input), l]).status).toBe(0);
      expect(mapOf(l)).toEqual(mapOf(q));
      expect(infoOf(l)).toEqual(infoOf(q));
    });
  }

  it('-c on worker threads writes the same file as on one thread, byte for byte (deflate and zstd, a short last cluster)', async () => {
    const { convertToQcow2 } = await import('../src/engine/convert-qcow2.ts');
    for (const compressionType of ['zlib', 'zstd'] as const) {
      const files: Buffer[] = [];
      for (const compressThreads of [0, 2]) {
        const out = f(`threads-${compressionType}-${compressThreads}.qcow2`);
        const src = await Image.open(f('in.raw'), { format: 'raw' });
        await convertToQcow2(src, out, { create: { clusterSize: 16384, compressionType }, compress: true, compressThreads });
        await src.close();
        expect(spawnSync('qemu-img', ['check', out]).status).toBe(0);
        expect(spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', f('in.raw'), out]).status).toBe(0);
        files.push(readFileSync(out));
      }
      expect(files[1]!.equals(files[0]!)).toBe(true);
    }
  });

  it('the qledger program (the bundle when it is built) starts its compression workers: convert -c of a 40 MiB input', () => {
    const big = f('big.raw');
    qemuImg(['create', '-q', '-f', 'raw', big, '40M']);
    qemuIo(big, ['write -P 11 0 8M', 'write -P 12 20M 12M', 'write -P 13 39M 1M'], ['-f', 'raw']);
    for (const t of ['zlib', 'zstd']) {
      const out = f(`big-${t}.qcow2`);
      const r = spawnSync(join(root, 'tools/qledger'), ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${t}`, big, out], { encoding: 'utf8', timeout: 60_000 });
      expect({ status: r.status, stderr: r.stderr }).toEqual({ status: 0, stderr: '' });
      expect(spawnSync('qemu-img', ['check', out]).status).toBe(0);
      expect(spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', big, out]).status).toBe(0);
      expect(JSON.parse(qemuImg(['info', '--output=json', out]))['format-specific'].data['compression-type']).toBe(t);
    }
  });

  it('-n: into an existing qcow2 image, zeroes written where the input reads as zero', async () => {
    for (const t of ['q', 'l']) {
      qemuImg(['create', '-q', '-f', 'qcow2', f(`n-${t}.qcow2`), '64M']);
      qemuIo(f(`n-${t}.qcow2`), ['write -P 9 0 64M']);
    }
    qemuImg(['convert', '-n', '-O', 'qcow2', f('in.qcow2'), f('n-q.qcow2')]);
    const r = await runCli('convert', '-n', '-O', 'qcow2', f('in.qcow2'), f('n-l.qcow2'));
    expect(r.code).toBe(0);
    expect(spawnSync('qemu-img', ['compare', f('in.qcow2'), f('n-l.qcow2')]).status).toBe(0);
    expect(spawnSync('qemu-img', ['check', f('n-l.qcow2')]).status).toBe(0);
  });

  it('io write -c on a zstd image: zstd frames QEMU reads back, packed as QEMU packs them; an incompressible cluster stored plain', async () => {
    const ours = f('zstd-io-l.qcow2');
    const theirs = f('zstd-io-q.qcow2');
    for (const z of [ours, theirs]) qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd,cluster_size=4k', z, '4M']);
    const writes = ['write -c -P 9 0 64k', 'write -c -P 10 1M 4k'];
    qemuIo(theirs, writes);
    const r = await runCli('io', ...writes.flatMap((w) => ['-c', w]), ours);
    expect(r).toEqual({ code: 0, out: expect.stringContaining('wrote 4096/4096 bytes at offset 1048576') as unknown as string, err: '' });
    expect(qemuIo(ours, ['read -P 9 0 64k', 'read -P 10 1M 4k', 'read -P 0 64k 960k'])).not.toContain('verification failed');
    const checkOf = (p: string) => {
      const c = spawnSync('qemu-img', ['check', '--output=json', p], { encoding: 'utf8' });
      expect(c.status).toBe(0);
      const j = JSON.parse(c.stdout) as Record<string, unknown>;
      return { compressed: j['compressed-clusters'], allocated: j['allocated-clusters'], end: j['image-end-offset'] };
    };
    // 17 compressed clusters of one repeated byte, a few bytes each: one host cluster holds them all, in QEMU's image too
    expect(checkOf(ours)).toEqual(checkOf(theirs));
    expect(checkOf(ours).compressed).toBe(17);
    // random bytes do not shrink: that cluster is written uncompressed, as QEMU does
    const noise = new Uint8Array(4096).map(() => Math.floor(Math.random() * 256));
    const img = await Image.open(ours, { write: true });
    await img.writeCompressed(2 << 20, noise);
    await img.close();
    expect(checkOf(ours).compressed).toBe(17);
    qemuImg(['convert', '-O', 'raw', ours, f('zstd-io.raw')]);
    expect(Buffer.from(readFileSync(f('zstd-io.raw')).subarray(2 << 20, (2 << 20) + 4096)).equals(Buffer.from(noise))).toBe(true);
  });

  it("-B BACKING -F FMT (and -o backing_file): only what the input's top allocates is written, its zeroes as zeroes, as qemu-img", async () => {
    qemuImg(['create', '-q', '-f', 'qcow2', f('bb.qcow2'), '4M']);
    qemuIo(f('bb.qcow2'), ['write -P 1 0 1M']);
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'bb.qcow2', '-F', 'qcow2', f('bt.qcow2')]);
    qemuIo(f('bt.qcow2'), ['write -P 2 64k 64k', 'write -P 1 128k 64k', 'write -z 512k 8k', 'write -P 3 2M 64k', 'write -c -P 4 3M 64k']);
    qemuImg(['create', '-q', '-f', 'qcow2', f('bflat.qcow2'), '4M']);
    qemuIo(f('bflat.qcow2'), ['write -P 1 0 1M', 'write -P 2 64k 64k']);
    const cases: string[][] = [
      ['-B', 'bb.qcow2', '-F', 'qcow2', 'bt.qcow2'],
      ['-B', 'bb.qcow2', '-F', 'qcow2', 'bflat.qcow2'],
      ['-B', 'bb.qcow2', '-F', 'qcow2', '-c', 'bt.qcow2'],
      ['-o', 'backing_file=bb.qcow2,backing_fmt=qcow2,cluster_size=4096', 'bt.qcow2'],
    ];
    for (const [i, c] of cases.entries()) {
      const input = f(c.at(-1)!);
      const args = [...c.slice(0, -1), input];
      const q = f(`bq${i}.qcow2`);
      const l = f(`bl${i}.qcow2`);
      // the backing name is relative to the output, which is in the same directory
      const qr = spawnSync('qemu-img', ['convert', '-O', 'qcow2', ...args, q], { encoding: 'utf8' });
      expect(qr.status, qr.stderr).toBe(0);
      const lr = await runCli('convert', '-O', 'qcow2', ...args, l);
      expect(lr.code, lr.err).toBe(0);
      expect(mapOf(l), c.join(' ')).toEqual(mapOf(q));
      expect(spawnSync('qemu-img', ['compare', '-q', q, l]).status, c.join(' ')).toBe(0);
      expect(spawnSync('qemu-img', ['check', l]).status).toBe(0);
      expect(infoOf(l).specific).toEqual(infoOf(q).specific);
      expect(JSON.parse(qemuImg(['info', '--output=json', l]))['backing-filename']).toBe('bb.qcow2');
    }
    // qemu-img's refusals: no backing format, raw output
    for (const [args, msg] of [[['-O', 'qcow2', '-B', 'bb.qcow2'], 'Use of backing file requires explicit backing format'], [['-O', 'raw', '-B', 'bb.qcow2', '-F', 'qcow2'], "Backing file not supported for file format 'raw'"]] as const) {
      const r = await runCli('convert', ...args, f('bt.qcow2'), f('never0.qcow2'));
      expect(r).toMatchObject({ code: 1, err: `qledger: ${msg}\n` });
      expect(existsSync(f('never0.qcow2'))).toBe(false);
    }
  });

  it('refused: a bad option, a smaller -n target; nothing created', async () => {
    const o = await runCli('convert', '-O', 'qcow2', '-o', 'bogus=1', f('in.qcow2'), f('never2.qcow2'));
    expect(o.code).toBe(1);
    expect(o.err).toContain("Invalid parameter 'bogus'");
    expect(existsSync(f('never2.qcow2'))).toBe(false);
    qemuImg(['create', '-q', '-f', 'qcow2', f('small.qcow2'), '1M']);
    const s = await runCli('convert', '-n', '-O', 'qcow2', f('in.qcow2'), f('small.qcow2'));
    expect(s.code).toBe(1);
    expect(s.err).toContain('output file is smaller than input file');
  });
});
