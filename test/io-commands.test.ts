/**
 * qemu-io's command language, against the real qemu-io: the same script
 * (as -c commands, and as lines on standard input) on copies of one image
 * gives the same output lines (timings aside), the same exit status and
 * images qemu-img compare calls identical.
 */

import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { copyFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, tempDir } from './helpers/qemu.ts';
import { main } from '../src/cli/main.ts';
import { cvtstr, fixed3 } from '../src/cli/io-format.ts';

async function ours(argv: string[], input?: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const lines = input && (async function* () {
    yield* input;
  });
  const code = await main(argv, { out: (s) => void (out += s), err: (s) => void (err += s), ...(lines ? { lines } : {}) });
  return { code, out, err };
}

/** The timings are the only thing allowed to differ. */
const untimed = (s: string) =>
  s
    .replace(/^(.*), 1 ops; \d\d\.\d\d sec \(.* ops\/sec\)$/gm, '$1, 1 ops; T')
    .replace(/^(\d+),1,\d+:\d\d:\d\d\.\d\d,[\d.]+,[\d.]+$/gm, '$1,1,T');

describe('qemu-io number printing', () => {
  it('rounds "%.3f" ties to even as printf does, elsewhere to nearest', () => {
    expect(fixed3(1.0625)).toBe('1.062');
    expect(fixed3(1.1875)).toBe('1.188');
    expect(fixed3(2.5)).toBe('2.500');
    expect(fixed3(0.0005)).toBe('0.001'); // 0.0005 is not exact in binary: above the tie
    expect(fixed3(1.0626)).toBe('1.063');
    expect(cvtstr(1088 * 1024)).toBe('1.062 MiB');
    expect(cvtstr(4096)).toBe('4 KiB');
  });
});

describe.skipIf(!qemuAvailable)('qemu-io commands against qemu-io', () => {
  const t = tempDir('qledger-iocmd-');
  let base: string;
  let src: string;
  beforeAll(() => {
    base = join(t.dir, 'base.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', base, '4M']);
    src = join(t.dir, 'source.bin');
    writeFileSync(src, Buffer.from('qledger data from a file\n'));
  });
  afterAll(() => t.cleanup());

  const script = () => [
    'write -P 5 0 64k',
    'writev -P 6 64k 4k 4k',
    'readv -P 6 64k 4k 4k',
    'readv -P 7 64k 4k 4k',
    'read -P 5 -s 512 -l 1k 0 4k',
    'read -P 7 -s 0 -l 512 0 4k',
    'read -P 5 -s 4000 -l 200 0 4k',
    `write -s ${src} 128k 100`,
    'read -v 128k 32',
    'write -C -P 8 160k 4k',
    'aio_write -P 9 192k 4k',
    'aio_flush',
    'aio_read -P 9 192k 4k',
    'write -f -P 3 256k 4k',
    // the same pattern and length again (qledger reuses the buffer), another pattern, a compressed one
    'write -P 5 320k 64k',
    'write -P 6 384k 64k',
    'write -c -P 5 448k 64k',
    'write -P 5 512k 64k',
    'read -P 5 320k 64k',
    'read -P 6 384k 64k',
    'read -P 5 448k 64k',
    'read -P 5 512k 64k',
    'write -P 1 2M 1088k',
    'map',
    'alloc 0 1M',
    'length',
    'nonsense',
    'sleep',
    'sleep 1',
    'close',
    'read 0 1',
    `open -r ${'IMG'}`,
    'read -P 5 0 4k',
    'quit',
    'read 0 1',
  ];

  it('-c commands: same output, status and image', async () => {
    const a = join(t.dir, 'ours.qcow2');
    const b = join(t.dir, 'theirs.qcow2');
    copyFileSync(base, a);
    copyFileSync(base, b);
    const r = await ours(['io', ...script().flatMap((c) => ['-c', c.replace('IMG', a)]), a]);
    const q = spawnSync('qemu-io', [...script().flatMap((c) => ['-c', c.replace('IMG', b)]), b], { encoding: 'utf8' });
    expect(untimed(r.out)).toBe(untimed(q.stdout));
    expect(r.err.replace(/^qledger: /gm, '')).toBe(q.stderr.replace(/^qemu-io: /gm, ''));
    expect(r.code).toBe(q.status);
    expect(r.out).toMatch(/^4096,1,\d+:\d\d:\d\d\.\d\d,[\d.]+,[\d.]+$/m);
    const cmp = spawnSync('qemu-img', ['compare', a, b], { encoding: 'utf8' });
    expect(cmp.stdout.trim(), cmp.stderr).toBe('Images are identical.');
  });

  it('commands on standard input, after the prompt: same output and status', async () => {
    const a = join(t.dir, 'ours-stdin.qcow2');
    const b = join(t.dir, 'theirs-stdin.qcow2');
    copyFileSync(base, a);
    copyFileSync(base, b);
    const lines = ['write -P 4 0 4k', 'read -P 4 0 4k', 'read -P 9 0 4k', 'length'];
    const r = await ours(['io', a], lines);
    const q = spawnSync('qemu-io', [b], { encoding: 'utf8', input: lines.join('\n') + '\n' });
    expect(untimed(r.out)).toBe(untimed(q.stdout));
    expect(r.code).toBe(q.status);
    expect(spawnSync('qemu-img', ['compare', a, b], { encoding: 'utf8' }).status).toBe(0);
  });

  it('help lists each command in qemu-io words; cache and aio modes are taken, bad ones refused alike', async () => {
    const a = join(t.dir, 'help.qcow2');
    copyFileSync(base, a);
    const r = await ours(['io', '-c', 'help', a]);
    const q = spawnSync('qemu-io', ['-c', 'help', a], { encoding: 'utf8' });
    const theirs = new Set(q.stdout.split('\n'));
    for (const line of r.out.trim().split('\n')) expect(theirs.has(line), line).toBe(true);
    for (const [opt, v] of [['-t', 'writethrough'], ['--cache', 'unsafe'], ['-t', 'none'], ['--aio', 'threads'], ['-i', 'native']]) {
      const o = await ours(['io', opt!, v!, '-c', 'write -q -P 2 0 4k', '-c', 'flush', a]);
      expect(o.code, `${opt} ${v}: ${o.err}`).toBe(0);
    }
    for (const [opt, word] of [['-t', 'cache'], ['--aio', 'aio']]) {
      const o = await ours(['io', opt!, 'bogus', '-c', 'read 0 1', a]);
      const qq = spawnSync('qemu-io', [opt!, 'bogus', '-c', 'read 0 1', a], { encoding: 'utf8' });
      expect(o.code).toBe(qq.status);
      expect(o.err).toBe(`qledger: Invalid ${word} option: bogus\n`);
      expect(qq.stderr).toBe(`qemu-io: Invalid ${word} option: bogus\n`);
    }
    const sig = await ours(['io', '-c', 'write -q 0 4k', '-c', 'sigraise 15', a]);
    const qs = spawnSync('qemu-io', ['-c', 'sigraise 15', a]);
    expect(qs.signal).toBe('SIGTERM');
    expect(sig.code).toBe(128 + 15); // what a shell reports for a process killed by SIGTERM
  });
});
