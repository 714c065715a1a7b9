/**
 * A minimal NBD client over a raw socket, for the tests of bad clients and of
 * what no client in Debian 12 speaks (extended headers): exact reads, the
 * fixed newstyle handshake up to GO, requests and replies in the compact,
 * structured and extended styles. Written from the protocol document.
 */

import { createConnection, type Socket } from 'node:net';
import { expect } from 'vitest';

/** A minimal client: exact reads, and the fixed newstyle handshake up to GO with structured replies. */
export class RawClient {
  private buf = Buffer.alloc(0);
  private waiters: Array<() => void> = [];
  ended = false;
  constructor(readonly s: Socket) {
    s.on('data', (c) => {
      this.buf = Buffer.concat([this.buf, c]);
      this.waiters.splice(0).forEach((w) => w());
    });
    s.on('close', () => {
      this.ended = true;
      this.waiters.splice(0).forEach((w) => w());
    });
    s.on('error', () => undefined);
  }
  static async connect(sock: string): Promise<RawClient> {
    const s = createConnection(sock);
    await new Promise((r) => s.once('connect', r));
    return new RawClient(s);
  }
  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.ended) throw new Error('closed');
      await new Promise<void>((r) => this.waiters.push(r));
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }
  /** resolves true once the server has closed the connection */
  async closedByServer(): Promise<boolean> {
    for (let i = 0; i < 100 && !this.ended; i++) await new Promise((r) => setTimeout(r, 20));
    return this.ended;
  }
  option(opt: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(0x49484156454f5054n, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    this.s.write(Buffer.concat([h, data]));
  }
  async optionReply(): Promise<{ type: number; data: Buffer }> {
    const h = await this.read(20);
    return { type: h.readUInt32BE(12), data: await this.read(h.readUInt32BE(16)) };
  }
  async hello(flags = 3): Promise<void> {
    await this.read(18);
    const f = Buffer.alloc(4);
    f.writeUInt32BE(flags, 0);
    this.s.write(f);
  }
  /** up to transmission: structured replies, base:allocation, GO */
  async go(): Promise<void> {
    await this.negotiate([8], ['base:allocation']);
  }
  /** Up to transmission with extended headers (after structured replies when `structuredFirst`), selecting `contexts`. */
  async goExtended(contexts: string[] = ['base:allocation'], structuredFirst = false): Promise<void> {
    await this.negotiate(structuredFirst ? [8, 11] : [11], contexts);
  }
  /** The handshake: each option of `styles` acknowledged, SET_META_CONTEXT for `contexts` (if any), GO. */
  private async negotiate(styles: number[], contexts: string[]): Promise<void> {
    await this.hello();
    for (const opt of styles) {
      this.option(opt);
      expect((await this.optionReply()).type).toBe(1);
    }
    if (contexts.length) {
      const parts = contexts.map((c) => Buffer.from(c));
      const q = Buffer.alloc(8 + parts.reduce((n, p) => n + 4 + p.length, 0));
      q.writeUInt32BE(0, 0);
      q.writeUInt32BE(parts.length, 4);
      let o = 8;
      for (const p of parts) {
        q.writeUInt32BE(p.length, o);
        p.copy(q, o + 4);
        o += 4 + p.length;
      }
      this.option(10, q);
      for (let i = 0; i < contexts.length; i++) expect((await this.optionReply()).type).toBe(4);
      expect((await this.optionReply()).type).toBe(1);
    }
    this.option(7, Buffer.from([0, 0, 0, 0, 0, 0]));
    for (;;) {
      const r = await this.optionReply();
      if (r.type === 1) break;
      expect(r.type).toBe(3);
    }
  }
  request(type: number, offset: number, length: number, flags = 0, cookie = 1n, payload?: Buffer): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    this.s.write(payload ? Buffer.concat([h, payload]) : h);
  }
  /** the last structured chunk's payload */
  payload: Buffer = Buffer.alloc(0);
  /** a simple reply's errno, or a structured chunk's (0: success; its payload in `payload`) */
  async error(): Promise<number> {
    const m = (await this.read(4)).readUInt32BE(0);
    if (m === 0x67446698) {
      const r = await this.read(12);
      return r.readUInt32BE(0);
    }
    expect(m).toBe(0x668e33ef);
    const h = await this.read(16);
    const type = h.readUInt16BE(2);
    const payload = await this.read(h.readUInt32BE(12));
    this.payload = payload;
    return type & 0x8000 ? payload.readUInt32BE(0) : 0;
  }
  /** An extended request (32 bytes: a 64-bit length); PAYLOAD_LEN is the caller's to set. */
  requestExt(type: number, offset: bigint | number, length: bigint | number, flags = 0, cookie = 1n, payload?: Buffer): void {
    const h = Buffer.alloc(32);
    h.writeUInt32BE(0x21e41c71, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeBigUInt64BE(BigInt(length), 24);
    this.s.write(payload ? Buffer.concat([h, payload]) : h);
  }
  /** One extended reply chunk: it must carry the extended magic. */
  async chunkExt(): Promise<{ flags: number; type: number; cookie: bigint; offset: bigint; payload: Buffer; errno: number }> {
    const h = await this.read(32);
    expect(h.readUInt32BE(0)).toBe(0x6e8a278c);
    const length = h.readBigUInt64BE(24);
    expect(length < 1n << 32n).toBe(true);
    const payload = await this.read(Number(length));
    const type = h.readUInt16BE(6);
    return { flags: h.readUInt16BE(4), type, cookie: h.readBigUInt64BE(8), offset: h.readBigUInt64BE(16), payload, errno: type & 0x8000 ? payload.readUInt32BE(0) : 0 };
  }
  end(): void {
    this.s.destroy();
  }
}

