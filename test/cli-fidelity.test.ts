/**
 * qemu-img's command-line conventions where scripts depend on them, each
 * against the real tool: help per subcommand, the version, an unknown
 * command, check on an image format without checks, and output into a
 * pipe whose reader went away.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runCli } from './helpers/cli.ts';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { VERSION } from '../src/version.ts';

const t = tempDir();
afterAll(() => t.cleanup());
const root = new URL('..', import.meta.url).pathname;

function qemu(args: string[]): number | null {
  return spawnSync('qemu-img', args, { encoding: 'utf8' }).status;
}

describe('qemu-img conventions', () => {
  it('-h and --help of each subcommand print its usage and exit 0, as qemu-img does', async () => {
    for (const cmd of ['check', 'info', 'map', 'convert', 'create', 'compare', 'snapshot', 'io']) {
      for (const flag of ['-h', '--help']) {
        const r = await runCli(cmd, flag);
        expect(r.code, `${cmd} ${flag}`).toBe(0);
        expect(r.out).toMatch(new RegExp(`^usage: qledger ${cmd}\\b`));
      }
    }
    if (qemuAvailable) expect(qemu(['check', '--help'])).toBe(0);
  });

  it('--version and -V print the version and exit 0; it is package.json\'s', async () => {
    for (const flag of ['--version', '-V']) {
      const r = await runCli(flag);
      expect(r.code).toBe(0);
      expect(r.out).toBe(`qledger version ${VERSION}\n`);
    }
    expect(JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).version).toBe(VERSION);
  });

  it("an unknown command says so in qemu-img's words, suggests the nearest, exit 1", async () => {
    const r = await runCli('chek', 'x.qcow2');
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/^qledger: Command not found: chek\nTry 'qledger --help' for more information\n/);
    expect(r.err).toMatch(/did you mean 'check'\?/);
    if (qemuAvailable) expect(qemu(['chek', 'x.qcow2'])).toBe(1);
  });

  it('check of a raw image: "does not support checks", exit 63, probed or with -f raw', async () => {
    const raw = join(t.dir, 'plain.raw');
    writeFileSync(raw, new Uint8Array(1 << 20).fill(9));
    for (const args of [[raw], ['-f', 'raw', raw]]) {
      const r = await runCli('check', ...args);
      expect(r.code).toBe(63);
      expect(r.err).toBe('qledger: This image format does not support checks\n');
      if (qemuAvailable) expect(qemu(['check', ...args])).toBe(63);
    }
  });

  it.skipIf(!qemuAvailable)('output into a pipe whose reader went away ends quietly with exit 0, as qemu-io', () => {
    const img = join(t.dir, 'pipe.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
    qemuIo(img, ['write -P 1 0 1M']);
    for (const tool of [`${join(root, 'tools/qledger')} io`, 'qemu-io']) {
      const r = spawnSync('bash', ['-c', `${tool} -c 'read -v 0 1M' ${img} | head -1; echo "status \${PIPESTATUS[0]}"`], { encoding: 'utf8' });
      expect(r.stdout, tool).toMatch(/^00000000: {2}01 01 01 01/);
      expect(r.stdout, tool).toMatch(/status 0\n$/);
      expect(r.stderr, tool).toBe('');
    }
  });
});
