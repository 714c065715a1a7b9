/**
 * The bytes of an NBD connection's replies in the transmission phase, in the
 * style its handshake negotiated:
 *
 *   simple      no STRUCTURED_REPLY: 16-byte replies, a read's data after one
 *   structured  STRUCTURED_REPLY: 20-byte chunk headers, 32-bit block status
 *               descriptors (NBD_REPLY_TYPE_BLOCK_STATUS); a reply without
 *               payload may still be simple
 *   extended    EXTENDED_HEADERS: 32-byte chunk headers that repeat the
 *               request's offset and carry a 64-bit length, every reply a
 *               chunk (never simple), 64-bit descriptors with a count
 *               (NBD_REPLY_TYPE_BLOCK_STATUS_EXT)
 *
 * The payloads of OFFSET_DATA, OFFSET_HOLE and the error chunks are the same
 * in both chunked styles.
 */

import {
  CMD, EXTENDED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE, STRUCTURED_REPLY_MAGIC, simpleReply, type Request,
} from './nbd-protocol.ts';

export type ReplyStyle = 'simple' | 'structured' | 'extended';

export class Replies {
  style: ReplyStyle = 'simple';

  /** replies come in chunks (structured or extended) */
  get chunked(): boolean {
    return this.style !== 'simple';
  }

  /** the longest extent one block status descriptor can describe */
  get maxExtent(): number {
    return this.style === 'extended' ? Number.MAX_SAFE_INTEGER : 0xffff_ffff;
  }

  /** A chunk header of `req`'s reply for a payload of `length` bytes. */
  header(flags: number, type: number, req: Request, length: number): Buffer {
    if (this.style === 'extended') {
      const b = Buffer.allocUnsafe(32);
      b.writeUInt32BE(EXTENDED_REPLY_MAGIC, 0);
      b.writeUInt16BE(flags, 4);
      b.writeUInt16BE(type, 6);
      b.writeBigUInt64BE(req.cookie, 8);
      b.writeBigUInt64BE(req.exactOffset, 16);
      b.writeBigUInt64BE(BigInt(length), 24);
      return b;
    }
    const b = Buffer.allocUnsafe(20);
    b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
    b.writeUInt16BE(flags, 4);
    b.writeUInt16BE(type, 6);
    b.writeBigUInt64BE(req.cookie, 8);
    b.writeUInt32BE(length, 16);
    return b;
  }

  /** The whole reply to a request that succeeded with nothing to send. */
  done(req: Request): Buffer[] {
    // structured replies may answer a payload-less success simply; extended ones never do
    return this.style === 'extended' ? [this.header(REPLY_FLAG_DONE, REPLY_TYPE.NONE, req, 0)] : [simpleReply(0, req.cookie)];
  }

  /**
   * The whole reply to a request that failed: an error chunk where chunks
   * are the rule (extended), or for a READ or BLOCK_STATUS with structured
   * replies (whose other replies may be simple); a simple reply otherwise.
   */
  error(req: Request, errno: number, message: string): Buffer[] {
    const chunk = this.style === 'extended' || (this.style === 'structured' && (req.type === CMD.READ || req.type === CMD.BLOCK_STATUS));
    if (!chunk) return [simpleReply(errno, req.cookie)];
    const text = Buffer.from(message.slice(0, 4096), 'utf8');
    const payload = Buffer.allocUnsafe(6 + text.length);
    payload.writeUInt32BE(errno, 0);
    payload.writeUInt16BE(text.length, 4);
    payload.set(text, 6);
    return [this.header(REPLY_FLAG_DONE, REPLY_TYPE.ERROR, req, payload.length), payload];
  }

  /** One block status chunk: context `id`'s descriptors `desc` (length, flags pairs). */
  blockStatus(req: Request, id: number, desc: readonly number[], last: boolean): Buffer[] {
    const flags = last ? REPLY_FLAG_DONE : 0;
    const n = desc.length / 2;
    if (this.style === 'extended') {
      const payload = Buffer.allocUnsafe(8 + n * 16);
      payload.writeUInt32BE(id, 0);
      payload.writeUInt32BE(n, 4);
      for (let i = 0; i < n; i++) {
        payload.writeBigUInt64BE(BigInt(desc[2 * i]!), 8 + i * 16);
        payload.writeBigUInt64BE(BigInt(desc[2 * i + 1]!), 16 + i * 16);
      }
      return [this.header(flags, REPLY_TYPE.BLOCK_STATUS_EXT, req, payload.length), payload];
    }
    const payload = Buffer.allocUnsafe(4 + n * 8);
    payload.writeUInt32BE(id, 0);
    for (let i = 0; i < desc.length; i++) payload.writeUInt32BE(desc[i]!, 4 + i * 4);
    return [this.header(flags, REPLY_TYPE.BLOCK_STATUS, req, payload.length), payload];
  }
}
