/**
 * qledger dd against qemu-img dd: the same operands give the same output
 * file (byte for byte for raw output, the same guest content and map for
 * qcow2), the same messages and exit codes.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';

const { dir, cleanup } = tempDir('qledger-dd-');
afterAll(cleanup);
const f = (n: string) => join(dir, n);
const d = qemuAvailable ? describe : describe.skip;

d('dd, as qemu-img', () => {
  qemuImg(['create', '-q', '-f', 'qcow2', f('in.qcow2'), '16M']);
  qemuIo(f('in.qcow2'), ['write -P 1 0 1M', 'write -z 2M 1M', 'write -P 2 5000 3000', 'write -c -P 3 8M 64k', 'write -P 4 15M 1M']);
  const cases: string[][] = [
    ['bs=1M', 'count=3'],
    ['-O', 'qcow2', 'bs=64k', 'skip=16', 'count=40'],
    ['bs=1M', 'skip=12', 'count=2000'],
    ['bs=1.5k', 'count=2'],
    ['bs=1000', 'count=3'],
    ['bs=1M', 'count=0'],
    ['bs=4k', 'count=1', 'skip=0x10'],
    ['bs=3k', 'skip=1'],
    [],
  ];
  for (const ops of cases) {
    it(ops.join(' ') || '(defaults)', async () => {
      const q = f(`q-${ops.join('-')}`);
      const l = f(`l-${ops.join('-')}`);
      const qr = spawnSync('qemu-img', ['dd', ...ops, `if=${f('in.qcow2')}`, `of=${q}`], { encoding: 'utf8' });
      const lr = await runCli('dd', ...ops, `if=${f('in.qcow2')}`, `of=${l}`);
      expect({ code: lr.code, out: lr.out, err: lr.err.replace(/^qledger:/gm, 'qemu-img:') }).toEqual({ code: qr.status, out: qr.stdout, err: qr.stderr });
      if (ops.includes('qcow2')) {
        expect(spawnSync('qemu-img', ['compare', q, l]).status).toBe(0);
        expect(spawnSync('qemu-img', ['check', l]).status).toBe(0);
        expect(qemuImg(['map', '--output=json', l]).replace(/, "offset": \d+/g, '')).toBe(qemuImg(['map', '--output=json', q]).replace(/, "offset": \d+/g, ''));
      } else expect(readFileSync(l).equals(readFileSync(q))).toBe(true);
    });
  }
  const refused: string[][] = [['of=x'], ['bs=0'], ['bs=abc'], ['count=-1'], ['skip=x'], ['foo=1'], ['-O', 'foo']];
  for (const ops of refused) {
    it(`refused: ${ops.join(' ')}`, async () => {
      const base = ops[0] === 'of=x' ? [`if=${f('in.qcow2')}`] : [`if=${f('in.qcow2')}`, `of=${f('never')}`];
      const args = ops[0] === 'of=x' ? base : [...ops, ...base];
      const qr = spawnSync('qemu-img', ['dd', ...args], { encoding: 'utf8' });
      const lr = await runCli('dd', ...args);
      expect({ code: lr.code, err: lr.err.replace(/^qledger:/gm, 'qemu-img:') }).toEqual({ code: qr.status, err: qr.stderr });
      expect(lr.code).toBe(1);
      if (ops[0] !== '-O') expect(existsSync(f('never'))).toBe(false);
    });
  }
});
