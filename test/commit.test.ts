/**
 * qledger commit against qemu-img commit on copies of the same chain: the
 * base ends with the same content, the top with the same map (offsets
 * aside), both pass qemu-img check, and the chain reads as before; -d keeps
 * the top; a raw base; qemu-img's refusals.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { readFileSync, statSync } from 'node:fs';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';
import { FileDevice, setInlineIo } from '../src/io/file-device.ts';
import { makeEmptyFast } from '../src/engine/make-empty-fast.ts';

const { dir, cleanup } = tempDir('qledger-commit-');
afterAll(cleanup);
const f = (n: string) => join(dir, n);
const d = qemuAvailable ? describe : describe.skip;
const mapOf = (p: string) => qemuImg(['map', '--output=json', p]).replace(/, "offset": \d+/g, '');
const same = (a: string, b: string, fa = 'qcow2', fb = 'qcow2') => spawnSync('qemu-img', ['compare', '-f', fa, '-F', fb, a, b]).status === 0;

/** A base (qcow2 or raw) of 4 MiB and an 8 MiB top over it with data, a zero cluster and data past the base's end. */
function chain(tag: string, baseFmt: 'qcow2' | 'raw'): { base: string; top: string; before: string } {
  const base = f(`${tag}-base.${baseFmt}`);
  const top = f(`${tag}-top.qcow2`);
  qemuImg(['create', '-q', '-f', baseFmt, base, '4M']);
  qemuIo(base, ['write -P 1 0 4M'], ['-f', baseFmt]);
  qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', `${tag}-base.${baseFmt}`, '-F', baseFmt, top, '8M']);
  qemuIo(top, ['write -P 2 1M 64k', 'write -z 2M 64k', 'write -P 3 6M 64k', 'write -P 4 3000 700']);
  const before = f(`${tag}-before.raw`);
  qemuImg(['convert', '-O', 'raw', top, before]);
  return { base, top, before };
}

d('commit, as qemu-img', () => {
  // inline: file requests on the calling thread, as the CLI's process makes them; then the kernel copies the top's data clusters (copy_file_range)
  for (const [fmt, inline] of [['qcow2', false], ['raw', false], ['qcow2', true], ['raw', true]] as const) {
    it(`into a ${fmt} base (grown to the top's size), the top emptied${inline ? ', file requests inline (copied in the kernel)' : ''}`, async () => {
      const q = chain(`q-${fmt}${inline}`, fmt);
      const l = chain(`l-${fmt}${inline}`, fmt);
      const qr = spawnSync('qemu-img', ['commit', q.top], { encoding: 'utf8' });
      if (inline) setInlineIo(256 << 10);
      const lr = await runCli('commit', l.top).finally(() => setInlineIo(0));
      expect(lr).toEqual({ code: qr.status, out: qr.stdout, err: qr.stderr });
      expect(lr.out).toBe('Image committed.\n');
      expect(same(l.base, q.base, fmt, fmt)).toBe(true);
      expect(same(l.before, l.top, 'raw', 'qcow2')).toBe(true);
      expect(mapOf(l.top)).toBe(mapOf(q.top));
      for (const img of [l.top, ...(fmt === 'qcow2' ? [l.base] : [])]) expect(spawnSync('qemu-img', ['check', img]).status).toBe(0);
      // the emptied top shrinks to what remains in use, as qemu-img's does: its L1 table moved down,
      // the journal this session added (past the data) taken out again
      expect(statSync(l.top).size).toBe(statSync(q.top).size);
      expect(qemuImg(['info', '--output=json', l.top])).not.toContain('journal');
      // and a later session writes through a new journal, past what is in use
      expect((await runCli('io', '-c', 'write -P 5 0 64k', l.top)).code).toBe(0);
      expect(qemuIo(l.top, ['read -P 5 0 64k', 'read -P 1 64k 64k'])).not.toContain('verification failed');
      expect(spawnSync('qemu-img', ['check', l.top]).status).toBe(0);
    });
  }

  it('an emptied top with 512-byte clusters and 64-bit refcounts is as short as qemu-img leaves it (idle refcount blocks dropped)', async () => {
    for (const t of ['q', 'l']) {
      qemuImg(['create', '-q', '-f', 'qcow2', f(`small-${t}-base.qcow2`), '64M']);
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=64', '-b', `small-${t}-base.qcow2`, '-F', 'qcow2', f(`small-${t}-top.qcow2`), '64M']);
      qemuIo(f(`small-${t}-top.qcow2`), ['write -P 6 0 3M', 'write -P 7 40M 1M']);
    }
    const qr = spawnSync('qemu-img', ['commit', f('small-q-top.qcow2')], { encoding: 'utf8' });
    expect(qr.status).toBe(0);
    expect((await runCli('commit', f('small-l-top.qcow2'))).code).toBe(0);
    expect(statSync(f('small-l-top.qcow2')).size).toBe(statSync(f('small-q-top.qcow2')).size);
    for (const t of ['q', 'l']) expect(spawnSync('qemu-img', ['check', f(`small-${t}-top.qcow2`)]).status).toBe(0);
    expect(same(f('small-l-top.qcow2'), f('small-q-top.qcow2'))).toBe(true);
    expect(qemuIo(f('small-l-top.qcow2'), ['read -P 6 0 3M', 'read -P 7 40M 1M'])).not.toContain('verification failed');
  });

  it('the O(1) make_empty qledger commit takes: only for an image whose refcounts count nothing but its active tree; the rest untouched, for the session path', async () => {
    const eligible = chain('fast', 'qcow2');
    const dev = await FileDevice.open(eligible.top, { readOnly: false });
    expect(await makeEmptyFast(dev)).toBe(true);
    await dev.close();
    expect(spawnSync('qemu-img', ['check', eligible.top]).status).toBe(0);
    // the top maps nothing: the chain reads as the base
    expect(same(eligible.top, eligible.base)).toBe(true);
    expect(JSON.parse(qemuImg(['map', '--output=json', eligible.top])).every((e: { depth: number }) => e.depth > 0 || !('offset' in e))).toBe(true);
    // an internal snapshot, or a bitmap: nothing written
    for (const extra of [['snapshot', '-c', 's1'], ['bitmap', '--add']]) {
      const c = chain(`slow-${extra[0]}`, 'qcow2');
      qemuImg(extra[0] === 'snapshot' ? [...extra, c.top] : [...extra, c.top, 'b0']);
      const before = readFileSync(c.top);
      const d = await FileDevice.open(c.top, { readOnly: false });
      expect(await makeEmptyFast(d)).toBe(false);
      await d.close();
      expect(readFileSync(c.top).equals(before)).toBe(true);
    }
  });

  it('-d keeps the top as it was; -q prints nothing', async () => {
    const l = chain('keep', 'qcow2');
    const topBefore = readFileSync(l.top);
    const r = await runCli('commit', '-d', '-q', l.top);
    expect(r).toEqual({ code: 0, out: '', err: '' });
    expect(readFileSync(l.top).equals(topBefore)).toBe(true);
    expect(same(l.before, l.base, 'raw', 'qcow2')).toBe(true);
  });

  it('-b into any image of a three-image chain: what the images above it allocate goes into it; none is emptied, no link changes (as qemu-img)', async () => {
    const mk = (tag: string) => {
      const base = f(`${tag}-base.qcow2`);
      const mid = f(`${tag}-mid.qcow2`);
      const top = f(`${tag}-top.qcow2`);
      qemuImg(['create', '-q', '-f', 'qcow2', base, '4M']);
      qemuIo(base, ['write -P 1 0 1M']);
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', `${tag}-base.qcow2`, '-F', 'qcow2', mid]);
      qemuIo(mid, ['write -P 2 512k 64k', 'write -z 64k 64k']);
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', `${tag}-mid.qcow2`, '-F', 'qcow2', top]);
      qemuIo(top, ['write -P 3 2M 64k', 'write -P 4 512k 4k']);
      return { base, mid, top };
    };
    const mapOf = (x: string) => qemuImg(['map', '--output=json', x]).replace(/, "offset": \d+/g, '');
    for (const target of ['base', 'mid'] as const) {
      const q = mk(`b3q${target}`);
      const l = mk(`b3l${target}`);
      const qr = spawnSync('qemu-img', ['commit', '-b', q[target], q.top], { encoding: 'utf8' });
      const lr = await runCli('commit', '-b', l[target], l.top);
      expect({ code: lr.code, out: lr.out }).toEqual({ code: qr.status, out: qr.stdout });
      for (const k of ['base', 'mid', 'top'] as const) {
        expect(spawnSync('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'qcow2', q[k], l[k]]).status, `${target}: ${k}`).toBe(0);
        expect(mapOf(l[k]), `${target}: ${k}`).toBe(mapOf(q[k]));
      }
      expect(spawnSync('qemu-img', ['check', l[target]]).status).toBe(0);
    }
  });

  it("refused as qemu-img refuses: no backing file, a base not in the chain", async () => {
    qemuImg(['create', '-q', '-f', 'qcow2', f('solo.qcow2'), '1M']);
    const a = await runCli('commit', f('solo.qcow2'));
    const qa = spawnSync('qemu-img', ['commit', f('solo.qcow2')], { encoding: 'utf8' });
    expect({ code: a.code, err: a.err.replace(/^qledger:/gm, 'qemu-img:') }).toEqual({ code: qa.status, err: qa.stderr });
    const l = chain('other', 'qcow2');
    const b = await runCli('commit', '-b', 'other.qcow2', l.top);
    const qb = spawnSync('qemu-img', ['commit', '-b', 'other.qcow2', l.top], { encoding: 'utf8' });
    expect({ code: b.code, err: b.err.replace(/^qledger:/gm, 'qemu-img:') }).toEqual({ code: qb.status, err: qb.stderr });
  });
});
