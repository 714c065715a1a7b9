/**
 * qledger convert -O qcow2 against qemu-img convert -O qcow2 on the same
 * inputs: the output passes qemu-img check, reads as the input
 * (qemu-img compare), maps as qemu-img's output maps (offsets aside: data
 * and zero ranges, compressed or not) and has its header options; -n writes
 * into an existing image; refusals in qemu-img's words, nothing written.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';

const { dir, cleanup } = tempDir('qledger-convq-');
afterAll(cleanup);
const f = (n: string) => join(dir, n);
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

  it('refused: an output backing file, a bad option, a smaller -n target; nothing created', async () => {
    const b = await runCli('convert', '-O', 'qcow2', '-B', 'in.qcow2', f('top.qcow2'), f('never1.qcow2'));
    expect(b.code).toBe(1);
    expect(b.err).toMatch(/output backing file/);
    const o = await runCli('convert', '-O', 'qcow2', '-o', 'bogus=1', f('in.qcow2'), f('never2.qcow2'));
    expect(o.code).toBe(1);
    expect(o.err).toContain("Invalid parameter 'bogus'");
    for (const n of ['never1.qcow2', 'never2.qcow2']) expect(existsSync(f(n))).toBe(false);
    qemuImg(['create', '-q', '-f', 'qcow2', f('small.qcow2'), '1M']);
    const s = await runCli('convert', '-n', '-O', 'qcow2', f('in.qcow2'), f('small.qcow2'));
    expect(s.code).toBe(1);
    expect(s.err).toContain('output file is smaller than input file');
  });
});
