/**
 * Reusable reply buffers for the NBD server's reads. A fresh 256 KiB
 * buffer per read costs the kernel a page fault per page on first touch
 * and V8 a garbage collection every few hundred MiB of external memory
 * (a fifth of the server's CPU for a 1 GiB copy out); a buffer handed back
 * once the socket has taken its bytes is reused instead. Buffers come in
 * power-of-two capacities, and the pool keeps at most `limit` bytes idle.
 */

import { uninitialized } from '../format/bytes.ts';

/** Capacities below this are not pooled: small buffers are cheap and come from V8's own pool. */
const MIN_POOLED = 16 * 1024;

export class BufferPool {
  /** idle buffers by capacity, each a view of its whole capacity (uninitialized may start it inside its ArrayBuffer) */
  private readonly free = new Map<number, Uint8Array[]>();
  private idle = 0;

  constructor(private readonly limit = 32 * 1024 * 1024) {}

  /** A buffer of `length` bytes, not zeroed: the caller writes every byte it sends. */
  get(length: number): Uint8Array {
    if (length < MIN_POOLED) return new Uint8Array(length);
    const cap = capacityOf(length);
    const list = this.free.get(cap);
    const whole = list?.pop();
    if (whole) {
      this.idle -= cap;
      return whole.subarray(0, length);
    }
    return uninitialized(cap).subarray(0, length);
  }

  /** `b` (from get) is no longer used by anyone. */
  release(b: Uint8Array): void {
    const cap = capacityOf(b.byteLength);
    // a buffer that did not come from get (too short behind its view to hold its capacity) is left alone
    if (b.byteLength < MIN_POOLED || b.byteOffset + cap > b.buffer.byteLength || this.idle + cap > this.limit) return;
    let list = this.free.get(cap);
    if (!list) this.free.set(cap, (list = []));
    list.push(new Uint8Array(b.buffer, b.byteOffset, cap));
    this.idle += cap;
  }

  /** bytes held idle (tests) */
  get idleBytes(): number {
    return this.idle;
  }
}

function capacityOf(n: number): number {
  return 2 ** Math.ceil(Math.log2(Math.max(n, MIN_POOLED)));
}
