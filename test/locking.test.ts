/**
 * Image locking against the real tools, both directions: while qemu-io or
 * qemu-nbd holds an image, qledger refuses it in qemu-img's and qemu-io's
 * words (and -U reads it anyway); while qledger holds one, qemu-img,
 * qemu-io and qemu-nbd refuse it; two read-write opens in one process are
 * refused too. Cross-process locks need the native helper: in CI its
 * absence fails the run, locally these tests skip with a banner.
 */

import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';
import { Image } from '../src/index.ts';
import { native } from '../src/io/native.ts';

const ofd = native?.ofdLock !== undefined;
if (!ofd) {
  if (process.env['QLEDGER_REQUIRE_QEMU']) throw new Error('the native helper (OFD locks) was not built, but QLEDGER_REQUIRE_QEMU is set: run `npm install` with a C compiler');
  console.warn('\n' + '!'.repeat(72) + '\n!!! native helper NOT BUILT: cross-process locking tests are SKIPPED.\n' + '!'.repeat(72) + '\n');
}

const t = tempDir('qledger-lock-');
afterAll(() => t.cleanup());

/** qemu-io holding `file` open (interactive, commands on stdin) until stopped. */
async function qemuIoHolding(file: string, extra: string[] = []): Promise<{ stop: () => Promise<void> }> {
  const p = spawn('qemu-io', [...extra, file], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  await new Promise<void>((resolve, reject) => {
    p.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('read 512/512')) resolve();
    });
    p.on('exit', (code) => reject(new Error(`qemu-io exited (${code}) before holding the image: ${out}`)));
    p.stdin!.write('read 0 512\n');
  });
  return { stop: () => stopChild(p, () => p.stdin!.end('quit\n')) };
}

function stopChild(p: ChildProcess, ask: () => void): Promise<void> {
  return new Promise((resolve) => {
    if (p.exitCode !== null) return resolve();
    p.on('exit', () => resolve());
    ask();
  });
}

const qemu = (cmd: string, args: string[]) => spawnSync(cmd, args, { encoding: 'utf8' });
/** qemu's message as qledger words it: the same text after the program name. */
const asOurs = (s: string) => s.replace(/^qemu-(img|io): /gm, 'qledger: ');

describe.skipIf(!qemuAvailable || !ofd)('image locks shared with QEMU', () => {
  let f: string;
  beforeAll(() => {
    f = join(t.dir, 'img.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '1M']);
  });

  it('while qemu-io writes an image: qledger refuses it in the same words, -U reads it', async () => {
    const h = await qemuIoHolding(f);
    try {
      for (const [args, tool] of [
        [['info', f], 'qemu-img'],
        [['check', f], 'qemu-img'],
        [['map', f], 'qemu-img'],
        [['io', '-c', 'write 0 4k', f], 'qemu-io'],
        [['io', '-c', 'read 0 4k', f], 'qemu-io'],
        [['io', '-r', '-c', 'read 0 4k', f], 'qemu-io'],
      ] as const) {
        const ours = await runCli(...args);
        const theirs = qemu(tool, tool === 'qemu-io' ? args.slice(1) : [...args]);
        expect(theirs.status, theirs.stderr).toBe(1);
        expect({ code: ours.code, err: ours.err }, args.join(' ')).toEqual({ code: 1, err: asOurs(theirs.stderr) });
      }
      const u = await runCli('info', '-U', f);
      expect(u.code).toBe(0);
      expect(u.out).toContain('file format: qcow2');
      expect((await runCli('io', '-U', '-c', 'write 0 4k', f)).err).toContain('force-share=on can only be used with read-only images');
      await expect(Image.open(f, { write: true })).rejects.toMatchObject({ code: 'E_LOCKED', data: { permission: 'write', shared: false } });
      await expect(Image.open(f)).rejects.toMatchObject({ code: 'E_LOCKED', data: { permission: 'write', shared: true } });
      await (await Image.open(f, { forceShare: true })).close();
    } finally {
      await h.stop();
    }
    // released with the process: now it opens
    await (await Image.open(f, { write: true })).close();
  });

  it('while qledger writes an image: qemu-io, qemu-img and qemu-nbd refuse it; a second read-write open in this process too', async () => {
    const img = await Image.open(f, { write: true });
    try {
      const w = qemu('qemu-io', ['-c', 'write 0 4k', f]);
      expect(w.status).toBe(1);
      expect(w.stderr).toBe(`qemu-io: can't open device ${f}: Failed to get "write" lock\nIs another process using the image [${f}]?\n`);
      const i = qemu('qemu-img', ['info', f]);
      expect(i.status).toBe(1);
      expect(i.stderr).toContain('Failed to get shared "write" lock');
      expect(qemu('qemu-img', ['info', '-U', f]).status).toBe(0);
      const n = qemu('qemu-nbd', ['-f', 'qcow2', '-k', join(t.dir, 'nbd.sock'), f]);
      expect(n.status).not.toBe(0);
      expect(n.stderr).toContain('Failed to get "write" lock');
      await expect(Image.open(f, { write: true })).rejects.toMatchObject({ code: 'E_LOCKED' });
      await expect(Image.open(f)).rejects.toMatchObject({ code: 'E_LOCKED' });
      await img.write(0, new Uint8Array(4096).fill(7));
    } finally {
      await img.close();
    }
    const after = qemu('qemu-io', ['-c', 'read -P 7 0 4k', f]);
    expect(after.status).toBe(0);
    expect(after.stdout).not.toContain('Pattern verification failed');
  });

  it('while qledger reads an image: readers may share it, writers are refused', async () => {
    const img = await Image.open(f);
    try {
      expect(qemu('qemu-img', ['info', f]).status).toBe(0);
      const w = qemu('qemu-io', ['-c', 'write 0 4k', f]);
      expect(w.status).toBe(1);
      expect(w.stderr).toContain('Failed to get "write" lock');
      await (await Image.open(f)).close(); // two readers in one process
      await expect(Image.open(f, { write: true })).rejects.toMatchObject({ code: 'E_LOCKED', data: { permission: 'write', shared: false } });
    } finally {
      await img.close();
    }
  });

  it('while qemu-nbd serves an image, qledger refuses to write it and a locked file is never truncated by create', async () => {
    const sock = join(t.dir, 'serve.sock');
    const n = spawn('qemu-nbd', ['-f', 'qcow2', '-k', sock, f], { stdio: 'ignore' });
    try {
      for (let i = 0; i < 100 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 20));
      expect(existsSync(sock)).toBe(true);
      const ours = await runCli('io', '-c', 'write 0 4k', f);
      expect(ours.code).toBe(1);
      expect(ours.err).toContain('Failed to get "write" lock');
      const before = readFileSync(f);
      const c = await runCli('create', '-f', 'qcow2', f, '2M');
      expect(c.code).toBe(1);
      expect(c.err).toContain('Failed to get "write" lock');
      expect(readFileSync(f).equals(before)).toBe(true);
    } finally {
      await stopChild(n, () => n.kill('SIGTERM'));
    }
  });
});

describe.skipIf(!qemuAvailable)('image locks within one process, without the native helper', () => {
  it('a second read-write open is refused, readers share, and closing releases', () => {
    const f = join(t.dir, 'nonative.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '1M']);
    const script = `
      import { Image } from ${JSON.stringify(join(process.cwd(), 'src/index.ts'))};
      const f = ${JSON.stringify(f)};
      const out = [];
      const w = await Image.open(f, { write: true });
      out.push(await Image.open(f, { write: true }).then(() => 'opened', (e) => e.code));
      out.push(await Image.open(f).then(() => 'opened', (e) => e.code));
      await w.close();
      const r1 = await Image.open(f);
      const r2 = await Image.open(f);
      out.push('readers');
      out.push(await Image.open(f, { write: true }).then(() => 'opened', (e) => e.code));
      await r1.close(); await r2.close();
      const w2 = await Image.open(f, { write: true });
      out.push('reopened');
      await w2.close();
      console.log(JSON.stringify(out));
    `;
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { encoding: 'utf8', env: { ...process.env, QLEDGER_NO_NATIVE: '1' } });
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout)).toEqual(['E_LOCKED', 'E_LOCKED', 'readers', 'E_LOCKED', 'reopened']);
  });
});
