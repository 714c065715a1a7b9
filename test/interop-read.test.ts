/**
 * Interop: images written by qemu-img / qemu-io read back exactly as QEMU
 * reads them. For each scenario: guest bytes equal `qemu-img convert -O raw`,
 * `info` equals `qemu-img info --output=json`, `map` equals
 * `qemu-img map --output=json`. Every image is generated here.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { readFileSync, writeFileSync, openSync, writeSync, closeSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import { Image, convertToRaw } from '../src/index.ts';
import { qemuAvailable, qemuImg, qemuIo, run, tempDir } from './helpers/qemu.ts';

const { dir, cleanup } = tempDir();
afterAll(cleanup);
const P = (name: string) => join(dir, name);

async function ourMap(path: string, opts: { snapshot?: string } = {}) {
  const img = await Image.open(path, opts);
  try {
    const out = [];
    for await (const e of img.map()) {
      const { filename: _f, ...rest } = e;
      out.push(rest);
    }
    return out;
  } finally {
    await img.close();
  }
}

async function ourInfo(path: string, chain = false) {
  const img = await Image.open(path, { noBacking: !chain });
  try {
    if (!chain) return JSON.parse(JSON.stringify(await img.info()));
    const all = [];
    for (const l of img.chain) all.push(JSON.parse(JSON.stringify(await img.info(l))));
    return all;
  } finally {
    await img.close();
  }
}

/** Compare guest bytes: ours (through convertToRaw) against qemu-img convert. */
async function expectSameBytes(path: string, snapshot?: string) {
  const ref = P(`ref-${Math.random().toString(36).slice(2)}.raw`);
  const ours = P(`ours-${Math.random().toString(36).slice(2)}.raw`);
  qemuImg(['convert', '-O', 'raw', ...(snapshot ? ['-l', snapshot] : []), path, ref], dir);
  const img = await Image.open(path, snapshot ? { snapshot } : {});
  try {
    await convertToRaw(img, ours);
  } finally {
    await img.close();
  }
  const a = readFileSync(ref);
  const b = readFileSync(ours);
  expect(b.length).toBe(a.length);
  expect(Buffer.compare(a, b) === 0, `guest bytes of ${path} differ from qemu-img convert`).toBe(true);
}

async function expectAgrees(path: string) {
  await expectSameBytes(path);
  // cwd = dir: QEMU 7.2 resolves a relative data file name against the working directory
  expect(await ourInfo(path)).toEqual(JSON.parse(qemuImg(['info', '--output=json', path], dir)));
  expect(await ourMap(path)).toEqual(JSON.parse(qemuImg(['map', '--output=json', path], dir)));
}

/** A deterministic mixed workload of qemu-io commands for an image of `size` bytes. */
function workload(size: number, cluster: number): string[] {
  const c = cluster;
  const cmds = [
    `write -P 0x11 0 ${Math.min(3 * c, size)}`,
    `write -P 0x22 ${c + 100} 1000`,
    `write -z ${2 * c} ${c}`,
    `write -P 0x33 ${Math.floor(size / 2)} ${Math.min(c * 2, size / 4)}`,
    `write -P 0x44 ${size - 512} 512`,
  ];
  if (size > 8 * c) cmds.push(`write -P 0x55 ${5 * c} ${c}`, `discard ${5 * c} ${c}`, `write -z -u ${6 * c} ${c}`);
  return cmds;
}

const d = qemuAvailable ? describe : describe.skip;

d('images written by QEMU read back as QEMU reads them', () => {
  describe('cluster sizes', () => {
    for (const cs of [512, 1024, 4096, 65536, 262144, 2 * 1024 * 1024]) {
      it(`cluster_size=${cs}`, async () => {
        const f = P(`cs-${cs}.qcow2`);
        const size = Math.max(16 * cs, 4 * 1024 * 1024);
        qemuImg(['create', '-f', 'qcow2', '-o', `cluster_size=${cs}`, f, String(size)]);
        qemuIo(f, workload(size, cs));
        await expectAgrees(f);
      });
    }
  });

  describe('compat 0.10 (v2)', () => {
    for (const cs of [512, 65536]) {
      it(`v2 cluster_size=${cs}`, async () => {
        const f = P(`v2-${cs}.qcow2`);
        const size = 8 * 1024 * 1024;
        qemuImg(['create', '-f', 'qcow2', '-o', `compat=0.10,cluster_size=${cs}`, f, String(size)]);
        qemuIo(f, workload(size, cs));
        await expectAgrees(f);
      });
    }
  });

  describe('refcount widths', () => {
    for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
      it(`refcount_bits=${bits}`, async () => {
        const f = P(`rc-${bits}.qcow2`);
        qemuImg(['create', '-f', 'qcow2', '-o', `refcount_bits=${bits},cluster_size=4096`, f, '4M']);
        qemuIo(f, workload(4 << 20, 4096));
        await expectAgrees(f);
      });
    }
  });

  it('extended L2 with subcluster writes, zeroes and discards', async () => {
    const f = P('extl2.qcow2');
    qemuImg(['create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=65536', f, '8M']);
    qemuIo(f, ['write -P 0x61 0 2k', 'write -P 0x62 6k 4k', 'write -z 64k 2k', 'write -P 0x63 130k 1k', 'write -z -u 256k 64k', 'discard 130k 2k', 'write -P 0x64 1M 64k']);
    await expectAgrees(f);
  });

  it('extended L2 over a backing file', async () => {
    const base = P('extl2-base.qcow2');
    const top = P('extl2-top.qcow2');
    qemuImg(['create', '-f', 'qcow2', base, '4M']);
    qemuIo(base, ['write -P 0x71 0 1M']);
    qemuImg(['create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=32768', '-b', base, '-F', 'qcow2', top]);
    qemuIo(top, ['write -P 0x72 1k 1k', 'write -z 40k 3k', 'write -P 0x73 100k 2k']);
    await expectAgrees(top);
  });

  for (const ct of ['zlib', 'zstd']) {
    it(`compressed clusters (${ct})`, async () => {
      const raw = P(`comp-src-${ct}.raw`);
      const f = P(`comp-${ct}.qcow2`);
      const buf = Buffer.alloc(3 * 1024 * 1024);
      for (let i = 0; i < buf.length; i++) buf[i] = (i * 7) % 251 < 200 ? (i >> 9) & 0xff : (i * 31) & 0xff;
      buf.fill(0, 1 << 20, (1 << 20) + 200000);
      writeFileSync(raw, buf);
      qemuImg(['convert', '-c', '-O', 'qcow2', '-o', `compression_type=${ct},cluster_size=65536`, raw, f]);
      // a compressed write from qemu-io too, and a plain overwrite of part of a compressed cluster
      qemuIo(f, ['write -c -P 0x5a 1M 64k', 'write -P 0x5b 70000 100']);
      await expectAgrees(f);
    });
  }

  it('compressed clusters with 512-byte and 2 MiB clusters', async () => {
    for (const cs of [512, 2 * 1024 * 1024]) {
      const raw = P(`comp-cs-${cs}.raw`);
      const f = P(`comp-cs-${cs}.qcow2`);
      const buf = Buffer.alloc(4 * 1024 * 1024);
      for (let i = 0; i < buf.length; i++) buf[i] = (i >> 10) & 0xff;
      writeFileSync(raw, buf);
      qemuImg(['convert', '-c', '-O', 'qcow2', '-o', `cluster_size=${cs}`, raw, f]);
      await expectAgrees(f);
    }
  });

  it('backing chain three deep with zero clusters and discards over backing data', async () => {
    const [a, b, c] = [P('chain-a.qcow2'), P('chain-b.qcow2'), P('chain-c.qcow2')];
    qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=4096', a, '2M']);
    qemuIo(a, ['write -P 0x0a 0 2M']);
    qemuImg(['create', '-f', 'qcow2', '-b', 'chain-a.qcow2', '-F', 'qcow2', b], dir);
    qemuIo(b, ['write -P 0x0b 64k 128k', 'write -z 512k 64k', 'discard 1M 64k']);
    qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=16384', '-b', 'chain-b.qcow2', '-F', 'qcow2', c, '3M'], dir);
    qemuIo(c, ['write -P 0x0c 80k 16k', 'write -z 0 16k', 'write -z -u 1536k 32k', 'discard 96k 16k', 'write -P 0x0d 2600k 8k']);
    await expectAgrees(c);
    expect(await ourInfo(c, true)).toEqual(JSON.parse(qemuImg(['info', '--output=json', '--backing-chain', c])));
  });

  it('raw backing file, shorter than the overlay', async () => {
    const raw = P('backing.raw');
    const top = P('raw-top.qcow2');
    // Written by Node: sparse, with data blocks and holes, no QEMU first-block allocation.
    const fd = openSync(raw, 'w');
    ftruncateSync(fd, 1 << 20);
    writeSync(fd, Buffer.alloc(8192, 0x31), 0, 8192, 0);
    writeSync(fd, Buffer.alloc(65536, 0x32), 0, 65536, 300 * 1024);
    closeSync(fd);
    qemuImg(['create', '-f', 'qcow2', '-b', 'backing.raw', '-F', 'raw', top, '3M'], dir);
    qemuIo(top, ['write -P 0x33 4k 4k', 'write -z 300k 4k']);
    await expectAgrees(top);
  });

  it('internal snapshots with data diverging after each', async () => {
    const f = P('snaps.qcow2');
    qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=4096', f, '4M']);
    qemuIo(f, ['write -P 0x01 0 1M']);
    qemuImg(['snapshot', '-c', 's1', f]);
    qemuIo(f, ['write -P 0x02 512k 1M']);
    qemuImg(['snapshot', '-c', 's2', f]);
    qemuIo(f, ['write -z 0 256k', 'discard 1M 64k', 'write -P 0x03 3M 4k']);
    await expectAgrees(f);
    for (const s of ['s1', 's2', '1', '2']) await expectSameBytes(f, s);
    const list = qemuImg(['snapshot', '-l', f]);
    const ours = run('node', ['--import', 'tsx', join(import.meta.dirname, '../src/cli/bin.ts'), 'snapshot', '-l', f]);
    expect(ours).toBe(list);
  });

  describe('preallocation modes', () => {
    for (const mode of ['off', 'metadata', 'falloc', 'full']) {
      it(`preallocation=${mode}`, async () => {
        const f = P(`prealloc-${mode}.qcow2`);
        qemuImg(['create', '-f', 'qcow2', '-o', `preallocation=${mode}`, f, '32M']);
        qemuIo(f, ['write -P 0x41 1M 64k', 'write -z 2M 64k']);
        await expectAgrees(f);
      });
    }
  });

  it('image left dirty by a killed writer with lazy refcounts', async () => {
    const f = P('dirty.qcow2');
    qemuImg(['create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', f, '16M']);
    // qemu-io's sigraise kills the process before it closes the image: the dirty bit stays set.
    try {
      qemuIo(f, ['write -P 0x5a 0 512', 'sigraise 9']);
    } catch {
      /* killed by design */
    }
    const info = JSON.parse(qemuImg(['info', '--output=json', '-U', f]));
    expect(info['dirty-flag']).toBe(true);
    await expectAgrees(f);
  });

  it('sparse multi-TiB image', async () => {
    const f = P('huge.qcow2');
    qemuImg(['create', '-f', 'qcow2', f, '4T']);
    qemuIo(f, ['write -P 0x42 0 64k', 'write -P 0x43 1T 64k', 'write -P 0x44 3T 4k', 'write -z 2T 1M']);
    expect(await ourInfo(f)).toEqual(JSON.parse(qemuImg(['info', '--output=json', f])));
    expect(await ourMap(f)).toEqual(JSON.parse(qemuImg(['map', '--output=json', f])));
    const img = await Image.open(f);
    try {
      for (const [off, len] of [[0, 65536], [2 ** 40 - 512, 4096], [3 * 2 ** 40, 8192], [2 * 2 ** 40, 4096]] as const) {
        const ref = run('qemu-io', ['-r', '-c', `read -v ${off} ${len}`, f]);
        const ours = await img.read(off, len);
        const bytes = ref
          .split('\n')
          .filter((l) => /^[0-9a-f]{8,}:/.test(l))
          .flatMap((l) => l.slice(l.indexOf(':') + 3, l.indexOf(':') + 3 + 48).trim().split(/\s+/).map((h) => parseInt(h, 16)));
        expect(Buffer.from(ours).equals(Buffer.from(bytes))).toBe(true);
      }
    } finally {
      await img.close();
    }
  });

  it('odd virtual size', async () => {
    const f = P('odd.qcow2');
    qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=65536', f, String(10 * 1024 * 1024 + 3 * 512)]);
    qemuIo(f, ['write -P 0x66 10M 1536', 'write -P 0x67 0 1000']);
    await expectAgrees(f);
  });

  for (const raw of [false, true]) {
    it(`external data file${raw ? ' (data_file_raw)' : ''}`, async () => {
      const f = P(`ext-${raw}.qcow2`);
      qemuImg(['create', '-f', 'qcow2', '-o', `data_file=ext-${raw}.data${raw ? ',data_file_raw=on' : ''}`, f, '8M'], dir);
      qemuIo(f, ['write -P 0x21 0 100k', 'write -P 0x22 3M 64k', 'write -z 64k 64k'], [], dir);
      await expectAgrees(f);
    });
  }

  it('bitmaps extension', async () => {
    const f = P('bitmaps.qcow2');
    qemuImg(['create', '-f', 'qcow2', f, '8M']);
    qemuImg(['bitmap', '--add', f, 'b0']);
    qemuImg(['bitmap', '--add', '-g', '131072', '--disable', f, 'b1']);
    qemuIo(f, ['write -P 0x11 0 64k']);
    await expectAgrees(f);
  });
});
