/**
 * The untrusted-image policy (issue 20, item 6): `trusted: false` and
 * `--untrusted` refuse, in one line naming the reference and the reason,
 * and before anything is opened or written: a backing or data file outside
 * the allowed directory (symbolic links followed), a name with a protocol or
 * a json: one, a backing file that names no format (never probed), a chain
 * deeper than 16, tables larger than 256 MiB. Trusted opens are unchanged.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../src/index.ts';
import { checkMetadataSize, UNTRUSTED_MAX_METADATA } from '../src/engine/untrusted.ts';
import type { ParsedHeader } from '../src/format/header.ts';
import { tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';

const { dir, cleanup } = tempDir('qledger-untrusted-');
afterAll(cleanup);
const inside = join(dir, 'in');
const outside = join(dir, 'out');
mkdirSync(inside);
mkdirSync(outside);

async function overlay(name: string, backing: string, backingFormat: 'raw' | 'qcow2' | undefined = 'raw'): Promise<string> {
  const f = join(inside, name);
  await Image.create(f, { size: 1 << 20, backingFile: backing, ...(backingFormat ? { backingFormat } : {}) });
  return f;
}

describe('the untrusted-image policy', () => {
  it('a backing file outside the allowed directory: refused read-only and read-write, nothing written; inside, or trusted, it opens', async () => {
    writeFileSync(join(outside, 'secret.raw'), new Uint8Array(1 << 20).fill(7));
    writeFileSync(join(inside, 'base.raw'), new Uint8Array(1 << 20).fill(1));
    const evil = await overlay('evil.qcow2', '../out/secret.raw');
    const ok = await overlay('ok.qcow2', 'base.raw');
    const before = readFileSync(evil);
    await expect(Image.open(evil, { trusted: false })).rejects.toThrow(/^.*evil\.qcow2: backing file '\.\.\/out\/secret\.raw' \(.*secret\.raw\) is outside the allowed directory .*in$/);
    await expect(Image.open(evil, { trusted: false, write: true })).rejects.toMatchObject({ code: 'E_USAGE', data: { untrusted: true, field: 'backing file' } });
    expect(readFileSync(evil).equals(before)).toBe(true);
    // trusted (the default) it opens, as qemu-img does; a wider allowed directory admits it
    await (await Image.open(evil)).close();
    const wide = await Image.open(evil, { trusted: false, allowedDir: dir });
    expect((await wide.read(0, 1))[0]).toBe(7);
    await wide.close();
    const good = await Image.open(ok, { trusted: false, write: true });
    expect((await good.read(0, 1))[0]).toBe(1);
    await good.close();
  });

  it('a symbolic link inside that leads outside is outside', async () => {
    symlinkSync(join(outside, 'secret.raw'), join(inside, 'link.raw'));
    const f = await overlay('linked.qcow2', 'link.raw');
    await expect(Image.open(f, { trusted: false })).rejects.toThrow(/backing file 'link\.raw' \(.*out\/secret\.raw\) is outside the allowed directory/);
  });

  it('a backing file that names no format is never probed; protocols and json: names are refused', async () => {
    const f = await overlay('nofmt.qcow2', 'base.raw');
    // the backing format extension renamed to one no reader knows: the image names no format
    const bytes = readFileSync(f);
    const at = bytes.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]));
    expect(at).toBeGreaterThan(0);
    bytes.writeUInt32BE(0x1234_5678, at);
    writeFileSync(f, bytes);
    await expect(Image.open(f, { trusted: false })).rejects.toThrow(/backing file 'base\.raw' names no format; an untrusted image's backing file is never probed/);
    // trusted, it is probed as before
    await (await Image.open(f)).close();
    // (the names patched in over 'base.raw', same length: creating an image over them would open them)
    for (const name of ['nbd:/x/y', 'json:{1}']) {
      const g = await overlay(`proto-${name.slice(0, 3)}.qcow2`, 'base.raw');
      const b = readFileSync(g);
      const at = b.indexOf(Buffer.from('base.raw'));
      b.write(name, at, 'latin1');
      writeFileSync(g, b);
      await expect(Image.open(g, { trusted: false })).rejects.toThrow(/is not a plain file name; an untrusted image may name only files/);
    }
  });

  it('a data file outside the allowed directory is refused', async () => {
    const f = join(inside, 'df.qcow2');
    await Image.create(f, { size: 1 << 20, dataFile: join(outside, 'df.raw') });
    await expect(Image.open(f, { trusted: false })).rejects.toThrow(/data file '.*out\/df\.raw' \(.*\) is outside the allowed directory/);
    await (await Image.open(f)).close();
  });

  it('a chain deeper than 16 images is refused untrusted (64 trusted, as QEMU)', async () => {
    writeFileSync(join(inside, 'c0.raw'), new Uint8Array(1 << 16));
    let prev = 'c0.raw';
    let fmt: 'raw' | 'qcow2' = 'raw';
    for (let i = 1; i <= 18; i++) {
      const f = join(inside, `c${i}.qcow2`);
      await Image.create(f, { size: 1 << 16, backingFile: prev, backingFormat: fmt });
      prev = `c${i}.qcow2`;
      fmt = 'qcow2';
    }
    await expect(Image.open(join(inside, 'c18.qcow2'), { trusted: false })).rejects.toThrow(/backing chain is deeper than 16 images, the untrusted limit/);
    await (await Image.open(join(inside, 'c18.qcow2'))).close();
    await (await Image.open(join(inside, 'c15.qcow2'), { trusted: false })).close();
  });

  it('tables larger than 256 MiB together are refused', () => {
    const parsed = { header: { clusterBits: 16, l1Size: UNTRUSTED_MAX_METADATA / 8, refcountTableClusters: 1 } } as unknown as ParsedHeader;
    expect(() => checkMetadataSize('big.qcow2', parsed, 0)).toThrow(/big\.qcow2: its L1, refcount and snapshot tables take \d+ bytes, more than the 268435456 an untrusted image may/);
    expect(() => checkMetadataSize('small.qcow2', { header: { clusterBits: 16, l1Size: 16, refcountTableClusters: 1 } } as unknown as ParsedHeader, 0)).not.toThrow();
  });

  it('--untrusted on info, map, convert, compare, io and nbd: the one-line refusal, exit 1, nothing written', async () => {
    const evil = join(inside, 'evil.qcow2');
    const before = readFileSync(evil);
    for (const args of [['info', '--untrusted', '--backing-chain', evil], ['map', '--untrusted', evil], ['convert', '--untrusted', '-O', 'raw', evil, join(dir, 'x.raw')], ['compare', '--untrusted', evil, evil], ['io', '--untrusted', '-c', 'write 0 512', evil], ['nbd', '--untrusted', '-r', '-k', join(dir, 'never.sock'), evil]]) {
      const r = await runCli(...args);
      expect({ code: r.code, lines: r.err.trim().split('\n').length }, args.join(' ')).toEqual({ code: args[0] === 'compare' ? 2 : 1, lines: 1 });
      expect(r.err, args.join(' ')).toMatch(/is outside the allowed directory/);
    }
    expect(readFileSync(evil).equals(before)).toBe(true);
    // the chain commands too: commit, rebase (safe), dd and measure
    const secret = readFileSync(join(outside, 'secret.raw'));
    for (const args of [['commit', '--untrusted', evil], ['rebase', '--untrusted', '-b', '', evil], ['dd', '--untrusted', `if=${evil}`, `of=${join(dir, 'dd.raw')}`], ['measure', '--untrusted', '-O', 'qcow2', evil]]) {
      const r = await runCli(...args);
      expect({ code: r.code, lines: r.err.trim().split('\n').length }, args.join(' ')).toEqual({ code: 1, lines: 1 });
      expect(r.err, args.join(' ')).toMatch(/is outside the allowed directory/);
    }
    expect(readFileSync(evil).equals(before)).toBe(true);
    expect(readFileSync(join(outside, 'secret.raw')).equals(secret)).toBe(true);
    // trusted, the same image is measured, its backing file read
    const ok = await runCli('measure', '-O', 'qcow2', evil);
    expect(ok.code).toBe(0);
    // without --backing-chain, info opens nothing the image names but its data file: the header's names are shown
    const r = await runCli('info', '--untrusted', evil);
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/backing file: \.\.\/out\/secret\.raw/);
  });
});
