/**
 * qledger amend against qemu-img amend: compat=1.1 (v2 made v3) and
 * lazy_refcounts=on|off give byte-identical files on copies of the same
 * image; option refusals give qemu-img's messages and exit codes and leave
 * the file untouched; what qledger does not do yet is refused by name.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { copyFileSync, mkdirSync, readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';

const { dir, cleanup } = tempDir('qledger-amend-');
afterAll(cleanup);
const d = qemuAvailable ? describe : describe.skip;

async function both(src: string, opts: string[], tag: string) {
  const q = join(dir, `${tag}-q.qcow2`);
  const l = join(dir, `${tag}-l.qcow2`);
  copyFileSync(src, q);
  copyFileSync(src, l);
  const before = readFileSync(l);
  const qr = spawnSync('qemu-img', ['amend', ...opts, q], { encoding: 'utf8' });
  const lr = await runCli('amend', ...opts, l);
  return { q, l, before, qr: { code: qr.status, out: qr.stdout, err: qr.stderr.replaceAll('qemu-img', 'qledger').replaceAll(q, l) }, lr };
}

d('amend: as qemu-img amend, byte for byte', () => {
  const base = join(dir, 'base.raw');
  qemuImg(['create', '-q', '-f', 'raw', base, '4M']);
  const kinds: ReadonlyArray<readonly [string, (f: string) => void]> = [
    ['a v2 image with data', (f) => {
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', f, '4M']);
      qemuIo(f, ['write -P 1 0 1M']);
    }],
    ['a v2 image over a backing file, with an internal snapshot', (f) => {
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', '-b', base, '-F', 'raw', f]);
      qemuIo(f, ['write -P 2 64k 64k']);
      qemuImg(['snapshot', '-c', 'snap', f]);
    }],
    ['a v2 image with a backing name long enough that the v3 header passes the first sector', (f) => {
      // a path of 300 characters (file names stop at 255)
      const deep = join(dir, 'a'.repeat(150));
      mkdirSync(deep, { recursive: true });
      const long = join(deep, `${'b'.repeat(150)}.raw`);
      copyFileSync(base, long);
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', '-b', long, '-F', 'raw', f]);
    }],
  ];
  const changes: ReadonlyArray<readonly string[]> = [['-o', 'compat=1.1'], ['-o', 'compat=1.1,lazy_refcounts=on'], ['-o', 'compat=v3', '-o', 'lazy_refcounts=on'], ['-o', 'compat=0.10']];
  for (const [name, make] of kinds) {
    for (const opts of changes) {
      it(`${name}: ${opts.join(' ')}`, async () => {
        const f = join(dir, `${name.replace(/\W+/g, '-')}.qcow2`);
        make(f);
        const r = await both(f, [...opts], `${name.replace(/\W+/g, '-')}-${opts.join('').replace(/\W+/g, '-')}`);
        expect(r.lr).toEqual(r.qr);
        expect(readFileSync(r.l).equals(readFileSync(r.q))).toBe(true);
        expect(spawnSync('qemu-img', ['check', r.l]).status).toBe(0);
        if (opts.join().includes('lazy')) {
          // and off again: the refcounts exact, the bit gone, as qemu-img leaves it
          const lr = await runCli('amend', '-o', 'lazy_refcounts=off', r.l);
          qemuImg(['amend', '-o', 'lazy_refcounts=off', r.q]);
          expect(lr.code).toBe(0);
          expect(readFileSync(r.l).equals(readFileSync(r.q))).toBe(true);
        }
      });
    }
  }

  const refusals: ReadonlyArray<readonly [string, string[]]> = [
    ['no options', []],
    ['an option only creation takes', ['-o', 'cluster_size=4096']],
    ['an unknown option', ['-o', 'foo=1']],
    ['an unknown compatibility level', ['-o', 'compat=2.0']],
    ['lazy_refcounts neither on nor off', ['-o', 'lazy_refcounts=maybe']],
    ['the backing file', ['-o', 'backing_file=x']],
    ['lazy refcounts with compat=0.10', ['-o', 'lazy_refcounts=on,compat=0.10']],
    ['refcount_bits other than 16 with compat=0.10', ['-o', 'refcount_bits=64,compat=0.10']],
    ['a size that is no number', ['-o', 'size=abc']],
    ['a size that is not a multiple of 512', ['-o', 'size=1000']],
    ['a data file name for an image without one', ['-o', 'data_file=x.raw']],
    ['data_file_raw=on on an existing image', ['-o', 'data_file_raw=on']],
    ['data_file_raw neither on nor off', ['-o', 'data_file_raw=maybe']],
  ];
  for (const [what, opts] of refusals) {
    it(`refused as qemu-img refuses it, the file untouched: ${what}`, async () => {
      const f = join(dir, 'refuse.qcow2');
      qemuImg(['create', '-q', '-f', 'qcow2', f, '1M']);
      const r = await both(f, opts, `refuse-${what.replace(/\W+/g, '-')}`);
      expect(r.lr).toEqual(r.qr);
      expect(r.lr.code).toBe(1);
      expect(readFileSync(r.l).equals(r.before)).toBe(true);
    });
  }

  const downgrades: ReadonlyArray<readonly [string, (f: string) => void, boolean]> = [
    ['zero clusters, plain and allocated', (f) => {
      qemuImg(['create', '-q', '-f', 'qcow2', f, '1M']);
      qemuIo(f, ['write -z 0 64k', 'write -P 1 64k 64k', 'write -z 64k 64k', 'write -P 2 128k 64k']);
    }, true],
    ['lazy refcounts on', (f) => {
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', f, '1M']);
      qemuIo(f, ['write -P 3 0 128k', 'write -z 64k 64k']);
    }, true],
    ['zero clusters over a backing file (each gets a cluster of zeros)', (f) => {
      qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', f]);
      qemuIo(f, ['write -z 0 128k', 'write -P 4 1M 64k']);
    }, false],
    ['an internal snapshot without zero clusters', (f) => {
      qemuImg(['create', '-q', '-f', 'qcow2', f, '1M']);
      qemuIo(f, ['write -P 5 0 64k']);
      qemuImg(['snapshot', '-c', 's', f]);
      qemuIo(f, ['write -z 0 64k']);
    }, false],
  ];
  for (const [name, make, bytes] of downgrades) {
    it(`compat=0.10 of a v3 image: ${name}`, async () => {
      const f = join(dir, `down-${name.replace(/\W+/g, '-')}.qcow2`);
      make(f);
      const r = await both(f, ['-o', 'compat=0.10'], `down-${name.replace(/\W+/g, '-')}`);
      expect(r.lr).toEqual(r.qr);
      if (bytes) expect(readFileSync(r.l).equals(readFileSync(r.q))).toBe(true);
      expect(spawnSync('qemu-img', ['check', r.l]).status).toBe(0);
      expect(spawnSync('qemu-img', ['compare', r.q, r.l]).status).toBe(0);
      expect(JSON.parse(qemuImg(['info', '--output=json', r.l]))['format-specific'].data.compat).toBe('0.10');
    });
  }

  const downRefusals: ReadonlyArray<readonly [string, string]> = [
    ['extended L2', 'extended_l2=on'],
    ['refcount_bits=64', 'refcount_bits=64'],
    ['an external data file', `data_file=${join(dir, 'down-data.raw')}`],
  ];
  for (const [name, opts] of downRefusals) {
    it(`compat=0.10 refused as qemu-img refuses it, the file untouched: ${name}`, async () => {
      const f = join(dir, `downno-${name.replace(/\W+/g, '-')}.qcow2`);
      qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, f, '1M']);
      const r = await both(f, ['-o', 'compat=0.10'], `downno-${name.replace(/\W+/g, '-')}`);
      expect(r.lr).toEqual(r.qr);
      expect(r.lr.code).toBe(1);
      expect(readFileSync(r.l).equals(r.before)).toBe(true);
    });
  }

  it('refcount_bits: 16 → 64 → 8 → 16 on an image with a snapshot and compressed clusters, as qemu-img; a width too narrow refused in its words', async () => {
    const f = join(dir, 'widths.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', f, '16M']);
    qemuIo(f, ['write -P 1 0 4M', 'write -c -P 2 8M 64k']);
    qemuImg(['snapshot', '-c', 's', f]);
    qemuIo(f, ['write -P 3 0 64k']);
    const q = join(dir, 'widths-q.qcow2');
    const l = join(dir, 'widths-l.qcow2');
    copyFileSync(f, q);
    copyFileSync(f, l);
    for (const bits of ['64', '8', '1', '2', '16']) {
      const qr = spawnSync('qemu-img', ['amend', '-o', `refcount_bits=${bits}`, q], { encoding: 'utf8' });
      const before = readFileSync(l);
      const lr = await runCli('amend', '-o', `refcount_bits=${bits}`, l);
      expect({ code: lr.code, err: lr.err }, bits).toEqual({ code: qr.status, err: qr.stderr.replaceAll('qemu-img', 'qledger') });
      if (lr.code !== 0) expect(readFileSync(l).equals(before)).toBe(true);
      const ck = spawnSync('qemu-img', ['check', l], { encoding: 'utf8' });
      expect(ck.status, ck.stdout + ck.stderr).toBe(0);
      expect(spawnSync('qemu-img', ['compare', q, l]).status).toBe(0);
      const bitsOf = (x: string) => JSON.parse(qemuImg(['info', '--output=json', x]))['format-specific'].data['refcount-bits'];
      expect(bitsOf(l)).toBe(bitsOf(q));
    }
    const a = join(dir, 'widths-snap-l.raw');
    const b = join(dir, 'widths-snap-q.raw');
    qemuImg(['convert', '-O', 'raw', '-l', 's', l, a]);
    qemuImg(['convert', '-O', 'raw', '-l', 's', q, b]);
    expect(readFileSync(a).equals(readFileSync(b))).toBe(true);
    const bad = await both(f, ['-o', 'refcount_bits=3'], 'widths-bad');
    expect(bad.lr).toEqual(bad.qr);
  });

  it('size=N resizes to exactly N, shrinking too (no --shrink), before a downgrade; 0 changes nothing: as qemu-img amend', async () => {
    const f = join(dir, 'sized.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '64M']);
    qemuIo(f, ['write -P 1 40M 1M', 'write -P 2 1M 64k']);
    for (const o of ['size=32M', 'size=128M,lazy_refcounts=on', 'size=0', 'size=48M,compat=0.10']) {
      const r = await both(f, ['-o', o], `size-${o.replace(/\W+/g, '-')}`);
      expect(r.lr, o).toEqual(r.qr);
      const info = (x: string) => JSON.parse(qemuImg(['info', '--output=json', x]));
      expect(info(r.l)['virtual-size'], o).toBe(info(r.q)['virtual-size']);
      expect(info(r.l)['format-specific'], o).toEqual(info(r.q)['format-specific']);
      expect(spawnSync('qemu-img', ['check', r.l]).status, o).toBe(0);
      expect(spawnSync('qemu-img', ['compare', '-q', r.q, r.l]).status, o).toBe(0);
    }
    // a v2 image with a snapshot cannot be resized
    const v2 = join(dir, 'sized-v2.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '1M']);
    qemuImg(['snapshot', '-c', 's', v2]);
    const r = await both(v2, ['-o', 'size=2M'], 'size-v2-snap');
    expect(r.lr).toEqual(r.qr);
    expect(readFileSync(r.l).equals(r.before)).toBe(true);
  });

  it('data_file=NAME renames the external data file (valid after every write: the new name added, then the old one removed); data_file_raw=off clears the bit', async () => {
    const f = join(dir, 'df.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, 'df.raw')},data_file_raw=on`, f, '8M']);
    qemuIo(f, ['write -P 5 0 64k']);
    copyFileSync(join(dir, 'df.raw'), join(dir, 'df2.raw'));
    const r = await both(f, ['-o', `data_file=${join(dir, 'df2.raw')},data_file_raw=off`], 'df');
    expect(r.lr).toEqual(r.qr);
    const info = (x: string) => JSON.parse(qemuImg(['info', '--output=json', x]))['format-specific'].data;
    expect(info(r.l)).toEqual(info(r.q));
    expect(info(r.l)['data-file']).toBe(join(dir, 'df2.raw'));
    expect(spawnSync('qemu-img', ['check', r.l]).status).toBe(0);
    expect(qemuIo(r.l, ['read -P 5 0 64k'])).toMatch(/read 65536\/65536/);
    // no name at all is refused (qemu-img leaves the image without its data file's name)
    const e = await runCli('amend', '-o', 'data_file=', r.l);
    expect(e.code).toBe(1);
  });

  it('what qledger does not do yet is refused by name, the file untouched', async () => {
    const f = join(dir, 'notyet.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '1M']);
    // a snapshot holding zero clusters (QEMU expands those in place too)
    const s = join(dir, 'notyet-snap.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', s, '1M']);
    qemuIo(s, ['write -z 0 64k']);
    qemuImg(['snapshot', '-c', 'z', s]);
    const sb = readFileSync(s);
    const r = await runCli('amend', '-o', 'compat=0.10', s);
    expect(r.err).toBe("qledger: amend: compat=0.10 of an image whose snapshot 'z' holds zero clusters is not supported yet\n");
    expect(readFileSync(s).equals(sb)).toBe(true);
  });
});
