// The NBD server's reply buffer pool: reuse after release, the idle bound, small buffers not pooled.
import { describe, expect, it } from 'vitest';
import { BufferPool } from '../src/server/buffer-pool.ts';

describe('BufferPool', () => {
  it('hands a released buffer out again, at most `limit` bytes idle, small ones unpooled', () => {
    const pool = new BufferPool(1 << 20);
    const a = pool.get(256 * 1024);
    expect(a.length).toBe(256 * 1024);
    pool.release(a);
    expect(pool.idleBytes).toBe(256 * 1024);
    const b = pool.get(200 * 1024);
    expect(b.buffer).toBe(a.buffer);
    expect(b.length).toBe(200 * 1024);
    expect(pool.idleBytes).toBe(0);
    const many = Array.from({ length: 6 }, () => pool.get(256 * 1024));
    for (const m of many) pool.release(m);
    expect(pool.idleBytes).toBe(1 << 20);
    const small = pool.get(100);
    pool.release(small);
    expect(pool.idleBytes).toBe(1 << 20);
  });
});
