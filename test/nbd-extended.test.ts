/**
 * NBD extended headers (NBD_OPT_EXTENDED_HEADERS, issue 18): 32-byte
 * requests with 64-bit lengths and 32-byte reply chunks that repeat the
 * request's offset, every reply a chunk, block status in 64-bit
 * descriptors (BLOCK_STATUS_EXT). No client in Debian 12 (libnbd 1.14,
 * QEMU 7.2) negotiates them, so a raw-socket client written from the
 * protocol document drives the server; the image is then compared with what
 * the requests wrote and checked by qemu-img.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { join } from 'node:path';
import { qemuAvailable, qemuImg, qemuIo, tempDir } from './helpers/qemu.ts';
import { RawClient } from './helpers/nbd-raw.ts';
import { Image } from '../src/index.ts';
import { serveNbd } from '../src/server/nbd-server.ts';

const { dir, cleanup } = tempDir('qledger-nbd-ext-');
afterAll(cleanup);
const d = qemuAvailable ? describe : describe.skip;
if (!qemuAvailable) console.warn('\n*** nbd-extended.test.ts: qemu-img not found; SKIPPED (CI installs qemu-utils) ***\n');

const CMD = { READ: 0, WRITE: 1, FLUSH: 3, TRIM: 4, WRITE_ZEROES: 6, BLOCK_STATUS: 7 };
const PAYLOAD_LEN = 1 << 5;
const DONE = 1;
const GiB = 2 ** 30;

d('NBD extended headers', () => {
  it('negotiation: no data, once, instead of structured replies; EXPORT_NAME after it ends the connection', async () => {
    const f = join(dir, 'neg.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '1M']);
    const img = await Image.open(f);
    const sock = join(dir, 'neg.sock');
    const srv = await serveNbd(img, { socket: sock, persistent: true });
    try {
      let c = await RawClient.connect(sock);
      await c.hello();
      c.option(11, Buffer.from('x'));
      expect((await c.optionReply()).type).toBe(0x80000003); // ERR_INVALID: the option takes no data
      c.option(11);
      expect((await c.optionReply()).type).toBe(1);
      c.option(11);
      expect((await c.optionReply()).type).toBe(0x80000003); // already negotiated
      c.option(8);
      expect((await c.optionReply()).type).toBe(0x8000000a); // ERR_EXT_HEADER_REQD: no way back to structured replies
      c.option(1, Buffer.alloc(0)); // EXPORT_NAME: has no error reply, so the connection ends
      expect(await c.closedByServer()).toBe(true);
      // structured replies first, then extended headers: allowed, and transmission uses the extended style
      c = await RawClient.connect(sock);
      await c.goExtended(['base:allocation'], true);
      c.requestExt(CMD.FLUSH, 0, 0, 0, 5n);
      const r = await c.chunkExt();
      expect(r).toMatchObject({ flags: DONE, type: 0, cookie: 5n, offset: 0n, errno: 0 });
      c.end();
    } finally {
      await srv.close();
      await img.close();
    }
  });

  it('transmission: writes with PAYLOAD_LEN, reads in extended chunks, a zero write and block status past 4 GiB, the refusals; the image holds what was written and checks clean', async () => {
    const f = join(dir, 'ext.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', f, '8G']);
    qemuIo(f, ['write -P 5 0 1M']);
    const img = await Image.open(f, { write: true });
    const sock = join(dir, 'ext.sock');
    const srv = await serveNbd(img, { socket: sock, persistent: true });
    try {
      const c = await RawClient.connect(sock);
      await c.goExtended();
      // a write carries PAYLOAD_LEN; its reply is a NONE chunk that repeats cookie and offset
      const data = Buffer.alloc(65536, 0xab);
      c.requestExt(CMD.WRITE, 2 * 2 ** 20, data.length, PAYLOAD_LEN, 11n, data);
      expect(await c.chunkExt()).toMatchObject({ flags: DONE, type: 0, cookie: 11n, offset: 2n * 2n ** 20n, errno: 0 });
      // a write without it has no payload to read: EINVAL, and the next request is read where it starts
      c.requestExt(CMD.WRITE, 0, 4096, 0, 12n);
      expect(await c.chunkExt()).toMatchObject({ flags: DONE, cookie: 12n, errno: 22 });
      // another command with a payload: the payload is read and dropped, EINVAL
      c.requestExt(CMD.TRIM, 0, 8, PAYLOAD_LEN, 13n, Buffer.alloc(8));
      expect(await c.chunkExt()).toMatchObject({ cookie: 13n, errno: 22 });
      // a read over data and a hole: OFFSET_DATA (1) and OFFSET_HOLE (2) chunks, each header with the request's offset
      const at = 1024 * 1024 - 4096;
      c.requestExt(CMD.READ, at, 8192, 0, 14n);
      const got = Buffer.alloc(8192, 0xee);
      for (;;) {
        const r = await c.chunkExt();
        expect(r.cookie).toBe(14n);
        expect(r.offset).toBe(BigInt(at));
        const o = Number(r.payload.readBigUInt64BE(0)) - at;
        if (r.type === 1) r.payload.copy(got, o, 8);
        else if (r.type === 2) got.fill(0, o, o + r.payload.readUInt32BE(8));
        else expect.fail(`chunk type ${r.type}`);
        if (r.flags & DONE) break;
      }
      expect(got.equals(Buffer.concat([Buffer.alloc(4096, 5), Buffer.alloc(4096, 0)]))).toBe(true);
      // a zero write of 5 GiB in one request: the 64-bit effect length
      c.requestExt(CMD.WRITE_ZEROES, GiB, 5 * GiB, 0, 15n);
      expect(await c.chunkExt()).toMatchObject({ cookie: 15n, offset: BigInt(GiB), errno: 0 });
      // block status of the whole 8 GiB: one BLOCK_STATUS_EXT (6) chunk, a count, 64-bit descriptors
      c.requestExt(CMD.BLOCK_STATUS, 0, 8 * GiB, 0, 16n);
      const bs = await c.chunkExt();
      expect(bs).toMatchObject({ flags: DONE, type: 6, cookie: 16n, offset: 0n });
      expect(bs.payload.readUInt32BE(0)).toBe(1); // base:allocation's id
      const count = bs.payload.readUInt32BE(4);
      expect(bs.payload.length).toBe(8 + count * 16);
      const desc = Array.from({ length: count }, (_, i) => [Number(bs.payload.readBigUInt64BE(8 + i * 16)), Number(bs.payload.readBigUInt64BE(16 + i * 16))] as const);
      expect(desc.reduce((n, [len]) => n + len, 0)).toBe(8 * GiB);
      // the data at 0 and 2 MiB, holes between; from 1 GiB on, zeros (and holes) to the end: one extent longer than 32 bits
      expect(desc[0]).toEqual([1 << 20, 0]);
      expect(desc.some(([len, flags]) => len > 2 ** 32 && flags === 3)).toBe(true);
      // refusals: a read over the maximum block, an offset past the end (echoed exactly, past 2^53)
      c.requestExt(CMD.READ, 0, 32 * 2 ** 20 + 1, 0, 17n);
      expect(await c.chunkExt()).toMatchObject({ cookie: 17n, errno: 75 });
      c.requestExt(CMD.READ, 2n ** 60n + 1n, 512, 0, 18n);
      expect(await c.chunkExt()).toMatchObject({ cookie: 18n, offset: 2n ** 60n + 1n, errno: 22 });
      c.requestExt(CMD.FLUSH, 0, 0, 0, 19n);
      expect(await c.chunkExt()).toMatchObject({ cookie: 19n, errno: 0 });
      // a compact request on an extended connection (its 28 bytes and 4 more, as the server reads 32): the connection ends
      c.request(CMD.FLUSH, 0, 0);
      c.s.write(Buffer.alloc(4));
      expect(await c.closedByServer()).toBe(true);
      // a payload over the maximum on a fresh connection: the connection ends too (the length could be anything)
      const c2 = await RawClient.connect(sock);
      await c2.goExtended([]);
      c2.requestExt(CMD.WRITE, 0, 2n ** 40n, PAYLOAD_LEN, 20n);
      expect(await c2.closedByServer()).toBe(true);
    } finally {
      await srv.close();
      await img.close();
    }
    const after = await Image.open(f);
    try {
      expect(Buffer.from(await after.read(0, 1 << 20)).equals(Buffer.alloc(1 << 20, 5))).toBe(true);
      expect(Buffer.from(await after.read(2 << 20, 65536)).equals(Buffer.alloc(65536, 0xab))).toBe(true);
      expect(Buffer.from(await after.read(3 * GiB, 65536)).equals(Buffer.alloc(65536))).toBe(true);
    } finally {
      await after.close();
    }
    expect(qemuImg(['check', f])).toMatch(/No errors were found/);
  }, 60_000);
});
