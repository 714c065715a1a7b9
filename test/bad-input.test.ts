/**
 * Bad input: malformed images get a one-line error naming the field and the
 * offset, a non-zero exit, no stack trace, and no write to any file.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { readFileSync, writeFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { decodeHeader, encodeHeader, QCOW2_MAGIC, putU32, putU64 } from '../src/format/index.ts';
import { FormatError, UnsupportedError } from '../src/errors.ts';
import { qemuAvailable, qemuImg, tempDir } from './helpers/qemu.ts';
import { FileDevice } from '../src/io/file-device.ts';
import { runCli } from './helpers/cli.ts';

const { dir, cleanup } = tempDir('qledger-bad-');
afterAll(cleanup);

const cli = runCli;

/** A minimal valid v3 image built by our own encoder: header, L1, refcount table and block. */
function validImage(): Uint8Array {
  const cs = 65536;
  const img = new Uint8Array(4 * cs);
  const hdr = encodeHeader({
    header: {
      version: 3, backingFileOffset: 0, backingFileSize: 0, clusterBits: 16, size: 1 << 20, cryptMethod: 0,
      l1Size: 1, l1TableOffset: 3 * cs, refcountTableOffset: cs, refcountTableClusters: 1, nbSnapshots: 0,
      snapshotsOffset: 0, incompatibleFeatures: 0n, compatibleFeatures: 0n, autoclearFeatures: 0n,
      refcountOrder: 4, headerLength: 112, compressionType: 0, extraHeaderBytes: new Uint8Array(0),
    },
    extensions: [],
  });
  img.set(hdr, 0);
  putU64(img, cs, 2 * cs); // refcount table -> block at cluster 2
  for (let i = 0; i < 4; i++) img[2 * cs + i * 2 + 1] = 1;
  return img;
}

function withField(mut: (b: Uint8Array) => void): Uint8Array {
  const b = validImage();
  mut(b);
  return b;
}

/** Write the valid image as `file`, naming `backing` as its backing file. */
function withBackingName(file: string, backing: string): string {
  const f = join(dir, file);
  const b = validImage();
  const name = new TextEncoder().encode(backing);
  putU64(b, 8, 0x400);
  putU32(b, 16, name.length);
  b.set(name, 0x400);
  writeFileSync(f, b);
  return f;
}

const cases: Array<[string, Uint8Array, RegExp]> = [
  ['empty file', new Uint8Array(0), /magic at offset 0x0: file is too short/],
  ['wrong magic', withField((b) => putU32(b, 0, 0x12345678)), /magic at offset 0x0: not a qcow2 image/],
  ['version 4', withField((b) => putU32(b, 4, 4)), /version at offset 0x4: unsupported qcow2 version 4/],
  // QEMU refuses it too ("Snapshot table offset invalid"), though no snapshot table is read (found by fuzz --qemu)
  ['unaligned snapshots_offset with no snapshots', withField((b) => putU64(b, 64, 0x7fffffff)), /snapshots_offset at offset 0x40: 0x7fffffff is not aligned to a cluster/],
  ['snapshots_offset past 2^63 with no snapshots', withField((b) => putU64(b, 64, 0xffffffff00000000n)), /snapshots_offset at offset 0x40: 0xffffffff00000000 is past the largest file offset/],
  ['cluster_bits 30', withField((b) => putU32(b, 20, 30)), /cluster_bits at offset 0x14/],
  ['header_length 100', withField((b) => putU32(b, 100, 100)), /header_length at offset 0x64/],
  ['L1 past the end', withField((b) => putU64(b, 40, 1 << 30)), /l1_table_offset at offset 0x28: .*past the end/],
  ['unaligned L1', withField((b) => putU64(b, 40, 65536 * 3 + 8)), /l1_table_offset at offset 0x28: .*not aligned/],
  ['L1 too small', withField((b) => putU64(b, 24, 2 ** 40)), /l1_size at offset 0x24: L1 table of 1 entries is too small/],
  ['absurd size', withField((b) => putU64(b, 24, 2n ** 62n)), /size at offset 0x18/],
  ['refcount table past the end', withField((b) => putU64(b, 48, 1 << 30)), /refcount_table_offset at offset 0x30/],
  ['no refcount table', withField((b) => putU32(b, 56, 0)), /refcount_table_clusters at offset 0x38/],
  ['refcount_order 7', withField((b) => putU32(b, 96, 7)), /refcount_order at offset 0x60/],
  ['unknown incompatible bit', withField((b) => (b[79] = 0x80)), /incompatible_features at offset 0x48: unsupported feature/],
  ['encrypted', withField((b) => putU32(b, 32, 2)), /crypt_method at offset 0x20: encrypted images .* not supported/],
  ['too many snapshots', withField((b) => putU32(b, 60, 70000)), /nb_snapshots at offset 0x3c/],
  ['backing name too long', withField((b) => { putU64(b, 8, 200); putU32(b, 16, 5000); }), /backing_file_size at offset 0x10/],
  ['L2 past the end', withField((b) => putU64(b, 3 * 65536, 1 << 30)), /L2 table at 0x40000000 .* past the end/],
  ['unaligned L2 offset', withField((b) => putU64(b, 3 * 65536, 65536 * 2 + 512)), /L2 table offset 0x20200 unaligned \(L1 index: 0x0\)/],
  ['extension too long', withField((b) => { putU32(b, 112, 0x1234); putU32(b, 116, 1 << 20); }), /length at offset 0x74/],
  // QEMU checks the length before the type: "Header extension too large" even for the end marker
  ['end-of-extensions marker with a length too long', withField((b) => { putU32(b, 112, 0); putU32(b, 116, 1 << 24); }), /length at offset 0x74/],
];

describe('bad input', () => {
  it('the valid base image opens', async () => {
    const f = join(dir, 'valid.qcow2');
    writeFileSync(f, validImage());
    const r = await cli('convert', '-O', 'raw', f, join(dir, 'valid.raw'));
    expect(r.err).toBe('');
    expect(r.code).toBe(0);
    expect(statSync(join(dir, 'valid.raw')).size).toBe(1 << 20);
  });

  for (const [name, bytes, msg] of cases) {
    it(`${name}: one-line error, exit 1, image untouched`, async () => {
      const f = join(dir, name.replace(/\W+/g, '-') + '.qcow2');
      writeFileSync(f, bytes);
      const before = statSync(f).mtimeMs;
      // map reads every L2 table, info only the header
      // -f qcow2 as a script would pass it: without -f, like qemu-img, a non-qcow2 file is probed as raw
      for (const cmd of [['map', '-f', 'qcow2', f], ['convert', '-f', 'qcow2', '-O', 'raw', f, join(dir, 'out.raw')], ...(/L2/.test(msg.source) ? [] : [['info', '-f', 'qcow2', f]])]) {
        // (info reads no L2 table, so L2 damage only shows in map and convert, as with qemu-img)
        const r = await cli(...cmd);
        expect(r.code).toBe(1);
        expect(r.err).toMatch(msg);
        expect(r.err.trim().split('\n')).toHaveLength(1);
        expect(r.err).not.toMatch(/\n\s+at /);
      }
      expect(Buffer.compare(readFileSync(f), Buffer.from(bytes))).toBe(0);
      expect(statSync(f).mtimeMs).toBe(before);
    });
  }

  it('a backing file that does not exist', async () => {
    const f = withBackingName('orphan.qcow2', 'missing.qcow2');
    const r = await cli('convert', '-O', 'raw', f, join(dir, 'o.raw'));
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/could not open backing file '.*missing\.qcow2': no such file/);
  });

  it('a backing chain loop is an error, not a hang', async () => {
    const f = withBackingName('loop.qcow2', 'loop.qcow2');
    const r = await cli('map', f);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/chain loop/);
  });

  it('usage errors', async () => {
    expect((await cli('info')).code).toBe(1);
    expect((await cli('info', '--output=xml', 'x')).err).toMatch(/--output must be used with human or json/);
    expect((await cli('frobnicate')).err).toMatch(/unknown command 'frobnicate'/);
    expect((await cli('info', join(dir, 'nope.qcow2'))).err).toMatch(/no such file/);
    expect((await cli('compare', join(dir, 'nope.qcow2'), join(dir, 'nope2.qcow2'))).code).toBe(2);
  });

  it('decoder errors are typed and carry field and offset', () => {
    const bad = withField((b) => putU32(b, 20, 3));
    try {
      decodeHeader(bad, bad.length);
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(FormatError);
      expect((e as FormatError).code).toBe('E_FORMAT');
      expect((e as FormatError).data).toMatchObject({ field: 'cluster_bits', offset: 20 });
    }
    const enc = withField((b) => putU32(b, 32, 1));
    expect(() => decodeHeader(enc, enc.length)).toThrow(UnsupportedError);
    expect(QCOW2_MAGIC).toBe(0x514649fb);
  });

  it('a file offset past 2^53 never reaches Node as a position (it would read or write at the current one)', async () => {
    const f = join(dir, 'far.bin');
    writeFileSync(f, Buffer.alloc(4096, 0x5a));
    const dev = await FileDevice.open(f, { readOnly: false });
    try {
      const far = 2 ** 53 + 0x3e000;
      const got = new Uint8Array(512).fill(1);
      await dev.readInto(got, far);
      expect(got.every((x) => x === 0)).toBe(true); // past the end of any file: zeros, not the header
      await expect(dev.write(far, new Uint8Array(512))).rejects.toMatchObject({ code: 'E_RANGE' });
      await expect(dev.readInto(new Uint8Array(8), -8)).rejects.toMatchObject({ code: 'E_RANGE' });
    } finally {
      await dev.close();
    }
    expect(readFileSync(f).every((x) => x === 0x5a)).toBe(true);
  });
});

describe('64-bit header fields compared exactly (issue 20, item 2)', () => {
  it('a virtual size of 2^53 + 1 is refused with its exact value (as a JS number it rounds to 2^53, which would pass); an unaligned table offset past 2^53 too', async () => {
    const f = join(dir, 'size-2p53-plus-1.qcow2');
    writeFileSync(f, withField((b) => putU64(b, 24, 2n ** 53n + 1n)));
    const before = readFileSync(f);
    const r = await cli('info', f);
    expect(r.code).toBe(1);
    expect(r.err).toContain('virtual size 9007199254740993 is above the supported 2^53 bytes');
    const w = await cli('io', '-c', 'write 0 512', f);
    expect(w.code).toBe(1);
    expect(readFileSync(f).equals(before)).toBe(true);
    // a table offset of 2^60 + 1 is unaligned (as a number it rounds to an aligned 2^60), and says so exactly
    writeFileSync(f, withField((b) => putU64(b, 40, 2n ** 60n + 1n)));
    expect((await cli('info', f)).err).toContain('l1_table_offset at offset 0x28: 0x1000000000000001 is not aligned to a cluster');
    // 2^53 itself is the limit: not refused for its size (this image's one-entry L1 table is what is too small then)
    writeFileSync(f, withField((b) => putU64(b, 24, 2n ** 53n)));
    expect((await cli('info', f)).err).not.toContain('above the supported');
  });
});

describe.skipIf(!qemuAvailable)('a bitmap table offset past 2^53 judged exactly (issue 20, item 2)', () => {
  it('2^60 + 1 is unaligned (as a number it rounds to an aligned 2^60): a read-write open refuses it, printing it exactly, and writes nothing', async () => {
    const f = join(dir, 'bitmap-offset.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '1M']);
    qemuImg(['bitmap', '--add', f, 'b0']);
    const b = readFileSync(f);
    // the bitmaps extension (0x23852875): nb_bitmaps, reserved, directory size, directory offset
    let at = b.readUInt32BE(100); // header_length: the extensions follow
    let dirOffset = -1;
    while (at + 8 <= b.length) {
      const type = b.readUInt32BE(at);
      const len = b.readUInt32BE(at + 4);
      if (type === 0) break;
      if (type === 0x23852875) dirOffset = Number(b.readBigUInt64BE(at + 8 + 16));
      at += 8 + Math.ceil(len / 8) * 8;
    }
    expect(dirOffset).toBeGreaterThan(0);
    b.writeBigUInt64BE(2n ** 60n + 1n, dirOffset);
    writeFileSync(f, b);
    const r = await cli('io', '-c', 'write 0 512', f);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/bitmap_table_offset of bitmap 'b0' at offset 0x[0-9a-f]+: 0x1000000000000001 is not aligned to a cluster/);
    expect(readFileSync(f).equals(b)).toBe(true);
  });
});

describe('a virtual size that is not a whole number of sectors (issue 20)', () => {
  it('is cut to the last whole 512-byte sector, as QEMU counts it: info, map, reads and writes all stop there', async () => {
    const f = join(dir, 'odd-size.qcow2');
    writeFileSync(f, withField((b) => putU64(b, 24, 32767)));
    const info = JSON.parse((await cli('info', '--output=json', f)).out);
    expect(info['virtual-size']).toBe(32256);
    expect(JSON.parse((await cli('map', '--output=json', f)).out)).toEqual([{ start: 0, length: 32256, depth: 0, present: false, zero: true, data: false }]);
    const r = await cli('io', '-c', 'read 32256 512', '-c', 'write 32000 256', f);
    expect(r.out).toContain('read failed: Input/output error');
    expect(r.out).toContain('wrote 256/256 bytes at offset 32000');
  });
});

describe.skipIf(!qemuAvailable)('a zero flag in a v2 image (found by fuzz --qemu, issue 20)', () => {
  it('is corruption, as for qemu-io: the read fails naming the L2 table and index, map too, and nothing is written', async () => {
    const f = join(dir, 'v2-zero-flag.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', f, '1M']);
    const { spawnSync } = await import('node:child_process');
    spawnSync('qemu-io', ['-c', 'write -P 7 64k 64k', f]);
    const b = readFileSync(f);
    const l1 = Number(b.readBigUInt64BE(40));
    const l2 = Number(b.readBigUInt64BE(l1) & 0x00ff_ffff_ffff_fe00n);
    // entry 1 names the data cluster; bit 0 is v3's zero flag, which v2 does not have
    b.writeBigUInt64BE(b.readBigUInt64BE(l2 + 8) | 1n, l2 + 8);
    writeFileSync(f, b);
    const q = spawnSync('qemu-io', ['-r', '-c', 'read 64k 4k', f], { encoding: 'utf8' });
    expect(q.stdout + q.stderr).toMatch(/Zero cluster entry found in pre-v3 image \(L2 offset: 0x[0-9a-f]+, L2 index: 0x1\)/);
    const r = await cli('io', '-r', '-c', 'read 64k 4k', f);
    expect(r.code).toBe(1);
    expect(r.err).toBe(`read: ${f}: Zero cluster entry found in pre-v3 image (L2 offset: 0x${l2.toString(16)}, L2 index: 0x1)\n`);
    expect((await cli('map', f)).code).toBe(1);
    // the first cluster, before the damaged entry, still reads
    expect((await cli('io', '-r', '-c', 'read 0 64k', f)).code).toBe(0);
    expect(readFileSync(f).equals(b)).toBe(true);
  });
});
