/**
 * The NBD server (qledger nbd, serveNbd) against the real clients and
 * against qemu-nbd: nbdinfo sees the same export (size, flags, block sizes,
 * contexts) and the same base:allocation map as from qemu-nbd on a copy of
 * the same image; qemu-io and qemu-img use it as a disk; nbdcopy copies out
 * of it and into it over one and four connections; every write a client
 * had acknowledged is in the image after the server stops, which checks
 * clean. Bad clients (raw sockets): each malformed or out-of-range request
 * gets the protocol's errno or a closed connection, the server goes on
 * serving and the image stays consistent.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { copyFileSync, existsSync, readFileSync } from 'node:fs';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { nbdToolsAvailable, qemuAvailable, qemuImg, qemuIo, run, tempDir } from './helpers/qemu.ts';
import { Image } from '../src/index.ts';
import { serveNbd } from '../src/server/nbd-server.ts';
import { RawClient } from './helpers/nbd-raw.ts';

const { dir, cleanup } = tempDir('qledger-nbd-');
afterAll(cleanup);
const d = qemuAvailable && nbdToolsAvailable ? describe : describe.skip;
const root = new URL('..', import.meta.url).pathname;
const uri = (sock: string, name = '') => `nbd+unix:///${name}?socket=${sock}`;

/** An image with data, a zero range and unallocated space, made by QEMU. */
function sample(name: string, opts = 'cluster_size=65536'): string {
  const f = join(dir, name);
  qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, f, '16M']);
  qemuIo(f, ['write -P 5 0 1M', 'write -z 2M 1M', 'write -P 6 4M 64k', 'discard 4M 4k']);
  return f;
}

async function waitFor(path: string): Promise<void> {
  for (let i = 0; i < 200 && !existsSync(path); i++) await new Promise((r) => setTimeout(r, 25));
  if (!existsSync(path)) throw new Error(`no socket at ${path}`);
}

/** qemu-nbd or qledger nbd serving `file` on a fresh socket until killed. */
async function server(tool: 'qemu-nbd' | 'qledger', file: string, args: string[] = [], fmt = 'qcow2'): Promise<{ sock: string; proc: ChildProcess; stop: () => Promise<number | null>; exit: () => Promise<number | null> }> {
  const sock = join(dir, `${tool}-${Math.random().toString(36).slice(2)}.sock`);
  const proc = tool === 'qemu-nbd' ? spawn('qemu-nbd', ['-k', sock, '-f', fmt, ...args, file], { stdio: 'inherit' }) : spawn(join(root, 'tools/qledger'), ['nbd', '-k', sock, ...args, file], { stdio: 'inherit' });
  await waitFor(sock);
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  return {
    sock,
    proc,
    stop: async () => {
      if (proc.exitCode === null) proc.kill('SIGTERM');
      return exited;
    },
    /** the server's own exit (its last client gone), within 10 s */
    exit: () => Promise.race([exited, new Promise<number | null>((_, reject) => setTimeout(() => reject(new Error(`${tool} did not exit`)), 10_000))]),
  };
}

d('what clients see: the same as from qemu-nbd', () => {
  it('nbdinfo: export size, flags, block sizes and contexts; the base:allocation map', async () => {
    const a = sample('info.qcow2');
    const b = join(dir, 'info-copy.qcow2');
    copyFileSync(a, b);
    const q = await server('qemu-nbd', a, ['-t']);
    const l = await server('qledger', b, ['-t']);
    try {
      const info = (sock: string) => {
        const j = JSON.parse(run('nbdinfo', ['--json', uri(sock)]));
        const e = j.exports[0];
        delete e.uri;
        return { ...j, exports: [e] };
      };
      const qi = info(q.sock);
      const li = info(l.sock);
      // multi-conn only where a second client is let in (-e above 1), as qemu-nbd 7.2: nbdcopy believes it
      expect(qi.exports[0].can_multi_conn).toBe(false);
      expect(li).toEqual(qi);
      expect(run('nbdinfo', ['--map', uri(l.sock)])).toBe(run('nbdinfo', ['--map', uri(q.sock)]));
      expect(run('nbdinfo', ['--map', '--totals', uri(l.sock)])).toBe(run('nbdinfo', ['--map', '--totals', uri(q.sock)]));
    } finally {
      await q.stop();
      await l.stop();
    }
  });

  it('qemu-io and qemu-img through the export: reads, writes, zero writes, discards, map; the image checks clean afterwards', async () => {
    const a = sample('rw.qcow2', 'cluster_size=4096');
    const b = join(dir, 'rw-copy.qcow2');
    copyFileSync(a, b);
    const cmds = ['read -P 5 0 1M', 'write -P 9 512k 8k', 'write -z 0 4k', 'write -z -u 1M 64k', 'discard 4M 64k', 'write -P 10 15M 1M', 'aio_write -P 11 8M 64k', 'aio_flush', 'read -P 0 2M 1M', 'flush'];
    const q = await server('qemu-nbd', a);
    const l = await server('qledger', b);
    const qo = qemuIo(uri(q.sock), cmds, ['-f', 'raw']);
    const lo = qemuIo(uri(l.sock), cmds, ['-f', 'raw']);
    // without -t both servers stop once qemu-io, their one client, has gone
    expect(await q.exit()).toBe(0);
    expect(await l.exit()).toBe(0);
    const strip = (s: string) => s.replace(/\(.*\)/g, '').replace(/\d+\.\d+ sec/g, 'T sec');
    expect(strip(lo)).toBe(strip(qo));
    expect(spawnSync('qemu-img', ['check', b]).status).toBe(0);
    expect(spawnSync('qemu-img', ['compare', a, b]).status).toBe(0);
  });

  it('nbdcopy out of the export and into it, one and four connections; the copy equals qemu-img convert', async () => {
    const a = sample('copy.qcow2');
    const ref = join(dir, 'copy-ref.raw');
    qemuImg(['convert', '-O', 'raw', a, ref]);
    // the default: one client, no multi-conn advertised, so nbdcopy opens one connection
    const one = await server('qledger', a);
    run('nbdcopy', [uri(one.sock), join(dir, 'copy-out-default.raw')]);
    expect(await one.exit()).toBe(0);
    expect(readFileSync(join(dir, 'copy-out-default.raw')).equals(readFileSync(ref))).toBe(true);
    const l = await server('qledger', a, ['-t', '-e', '4']);
    try {
      expect(JSON.parse(run('nbdinfo', ['--json', uri(l.sock)])).exports[0].can_multi_conn).toBe(true);
      for (const conns of ['1', '4']) {
        const out = join(dir, `copy-out-${conns}.raw`);
        run('nbdcopy', ['-C', conns, uri(l.sock), out]);
        expect(readFileSync(out).equals(readFileSync(ref)), `nbdcopy -C ${conns}`).toBe(true);
      }
      // into it: a raw file of other content, over four connections, then flushed by nbdcopy
      const src = join(dir, 'copy-src.raw');
      qemuImg(['create', '-q', '-f', 'raw', src, '16M']);
      qemuIo(src, ['write -P 33 0 3M', 'write -P 34 10M 2M'], ['-f', 'raw']);
      run('nbdcopy', ['-C', '4', src, uri(l.sock)]);
    } finally {
      await l.stop();
    }
    expect(spawnSync('qemu-img', ['check', a]).status).toBe(0);
    expect(spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', join(dir, 'copy-src.raw'), a]).status).toBe(0);
  });

  it('a raw file, read-write: the same map as qemu-nbd -f raw, writes and zero writes land in the file', async () => {
    // two files made the same way (a copy may fill holes in or punch them)
    const [a, b] = ['plain.raw', 'plain-copy.raw'].map((n) => join(dir, n)) as [string, string];
    for (const f of [a, b]) {
      qemuImg(['create', '-q', '-f', 'raw', f, '8M']);
      qemuIo(f, ['write -P 3 1M 512k', 'write -P 4 6M 64k'], ['-f', 'raw']);
    }
    const q = await server('qemu-nbd', a, ['-t'], 'raw');
    const l = await server('qledger', b, ['-t', '-f', 'raw']);
    try {
      expect(run('nbdinfo', ['--map', uri(l.sock)])).toBe(run('nbdinfo', ['--map', uri(q.sock)]));
      const cmds = ['write -P 9 0 64k', 'write -z 1M 64k', 'read -P 3 1088k 448k', 'flush'];
      const strip = (s: string) => s.replace(/\(.*\)/g, '').replace(/\d+\.\d+ sec/g, 'T sec');
      expect(strip(qemuIo(uri(l.sock), cmds, ['-f', 'raw']))).toBe(strip(qemuIo(uri(q.sock), cmds, ['-f', 'raw'])));
    } finally {
      await q.stop();
      await l.stop();
    }
    expect(readFileSync(b).equals(readFileSync(a))).toBe(true);
  });

  it('-x names the export, -r serves read-only, -l serves a snapshot', async () => {
    const a = sample('named.qcow2');
    qemuImg(['snapshot', '-c', 'snap', a]);
    qemuIo(a, ['write -P 77 0 64k']);
    const l = await server('qledger', a, ['-t', '-x', 'disk0', '-D', 'the disk']);
    try {
      const j = JSON.parse(run('nbdinfo', ['--json', uri(l.sock, 'disk0')]));
      expect(j.exports[0]['export-name']).toBe('disk0');
      expect(j.exports[0].description).toBe('the disk');
      expect(spawnSync('nbdinfo', [uri(l.sock, 'other')]).status).not.toBe(0);
      expect(run('nbdinfo', ['--list', '--json', uri(l.sock)])).toContain('"export-name": "disk0"');
    } finally {
      await l.stop();
    }
    const r = await server('qledger', a, ['-t', '-l', 'snap']);
    try {
      expect(JSON.parse(run('nbdinfo', ['--json', uri(r.sock)])).exports[0].is_read_only).toBe(true);
      expect(qemuIo(uri(r.sock), ['read -P 5 0 64k'], ['-f', 'raw', '-r'])).not.toContain('Pattern verification failed');
      expect(spawnSync('qemu-io', ['-f', 'raw', '-c', 'write 0 4k', uri(r.sock)], { encoding: 'utf8' }).stdout + '').not.toMatch(/^wrote/m);
    } finally {
      await r.stop();
    }
  });

  it('TCP with -p and -b, --pid-file: nbdinfo over nbd://; the server leaves after its one client and removes the pid file', async () => {
    const a = sample('tcp.qcow2');
    const pidFile = join(dir, 'tcp.pid');
    const port = 20000 + Math.floor(Math.random() * 20000);
    const proc = spawn(join(root, 'tools/qledger'), ['nbd', '-p', String(port), '-b', '127.0.0.1', '--pid-file', pidFile, '-r', a], { stdio: 'inherit' });
    const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
    try {
      await waitFor(pidFile);
      expect(Number(readFileSync(pidFile, 'utf8'))).toBe(proc.pid);
      const j = JSON.parse(run('nbdinfo', ['--json', `nbd://127.0.0.1:${port}`]));
      expect(j.exports[0]['export-size']).toBe(16 << 20);
      expect(j.exports[0].is_read_only).toBe(true);
      expect(await exited).toBe(0);
      expect(existsSync(pidFile)).toBe(false);
    } finally {
      if (proc.exitCode === null) proc.kill('SIGTERM');
    }
  });

  it('--fork: the command returns once the server listens, the server serves in the background until SIGTERM; a server that fails says why and the command exits 1', async () => {
    const a = sample('fork.qcow2');
    const sock = join(dir, 'fork.sock');
    const pidFile = join(dir, 'fork.pid');
    const r = spawnSync(join(root, 'tools/qledger'), ['nbd', '--fork', '-t', '-k', sock, '--pid-file', pidFile, a], { encoding: 'utf8', timeout: 20_000 });
    expect(r.status).toBe(0);
    // listening when the command returned, in a process of its own
    expect(existsSync(sock)).toBe(true);
    const pid = Number(readFileSync(pidFile, 'utf8'));
    expect(pid).toBeGreaterThan(0);
    expect(() => process.kill(pid, 0)).not.toThrow();
    try {
      qemuIo(uri(sock), ['write -P 61 2M 1M'], ['-f', 'raw']);
      expect(qemuIo(uri(sock), ['read -P 61 2M 1M'], ['-f', 'raw'])).not.toContain('Pattern verification failed');
    } finally {
      process.kill(pid, 'SIGTERM');
    }
    for (let i = 0; i < 200 && existsSync(pidFile); i++) await new Promise((res) => setTimeout(res, 50));
    expect(existsSync(pidFile)).toBe(false);
    expect(spawnSync('qemu-img', ['check', a]).status).toBe(0);
    expect(qemuIo(a, ['read -P 61 2M 1M'])).not.toContain('Pattern verification failed');
    const bad = spawnSync(join(root, 'tools/qledger'), ['nbd', '--fork', '-k', join(dir, 'fork2.sock'), join(dir, 'missing.qcow2')], { encoding: 'utf8', timeout: 20_000 });
    expect(bad.status).toBe(1);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
    expect(bad.stderr).toContain('missing.qcow2');
    expect(existsSync(join(dir, 'fork2.sock'))).toBe(false);
  });

  it('SIGTERM: the image is flushed and closed clean (no dirty bit, journal closed), every acknowledged write in it', async () => {
    const a = sample('term.qcow2');
    const l = await server('qledger', a, ['-t']);
    qemuIo(uri(l.sock), ['write -P 42 6M 1M'], ['-f', 'raw']);
    expect(await l.stop()).toBe(0);
    expect(existsSync(l.sock)).toBe(false);
    expect(spawnSync('qemu-img', ['check', a]).status).toBe(0);
    expect(qemuIo(a, ['read -P 42 6M 1M'])).not.toContain('Pattern verification failed');
  });
});

// ---- bad clients, over a raw socket ------------------------------------------------------------

d('bad clients: the protocol\'s errno or a closed connection, never a crashed server or a damaged image', () => {
  it('handshake and transmission abuse, one client after another on a read-only and a writable export', async () => {
    const f = sample('bad.qcow2');
    const img = await Image.open(f, { write: true });
    const sock = join(dir, 'bad.sock');
    const srv = await serveNbd(img, { socket: sock, persistent: true, handshakeMs: 2000 });
    try {
      // unknown client flags: closed
      let c = await RawClient.connect(sock);
      await c.hello(0x80);
      expect(await c.closedByServer()).toBe(true);
      // an option without the IHAVEOPT magic: closed
      c = await RawClient.connect(sock);
      await c.hello();
      c.s.write(Buffer.alloc(16, 0xee));
      expect(await c.closedByServer()).toBe(true);
      // an option claiming 1 GiB of data: closed before it is read
      c = await RawClient.connect(sock);
      await c.hello();
      const big = Buffer.alloc(16);
      big.writeBigUInt64BE(0x49484156454f5054n, 0);
      big.writeUInt32BE(7, 8);
      big.writeUInt32BE(1 << 30, 12);
      c.s.write(big);
      expect(await c.closedByServer()).toBe(true);
      // unknown option: ERR_UNSUP, and the handshake goes on; a GO naming no export: ERR_UNKNOWN; a malformed GO: ERR_INVALID
      c = await RawClient.connect(sock);
      await c.hello();
      c.option(99, Buffer.from('junk'));
      expect((await c.optionReply()).type).toBe(0x80000001);
      const wrong = Buffer.from([0, 0, 0, 3, 0x61, 0x62, 0x63, 0, 0]);
      c.option(7, wrong);
      expect((await c.optionReply()).type).toBe(0x80000006);
      c.option(7, Buffer.from([0, 0, 0, 9, 0, 0]));
      expect((await c.optionReply()).type).toBe(0x80000003);
      c.option(11, Buffer.from('x'));
      expect((await c.optionReply()).type).toBe(0x80000003); // extended headers take no data
      c.option(2);
      expect((await c.optionReply()).type).toBe(1);
      expect(await c.closedByServer()).toBe(true);
      // a client that never finishes the handshake is cut off at the limit
      c = await RawClient.connect(sock);
      await c.hello();
      expect(await new Promise((r) => setTimeout(() => r(c.closedByServer()), 2100))).toBe(true);

      // transmission
      c = await RawClient.connect(sock);
      await c.go();
      const size = img.size;
      c.request(0, size - 512, 1024); // read past the end
      expect(await c.error()).toBe(22);
      c.request(0, 0, 64 << 20); // over the maximum block
      expect(await c.error()).toBe(75);
      c.request(1, size, 512, 0, 2n, Buffer.alloc(512)); // write past the end (payload consumed)
      expect(await c.error()).toBe(22);
      c.request(1, 0, 33 << 20, 0, 3n, Buffer.alloc(33 << 20, 1)); // write over the maximum: payload skipped
      expect(await c.error()).toBe(75);
      c.request(42, 0, 512); // unknown command
      expect(await c.error()).toBe(22);
      c.request(0, 0, 512, 0x4000); // unknown flag
      expect(await c.error()).toBe(22);
      c.request(7, 0, 0); // block status of nothing
      expect(await c.error()).toBe(22);
      c.request(1, 8192, 4, 1, 4n, Buffer.from([1, 2, 3, 4])); // a good write, FUA: durable when acknowledged
      expect(await c.error()).toBe(0);
      // a bad request magic: the stream cannot be trusted any more
      c.s.write(Buffer.alloc(28, 0xab));
      expect(await c.closedByServer()).toBe(true);
      // a client that leaves in the middle of a write's payload
      c = await RawClient.connect(sock);
      await c.go();
      const h = Buffer.alloc(28);
      h.writeUInt32BE(0x25609513, 0);
      h.writeUInt16BE(1, 6);
      h.writeBigUInt64BE(1n << 20n, 16);
      h.writeUInt32BE(1 << 20, 24);
      c.s.write(Buffer.concat([h, Buffer.alloc(4096, 7)]));
      await new Promise((r) => setTimeout(r, 50));
      c.end();
      // and the server still serves
      c = await RawClient.connect(sock);
      await c.go();
      c.request(0, 8192, 4);
      expect(await c.error()).toBe(0);
      // one data chunk: the offset, then the bytes
      expect(c.payload.readBigUInt64BE(0)).toBe(8192n);
      expect([...c.payload.subarray(8)]).toEqual([1, 2, 3, 4]);
      c.end();
    } finally {
      await srv.close();
      await img.close();
    }
    expect(spawnSync('qemu-img', ['check', f]).status).toBe(0);
    // the torn write never happened
    expect(qemuIo(f, ['read -P 0 1M 4k'])).not.toMatch(/Pattern verification failed/);
  });

  it('a read-only export: writes, trims and zero writes get EPERM', async () => {
    const f = sample('ro.qcow2');
    const img = await Image.open(f);
    const sock = join(dir, 'ro.sock');
    const srv = await serveNbd(img, { socket: sock, persistent: true });
    try {
      const c = await RawClient.connect(sock);
      await c.go();
      c.request(1, 0, 512, 0, 1n, Buffer.alloc(512));
      expect(await c.error()).toBe(1);
      c.request(4, 0, 512);
      expect(await c.error()).toBe(1);
      c.request(6, 0, 512);
      expect(await c.error()).toBe(1);
      c.request(3, 0, 0);
      expect(await c.error()).toBe(0);
      c.end();
    } finally {
      await srv.close();
      await img.close();
    }
  });
});

d('qemu:dirty-bitmap:NAME contexts (-B), as qemu-nbd serves them', () => {
  /** An image with two bitmaps QEMU filled: 'inc' (4 KiB) and 'coarse' (1 MiB). */
  function withBitmaps(name: string): string {
    const f = join(dir, name);
    qemuImg(['create', '-q', '-f', 'qcow2', f, '16M']);
    qemuImg(['bitmap', '--add', '-g', '4k', f, 'inc']);
    qemuImg(['bitmap', '--add', '-g', '1M', f, 'coarse']);
    qemuIo(f, ['write -P 1 0 4k', 'write -P 2 3M 100k', 'write -z 9M 8k', 'discard 12M 64k']);
    return f;
  }

  for (const ro of [true, false]) {
    it(`${ro ? 'read-only' : 'writable'} export: the same contexts listed, the same maps, ${ro ? '' : 'writes over NBD marked live, '}two contexts in one BLOCK_STATUS`, async () => {
      const a = withBitmaps(`bm-${ro}.qcow2`);
      const b = join(dir, `bm-${ro}-copy.qcow2`);
      copyFileSync(a, b);
      const args = [...(ro ? ['-r'] : []), '-t', '-B', 'inc', '-B', 'coarse'];
      const q = await server('qemu-nbd', a, args);
      const l = await server('qledger', b, args);
      try {
        const contexts = (sock: string) => JSON.parse(run('nbdinfo', ['--json', uri(sock)])).exports[0].contexts;
        expect(contexts(l.sock)).toEqual(contexts(q.sock));
        if (!ro) for (const s of [q.sock, l.sock]) run('qemu-io', ['-f', 'raw', '-c', 'write -P 7 6M 4k', '-c', 'write -z 14M 1M', uri(s)]);
        // (base:allocation after the writes is another matter: QEMU reports the unwritten part of a new cluster as a file hole)
        for (const ctx of ['qemu:dirty-bitmap:inc', 'qemu:dirty-bitmap:coarse', ...(ro ? ['base:allocation'] : [])]) {
          expect(run('nbdinfo', [`--map=${ctx}`, uri(l.sock)]), ctx).toBe(run('nbdinfo', [`--map=${ctx}`, uri(q.sock)]));
        }
        // both contexts in one request: libnbd gets one block-status chunk per context
        const script = `import nbd, sys, json
h = nbd.NBD()
h.add_meta_context('base:allocation')
h.add_meta_context('qemu:dirty-bitmap:inc')
h.connect_uri(sys.argv[1])
seen = {}
def cb(meta, offset, entries, err):
    seen[meta] = entries
    return 0
h.block_status(16 << 20, 0, cb)
print(json.dumps(seen, sort_keys=True))
`;
        const python = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
        const py = (sock: string) => spawnSync(python, ['-c', script, uri(sock)], { encoding: 'utf8' });
        const pq = py(q.sock);
        if (pq.status === 0) {
          const pl = py(l.sock);
          expect(pl.status, pl.stderr).toBe(0);
          expect(Object.keys(JSON.parse(pl.stdout))).toEqual(['base:allocation', 'qemu:dirty-bitmap:inc']);
          expect(JSON.parse(pl.stdout)['qemu:dirty-bitmap:inc']).toEqual(JSON.parse(pq.stdout)['qemu:dirty-bitmap:inc']);
        } else console.warn(`*** nbd.test.ts: python3-libnbd not usable (${pq.stderr.trim().split('\n').at(-1)}); the two-context request is SKIPPED ***`);
      } finally {
        await q.stop();
        await l.stop();
      }
      expect(spawnSync('qemu-img', ['check', b]).status).toBe(0);
    });
  }

  it("a bitmap not there, or inconsistent: qemu-nbd's words, exit 1", async () => {
    const f = withBitmaps('bm-bad.qcow2');
    for (const [bm, msg] of [['nope', "Bitmap 'nope' is not found"], ['inc', "Bitmap 'inc' is inconsistent and cannot be used"]] as const) {
      if (bm === 'inc') {
        // in use on disk: a writer that never closed
        const img = await Image.open(f, { write: true });
        await img.write(0, new Uint8Array(512));
        await img.abandon();
      }
      const q = spawnSync('qemu-nbd', ['-r', '-k', join(dir, 'never.sock'), '-B', bm, f], { encoding: 'utf8', timeout: 10_000 });
      const l = spawnSync(join(root, 'tools/qledger'), ['nbd', '-r', '-k', join(dir, 'never.sock'), '-B', bm, f], { encoding: 'utf8', timeout: 20_000 });
      expect(q.stderr).toBe(`qemu-nbd: ${msg}\n`);
      expect({ code: l.status, err: l.stderr }).toEqual({ code: 1, err: `qledger: ${msg}\n` });
    }
  });
});

d('qemu:allocation-depth (-A), as qemu-nbd serves it', () => {
  it('a two-image chain: the same contexts (with -B too) and the same depth map', async () => {
    const b = join(dir, 'depth-base.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', b, '4M']);
    qemuIo(b, ['write 0 64k', 'write 1M 64k', 'write 3M 4k']);
    const t = join(dir, 'depth-top.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-b', b, '-F', 'qcow2', t]);
    qemuImg(['bitmap', '--add', t, 'inc']);
    qemuIo(t, ['write 1M 4k', 'write -z 2M 64k', 'discard 3M 4k']);
    const q = await server('qemu-nbd', t, ['-r', '-t', '-A', '-B', 'inc']);
    const l = await server('qledger', t, ['-r', '-t', '-A', '-B', 'inc']);
    try {
      const contexts = (sock: string) => JSON.parse(run('nbdinfo', ['--json', uri(sock)])).exports[0].contexts;
      expect(contexts(l.sock)).toEqual(contexts(q.sock));
      for (const ctx of ['qemu:allocation-depth', 'qemu:dirty-bitmap:inc']) expect(run('nbdinfo', [`--map=${ctx}`, uri(l.sock)]), ctx).toBe(run('nbdinfo', [`--map=${ctx}`, uri(q.sock)]));
    } finally {
      await q.stop();
      await l.stop();
    }
  });
});
