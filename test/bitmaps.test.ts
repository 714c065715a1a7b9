/**
 * Persistent dirty bitmaps (issue 14, item 4): the in-memory bitmap against
 * a model; `qledger bitmap` against `qemu-img bitmap` (messages, exit codes,
 * info afterwards); the dirty content after the same writes through qemu-io
 * and through qledger io, read by qemu-nbd -B and nbdinfo; in use while a
 * session writes, inconsistent after a crash, never trusted; a session that
 * writes nothing writes nothing; resize; a damaged directory refused; the
 * extension gone with the last bitmap.
 *
 * Budget: QLEDGER_BITMAP_RUNS random sequences (default 4).
 */

import { describe, it, expect, afterAll } from 'vitest';
import fc from 'fast-check';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { spawn, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { DirtyBitmap } from '../src/engine/bitmaps/dirty-bitmap.ts';
import { decodeHeader } from '../src/format/header.ts';
import { decodeBitmapDirectory } from '../src/format/bitmaps.ts';
import { Image } from '../src/index.ts';
import { nbdToolsAvailable, qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { runCli } from './helpers/cli.ts';

const RUNS = Number(process.env['QLEDGER_BITMAP_RUNS'] ?? 4);
const { dir, cleanup } = tempDir('qledger-bitmaps-');
afterAll(cleanup);
const d = qemuAvailable ? describe : describe.skip;
const dn = qemuAvailable && nbdToolsAvailable ? describe : describe.skip;
if (!qemuAvailable) console.warn('\n*** bitmaps.test.ts: qemu-img/qemu-io not found; the interop tests are SKIPPED (CI installs qemu-utils) ***\n');
else if (!nbdToolsAvailable) console.warn('\n*** bitmaps.test.ts: qemu-nbd/nbdinfo not found; the dirty-content interop tests are SKIPPED (CI installs libnbd-bin) ***\n');

let n = 0;
const fresh = (name: string) => join(dir, `${n++}-${name}`);

describe('the in-memory dirty bitmap', () => {
  it('sets exactly the granules a range touches, merges across granularities and follows a resize (model-based)', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 9, max: 16 }),
        fc.integer({ min: 9, max: 16 }),
        fc.array(fc.tuple(fc.integer({ min: 0, max: (1 << 22) - 1 }), fc.integer({ min: 1, max: 300_000 })), { minLength: 1, maxLength: 30 }),
        fc.integer({ min: 1, max: 1 << 23 }),
        (gb, gb2, ranges, newSize) => {
          const size = 1 << 22;
          const cs = 512; // small chunks: many of them
          const b = new DirtyBitmap(size, gb, cs);
          const model = new Uint8Array(size / 512); // per 512-byte sector
          for (const [off, len] of ranges) {
            b.setRange(off, Math.min(len, size - off));
            const g = 2 ** gb;
            const first = Math.floor(off / g) * g;
            const end = Math.min(size, Math.ceil((off + Math.min(len, size - off)) / g) * g);
            model.fill(1, first / 512, Math.ceil(end / 512));
          }
          const fromExtents = new Uint8Array(size / 512);
          for (const [s, e] of b.extents()) fromExtents.fill(1, s / 512, Math.ceil(e / 512));
          expect(Buffer.from(fromExtents).equals(Buffer.from(model))).toBe(true);
          // merge into another granularity: every dirty byte is covered, nothing more than its granules
          const c = new DirtyBitmap(size, gb2, cs);
          c.merge(b);
          const g2 = 2 ** gb2;
          for (const [s, e] of b.extents()) for (let x = s; x < e; x += 512) expect(c.get(Math.floor(x / g2))).toBe(true);
          for (const [s, e] of c.extents()) {
            let any = false;
            for (let x = s; x < e && !any; x += 512) any = model[x / 512] === 1;
            expect(any).toBe(true);
          }
          // a resize keeps the bits inside the new size, drops the rest; growth adds clear bits
          b.resize(newSize);
          for (const [s, e] of b.extents()) {
            expect(e).toBeLessThanOrEqual(newSize);
            for (let x = s; x < e; x += 512) expect(model[x / 512]).toBe(1);
          }
        },
      ),
      { numRuns: 100 },
    );
  });
});

/** The same `bitmap` command lines through qemu-img and qledger on copies: output (QEMU's node name aside), exit code. */
function bitmapPair(a: string, b: string, args: string[]) {
  const q = spawnSync('qemu-img', ['bitmap', ...args.map((x) => (x === 'IMG' ? a : x))], { encoding: 'utf8' });
  return { q, expectOurs: async () => {
    const ours = await runCli('bitmap', ...args.map((x) => (x === 'IMG' ? b : x)));
    const theirs = (q.stdout + q.stderr).replaceAll('qemu-img', 'qledger').replaceAll(a, b).replace(/#block\d+/g, b);
    expect({ code: ours.code, text: ours.out + ours.err }, args.join(' ')).toEqual({ code: q.status, text: theirs });
  } };
}

d('qledger bitmap as qemu-img bitmap', () => {
  it('every action, refusal and message; the same bitmaps afterwards (info), qemu-img check clean', async () => {
    const a = fresh('q.qcow2');
    const b = fresh('l.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', a, '64M']);
    copyFileSync(a, b);
    const long = 'x'.repeat(1024);
    const lines: string[][] = [
      ['--add', 'IMG', 'b1'],
      ['--add', 'IMG', 'b1'],
      ['--add', '-g', '256', 'IMG', 'b2'],
      ['--add', '-g', '4G', 'IMG', 'b2'],
      ['--add', '-g', '2G', 'IMG', 'b2'],
      ['--remove', 'IMG', 'b2'],
      ['--remove', 'IMG', 'nope'],
      ['--clear', 'IMG', 'nope'],
      ['IMG', 'b1'],
      ['--add', 'IMG'],
      ['--add', '--disable', '-g', '128k', 'IMG', 'b3'],
      ['--add', '-g', 'abc', 'IMG', 'b6'],
      ['-g', '64k', '--remove', 'IMG', 'b1'],
      ['-b', 'IMG', '--remove', 'IMG', 'b1'],
      ['-F', 'qcow2', '--merge', 'b3', 'IMG', 'b1'],
      ['--merge', 'nope', 'IMG', 'b1'],
      ['--merge', 'b3', 'IMG', 'b1'],
      ['--enable', '--disable', 'IMG', 'b1'],
      ['--add', 'IMG', ''],
      ['--add', 'IMG', long],
      ['--add', '-g', '512', 'IMG', 'fine'],
      ['--clear', '--enable', 'IMG', 'b3'],
    ];
    for (const l of lines) await bitmapPair(a, b, l).expectOurs();
    const info = (f: string) => JSON.parse(qemuImg(['info', '--output=json', f]))['format-specific'].data.bitmaps;
    expect(info(b)).toEqual(info(a));
    expect(spawnSync('qemu-img', ['check', b]).status).toBe(0);
    // a raw image and a v2 one: refused in qemu-img's words
    const raw = fresh('r.img');
    qemuImg(['create', '-q', '-f', 'raw', raw, '1M']);
    const rawOurs = await runCli('bitmap', '-f', 'raw', '--add', raw, 'x');
    expect(rawOurs).toMatchObject({ code: 1, err: `qledger: Operation add on bitmap x failed: Can't store persistent bitmaps to ${raw}: Operation not supported\n` });
    const v2 = fresh('v2.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '1M']);
    const before = readFileSync(v2);
    expect(await runCli('bitmap', '--add', v2, 'x')).toMatchObject({ code: 1, err: `qledger: Operation add on bitmap x failed: Can't make bitmap 'x' persistent in '${v2}': Cannot store dirty bitmaps in qcow2 v2 files\n` });
    expect(readFileSync(v2).equals(before)).toBe(true);
  });

  it('the last bitmap removed takes the extension and the autoclear bit with it (qemu-img warns of nothing)', async () => {
    const f = fresh('last.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '16M']);
    expect((await runCli('bitmap', '--add', f, 'b')).code).toBe(0);
    expect((await runCli('bitmap', '--remove', f, 'b')).code).toBe(0);
    const p = decodeHeader(readFileSync(f).subarray(0, 65536), 1 << 30);
    expect(p.header.autoclearFeatures & 1n).toBe(0n);
    expect(p.extensions.some((e) => e.type === 0x23852875)).toBe(false);
    const q = spawnSync('qemu-img', ['info', f], { encoding: 'utf8' });
    expect(q.stderr).toBe('');
    expect(q.stdout).not.toMatch(/bitmaps:/);
    // the journal's extension, after it in the list, moved down over it
    expect(p.extensions.some((e) => e.type === 0x716c6a6c)).toBe(true);
    expect(spawnSync('qemu-img', ['check', f]).status).toBe(0);
  });
});

/** A dirty bitmap's extents as nbdinfo reads them from qemu-nbd -B NAME (QEMU's own reading of the image). */
async function nbdDirty(file: string, name: string): Promise<Array<[number, number]>> {
  const sock = join(dir, `nbd-${n++}.sock`);
  const server = spawn('qemu-nbd', ['-r', '-f', 'qcow2', '-k', sock, '-B', name, '-t', file], { stdio: 'ignore' });
  try {
    for (let i = 0; i < 100; i++) {
      if (spawnSync('test', ['-S', sock]).status === 0) break;
      await new Promise((r) => setTimeout(r, 30));
    }
    const out = spawnSync('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${name}`, `nbd+unix:///?socket=${sock}`], { encoding: 'utf8' });
    if (out.status !== 0) throw new Error(`nbdinfo: ${out.stderr}`);
    const extents = JSON.parse(out.stdout) as Array<{ offset: number; length: number; type: number }>;
    return extents.filter((e) => e.type === 1).map((e) => [e.offset, e.offset + e.length]);
  } finally {
    server.kill();
    await new Promise((r) => server.once('exit', r));
  }
}

/** qemu-io command lines of writes, zero writes and discards over a disk of `size` bytes. */
function ioCommands(size: number): fc.Arbitrary<string[]> {
  const range = fc.tuple(fc.integer({ min: 0, max: size / 512 - 1 }), fc.integer({ min: 1, max: 600 })).map(([s, l]) => [s * 512, Math.min(l * 512, size - s * 512)] as const);
  const cmd = fc.oneof(
    fc.tuple(range, fc.integer({ min: 1, max: 255 })).map(([[o, l], p]) => `write -P ${p} ${o} ${l}`),
    range.map(([o, l]) => `write -z ${o} ${l}`),
    range.map(([o, l]) => `discard ${o} ${l}`),
  );
  return fc.array(cmd, { minLength: 1, maxLength: 8 });
}

dn('dirty content: the same writes through qemu-io and qledger io give the same bitmaps', () => {
  it('bitmaps of 512 B, 64 KiB and 1 MiB granularity and a disabled one, over two sessions each (4 KiB and 64 KiB clusters)', async () => {
    await fc.assert(
      fc.asyncProperty(ioCommands(8 << 20), ioCommands(8 << 20), fc.constantFrom(4096, 65536), async (first, second, cs) => {
        const a = fresh('q.qcow2');
        const b = fresh('l.qcow2');
        qemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, a, '8M']);
        for (const [g, name, extra] of [['512', 'fine', []], ['64k', 'mid', []], ['1M', 'coarse', []], ['64k', 'off', ['--disable']]] as const) qemuImg(['bitmap', '--add', '-g', g, ...extra, a, name]);
        copyFileSync(a, b);
        for (const cmds of [first, second]) {
          qemuIo(a, cmds);
          const r = await runCli('io', ...cmds.flatMap((c) => ['-c', c]), b);
          expect(r.code, r.err).toBe(0);
        }
        expect(spawnSync('qemu-img', ['check', b]).status).toBe(0);
        const img = await Image.open(b);
        try {
          for (const name of ['fine', 'mid', 'coarse', 'off']) {
            const theirs = await nbdDirty(a, name);
            expect(await nbdDirty(b, name), `${name}: ${[...first, '--', ...second].join('; ')}`).toEqual(theirs);
            expect(await img.bitmaps.dirty(name)).toEqual(theirs);
          }
          expect((await img.bitmaps.list()).map((x) => [x.name, x.enabled, x.inUse])).toEqual([['fine', true, false], ['mid', true, false], ['coarse', true, false], ['off', false, false]]);
        } finally {
          await img.close();
        }
      }),
      { numRuns: RUNS },
    );
  });

  it('QEMU and qledger take turns on one image: the bits of both stay, as after QEMU alone', async () => {
    const a = fresh('q.qcow2');
    const b = fresh('l.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', a, '8M']);
    qemuImg(['bitmap', '--add', '-g', '4k', a, 'inc']);
    copyFileSync(a, b);
    const turns = [['write -P 1 0 4k'], ['write -P 2 1M 100k', 'discard 3M 64k'], ['write -z 5M 8k']];
    turns.forEach((cmds) => qemuIo(a, cmds));
    qemuIo(b, turns[0]!);
    expect((await runCli('io', ...turns[1]!.flatMap((c) => ['-c', c]), b)).code).toBe(0);
    qemuIo(b, turns[2]!);
    expect(await nbdDirty(b, 'inc')).toEqual(await nbdDirty(a, 'inc'));
    // merge into new bitmaps (64 KiB granularity: the cluster size), from this image and from another one, as qemu-img does
    expect((await runCli('bitmap', '--add', b, 'copy', '--merge', 'inc')).code).toBe(0);
    qemuImg(['bitmap', '--add', a, 'copy', '--merge', 'inc']);
    expect(await nbdDirty(b, 'copy')).toEqual(await nbdDirty(a, 'copy'));
    const c = fresh('other.qcow2');
    const e = fresh('other-q.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', c, '8M']);
    copyFileSync(c, e);
    expect((await runCli('bitmap', '--add', c, 'into', '-g', '4k', '--merge', 'inc', '-b', a, '-F', 'qcow2')).code).toBe(0);
    qemuImg(['bitmap', '--add', e, 'into', '-g', '4k', '--merge', 'inc', '-b', a, '-F', 'qcow2']);
    expect(await nbdDirty(c, 'into')).toEqual(await nbdDirty(e, 'into'));
    expect(await nbdDirty(c, 'into')).toEqual(await nbdDirty(a, 'inc'));
    expect(spawnSync('qemu-img', ['check', c]).status).toBe(0);
  });

  it('resize with bitmaps: they follow the size as in QEMU (bits past a shrink gone, growth clear)', async () => {
    const a = fresh('q.qcow2');
    const b = fresh('l.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', a, '8M']);
    qemuImg(['bitmap', '--add', '-g', '64k', a, 'r']);
    copyFileSync(a, b);
    qemuIo(a, ['write -P 3 7M 1M']);
    qemuIo(b, ['write -P 3 7M 1M']);
    for (const [f, tool] of [[a, 'q'], [b, 'l']] as const) {
      const args = ['resize', '--shrink', f, '7680k'];
      if (tool === 'q') qemuImg(args);
      else expect((await runCli(...args)).code).toBe(0);
    }
    for (const [f, tool] of [[a, 'q'], [b, 'l']] as const) {
      if (tool === 'q') qemuImg(['resize', f, '16M']);
      else expect((await runCli('resize', f, '16M')).code).toBe(0);
      if (tool === 'q') qemuIo(f, ['write -P 4 12M 64k']);
      else expect((await runCli('io', '-c', 'write -P 4 12M 64k', f)).code).toBe(0);
    }
    expect(await nbdDirty(b, 'r')).toEqual(await nbdDirty(a, 'r'));
    expect(spawnSync('qemu-img', ['check', b]).status).toBe(0);
  });
});

d('in use, inconsistent, untouched', () => {
  it('a writing session marks the enabled bitmaps in use before its first write; a crash leaves them so, never trusted after', async () => {
    const f = fresh('crash.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '8M']);
    qemuImg(['bitmap', '--add', f, 'on']);
    qemuImg(['bitmap', '--add', '--disable', f, 'off']);
    const img = await Image.open(f, { write: true });
    await img.write(0, new Uint8Array(4096).fill(7));
    // the crash: no close
    await img.abandon();
    const flags = JSON.parse(qemuImg(['info', '--output=json', f]))['format-specific'].data.bitmaps.map((x: { name: string; flags: string[] }) => [x.name, x.flags]);
    expect(flags).toEqual([['on', ['in-use', 'auto']], ['off', []]]);
    // the journal leaves nothing leaked; the in-use bitmap is inconsistent: listed, refused, removable
    const again = await Image.open(f, { write: true });
    try {
      expect((await again.bitmaps.list()).map((x) => [x.name, x.inconsistent])).toEqual([['on', true], ['off', false]]);
      await again.write(8192, new Uint8Array(512).fill(1));
    } finally {
      await again.close();
    }
    expect(spawnSync('qemu-img', ['check', f]).status).toBe(0);
    const refused = await runCli('bitmap', '--clear', f, 'on');
    expect(refused).toMatchObject({ code: 1, err: "qledger: Operation clear on bitmap on failed: Bitmap 'on' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk\n" });
    expect((await runCli('resize', f, '16M')).code).toBe(1);
    expect((await runCli('bitmap', '--remove', f, 'on')).code).toBe(0);
    expect(spawnSync('qemu-img', ['check', f]).status).toBe(0);
    expect(JSON.parse(qemuImg(['info', '--output=json', f]))['format-specific'].data.bitmaps.map((x: { name: string }) => x.name)).toEqual(['off']);
  });

  it('a read-write session that writes nothing leaves the file byte for byte as it was', async () => {
    const f = fresh('idle.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '8M']);
    qemuImg(['bitmap', '--add', f, 'b']);
    qemuIo(f, ['write -P 1 0 64k']);
    const before = readFileSync(f);
    const img = await Image.open(f, { write: true });
    await img.read(0, 4096);
    await img.close();
    expect(readFileSync(f).equals(before)).toBe(true);
  });

  it('a bitmap directory QEMU would refuse fails a read-write open in one line, naming it; nothing is written', async () => {
    const f = fresh('bad.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '8M']);
    qemuImg(['bitmap', '--add', f, 'b']);
    const bytes = readFileSync(f);
    const p = decodeHeader(bytes.subarray(0, 65536), bytes.length);
    const at = p.bitmaps!.directoryOffset;
    expect(decodeBitmapDirectory(bytes.subarray(at, at + p.bitmaps!.directorySize), 1, at)[0]!.name).toBe('b');
    bytes[at + 16] = 7; // type: not a dirty tracking bitmap
    writeFileSync(f, bytes);
    const r = await runCli('io', '-c', 'write 0 512', f);
    expect(r.code).not.toBe(0);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(r.err).toMatch(/bitmap directory.*type of entry 0.*0x[0-9a-f]+.*unknown bitmap type 7/);
    expect(readFileSync(f).equals(bytes)).toBe(true);
    expect(spawnSync('qemu-io', ['-c', 'write 0 512', f]).status).not.toBe(0);
  });

  it('amend compat=0.10 refuses an image with bitmaps (qemu-img 7.2 drops them and leaks their clusters)', async () => {
    const f = fresh('amend.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '8M']);
    qemuImg(['bitmap', '--add', f, 'b']);
    const before = readFileSync(f);
    expect(await runCli('amend', '-o', 'compat=0.10', f)).toMatchObject({ code: 1, err: "qledger: Cannot downgrade an image with persistent bitmaps: remove them first with 'qledger bitmap --remove'\n" });
    expect(readFileSync(f).equals(before)).toBe(true);
  });
});
