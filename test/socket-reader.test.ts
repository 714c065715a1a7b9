// The NBD server's socket reader: exact-length reads; a payload spread over socket chunks is joined into a pooled buffer.
import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import { describe, expect, it } from 'vitest';
import { BufferPool } from '../src/server/buffer-pool.ts';
import { PeerGone, SocketReader } from '../src/server/socket-reader.ts';

function fakeSocket(): Socket & EventEmitter {
  const s = new EventEmitter() as Socket & EventEmitter;
  s.pause = () => s;
  s.resume = () => s;
  return s;
}

describe('SocketReader', () => {
  it('joins a payload of several chunks into a pooled buffer, gives one chunk as it came, and keeps what follows', async () => {
    const s = fakeSocket();
    const r = new SocketReader(s);
    const pool = new BufferPool();
    const bytes = Buffer.from(Array.from({ length: 350 * 1024 + 7 }, (_, i) => (i * 31) & 0xff));
    // 64 KiB chunks as a Unix socket delivers them; the payload ends inside the last one
    for (let at = 0; at < bytes.length; at += 65536) s.emit('data', bytes.subarray(at, at + 65536));
    const a = await r.readPooled(150 * 1024, pool);
    expect(a.pooled).toBe(true);
    expect(Buffer.from(a.data).equals(bytes.subarray(0, 150 * 1024))).toBe(true);
    pool.release(a.data);
    expect(pool.idleBytes).toBe(256 * 1024);
    // a pooled buffer comes back for the next joined payload
    const b = await r.readPooled(200 * 1024, pool);
    expect(b.pooled).toBe(true);
    expect(b.data.buffer === a.data.buffer).toBe(true);
    expect(Buffer.from(b.data).equals(bytes.subarray(150 * 1024, 350 * 1024))).toBe(true);
    // bytes inside one chunk: a view of it, not the pool's (the pool must never take a socket's memory)
    const c = await r.read(7);
    expect(Buffer.from(c).equals(bytes.subarray(350 * 1024))).toBe(true);
    s.emit('data', Buffer.alloc(4096, 9));
    const d = await r.readPooled(4096, pool);
    expect(d.pooled).toBe(false);
    expect(Buffer.from(d.data).equals(Buffer.alloc(4096, 9))).toBe(true);
    // the peer gone before a read is complete: the read is refused
    s.emit('data', Buffer.alloc(10));
    const e = r.readPooled(20, pool);
    s.emit('end');
    await expect(e).rejects.toBeInstanceOf(PeerGone);
  });
});
