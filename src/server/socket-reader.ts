/**
 * Exact-length reads from a stream socket: `read(n)` resolves with the next
 * n bytes, in order, and rejects once the peer has gone (end, error or
 * close) before they all came. A reader holds at most a few MiB beyond
 * what a pending read asks for: past that the socket is paused, so a client
 * that sends faster than the server handles gets back-pressure, not
 * unbounded buffering.
 */

import type { Socket } from 'node:net';

export class PeerGone extends Error {
  constructor(message = 'the client disconnected') {
    super(message);
  }
}

/** Bytes read ahead of what was asked before the socket is paused (pausing at every read costs a round per request). */
const MAX_BUFFERED = 4 * 1024 * 1024;

export class SocketReader {
  private chunks: Buffer[] = [];
  private have = 0;
  private want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private gone: Error | undefined;
  /** where readPooled's joined bytes go, and whether the last read joined into it */
  private joinInto: { get(n: number): Uint8Array } | undefined;
  private joined = false;

  /** what this reader listens to, so that detach() can let go */
  private readonly listeners: Array<[string, (...a: any[]) => void]>;

  constructor(private readonly socket: Socket) {
    socket.pause();
    const end = (e?: Error) => {
      this.gone ??= e ?? new PeerGone();
      this.serve();
    };
    this.listeners = [
      ['data', (c: Buffer) => {
        this.chunks.push(c);
        this.have += c.length;
        this.serve();
      }],
      ['end', () => end()],
      ['close', () => end()],
      ['error', (e: Error) => end(new PeerGone(`the connection failed: ${e.message}`))],
    ];
    for (const [ev, f] of this.listeners) socket.on(ev, f);
  }

  /**
   * Stop reading the socket (another reader takes it over: TLS after
   * STARTTLS). Bytes already read past the last request are a client that
   * did not wait for the reply: refused.
   */
  detach(): void {
    for (const [ev, f] of this.listeners) this.socket.off(ev, f);
    this.socket.pause();
    if (this.have > 0) throw new Error('data after NBD_OPT_STARTTLS before its reply');
  }

  /** The next `n` bytes. */
  read(n: number): Promise<Buffer> {
    if (this.want) return Promise.reject(new Error('SocketReader: one read at a time'));
    return new Promise((resolve, reject) => {
      this.want = { n, resolve, reject };
      this.serve();
    });
  }

  /**
   * The next `n` bytes, as `read` gives them, except that bytes spread over
   * several socket chunks are joined into a buffer from `pool` (`pooled`
   * true: the caller gives it back once done with it) instead of a fresh one
   * (a write payload of 256 KiB comes in 64 KiB chunks: a fresh buffer per
   * request cost page faults and garbage collection).
   */
  async readPooled(n: number, pool: { get(n: number): Uint8Array }): Promise<{ data: Uint8Array; pooled: boolean }> {
    this.joinInto = pool;
    try {
      const data = await this.read(n);
      const pooled = this.joined;
      this.joined = false;
      return { data, pooled };
    } finally {
      this.joinInto = undefined;
    }
  }

  /** Read and drop `n` bytes, a chunk at a time (a payload the server refuses). */
  async skip(n: number): Promise<void> {
    for (let left = n; left > 0; ) {
      const k = Math.min(left, 1 << 20);
      await this.read(k);
      left -= k;
    }
  }

  private serve(): void {
    const w = this.want;
    if (!w) {
      if (this.have > MAX_BUFFERED) this.socket.pause();
      return;
    }
    if (this.have >= w.n) {
      this.want = undefined;
      w.resolve(this.take(w.n));
      if (this.have > MAX_BUFFERED) this.socket.pause();
      return;
    }
    if (this.gone) {
      this.want = undefined;
      w.reject(this.gone);
      return;
    }
    this.socket.resume();
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length >= n) {
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.have -= n;
      return out;
    }
    const into = this.joinInto?.get(n);
    this.joined = into !== undefined;
    const out = into ? Buffer.from(into.buffer, into.byteOffset, n) : Buffer.allocUnsafe(n);
    let o = 0;
    while (o < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - o);
      c.copy(out, o, 0, k);
      o += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.have -= n;
    return out;
  }
}
