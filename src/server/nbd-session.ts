/**
 * One NBD connection: the fixed newstyle handshake (options EXPORT_NAME,
 * ABORT, LIST, INFO, GO, STRUCTURED_REPLY, EXTENDED_HEADERS, LIST_META_CONTEXT and
 * SET_META_CONTEXT with base:allocation, qemu:allocation-depth and
 * qemu:dirty-bitmap:NAME) and the transmission phase
 * (READ with structured replies and hole chunks, WRITE, FLUSH, TRIM,
 * WRITE_ZEROES, BLOCK_STATUS, CACHE, DISC), requests pipelined, each reply
 * sent whole when its request completes. Everything the client sends is
 * bad input until checked: a malformed header ends the connection, a bad
 * request gets the protocol's errno, and nothing reaches the backend unless
 * it is in range and allowed.
 */

import type { Socket } from 'node:net';
import { QledgerError } from '../errors.ts';
import {
  CF, CMD, ERRNO, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO, MAX_OPTION_BYTES, NBDMAGIC, OPT, REP, REPLY_FLAG_DONE, REPLY_TYPE,
  TF, decodeExtendedRequest, decodeRequest, infoBlockSize, infoExport, infoString, optionError, optionReply, simpleReply, type Request,
} from './nbd-protocol.ts';
import { Replies } from './nbd-replies.ts';
import { contextNames, extentsOf } from './nbd-extents.ts';
import { BufferPool } from './buffer-pool.ts';
import { PeerGone, SocketReader } from './socket-reader.ts';
import { upgrade, type NbdTls } from './nbd-tls.ts';

/** What an export serves from: an image through the library (nbd-server.ts adapts `Image`). */
export interface NbdBackend {
  readonly size: number;
  readonly readOnly: boolean;
  read(offset: number, length: number): Promise<Uint8Array>;
  /** fill `out` with the bytes at `offset` (a server's read into a reused buffer); read() where absent */
  readonly readInto?: ((offset: number, out: Uint8Array) => Promise<void>) | undefined;
  write(offset: number, data: Uint8Array): Promise<void>;
  writeZeroes(offset: number, length: number, unmap: boolean): Promise<void>;
  trim(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  /** the run at `offset` (at most `length` bytes): whether it reads as zero, and whether it holds no data */
  status(offset: number, length: number): Promise<{ length: number; hole: boolean; zero: boolean }>;
  /** qemu:allocation-depth (qemu-nbd -A): the run at `offset` and its depth (0: unallocated in the whole chain, 1: this image, 2: its backing file, …) */
  readonly depth?: ((offset: number, length: number) => Promise<{ length: number; depth: number }>) | undefined;
  /** the dirty bitmaps exported as qemu:dirty-bitmap:NAME contexts (qemu-nbd -B) */
  readonly bitmaps?: readonly string[] | undefined;
  /** bitmap `name`'s dirty extents [start, end) meeting [offset, offset + length), in order */
  dirty?(name: string, offset: number, length: number): Promise<ReadonlyArray<readonly [number, number]>>;
}

export interface NbdExport {
  readonly name: string;
  readonly description?: string | undefined;
  readonly backend: NbdBackend;
  /** block sizes advertised: minimum, preferred, maximum (the largest request payload) */
  readonly minBlock: number;
  readonly preferredBlock: number;
  readonly maxBlock: number;
}

export interface SessionOptions {
  /** the handshake must end within this many milliseconds (qemu-nbd's --handshake-limit) */
  readonly handshakeMs: number;
  /** at most this many requests in flight per connection (more wait in the socket) */
  readonly maxInFlight: number;
  /** a line about what went wrong with this client (not its normal end) */
  readonly log?: ((line: string) => void) | undefined;
  /** more than one connection is let in at once: CAN_MULTI_CONN is advertised */
  readonly multiConn?: boolean | undefined;
  /** TLS credentials: the client must negotiate TLS (NBD_OPT_STARTTLS) before anything else, as with qemu-nbd --tls-creds */
  readonly tls?: NbdTls | undefined;
}

/** Options a client may send before it is cut off (a loop of LIST is not a way to hold a connection). */
const MAX_OPTIONS = 1000;
/** Reply bytes queued on a socket before the session stops reading requests. */
const MAX_QUEUED_REPLY_BYTES = 64 * 1024 * 1024;
const ACK = REP.ACK;

export class NbdSession {
  private reader: SocketReader;
  /** the connection: the client's socket, then the TLS socket over it once STARTTLS has been negotiated */
  private socket: Socket;
  private secure = false;
  /** the reply style negotiated: simple, structured (STRUCTURED_REPLY) or extended (EXTENDED_HEADERS) */
  private readonly replies = new Replies();
  /** the metadata contexts SET_META_CONTEXT selected, by id (1: base:allocation, 2 + k: the k-th exported bitmap) */
  private contexts: number[] = [];
  private noZeroes = false;
  private inFlight = 0;
  private slot: (() => void) | undefined;
  private drainWaiter: (() => void) | undefined;
  private closed = false;
  /** read replies' buffers, reused */
  private readonly pool = new BufferPool();

  constructor(
    socket: Socket,
    private readonly exp: NbdExport,
    private readonly o: SessionOptions,
  ) {
    this.socket = socket;
    this.reader = new SocketReader(socket);
    socket.setNoDelay(true);
    this.unwatch = this.watch(socket);
  }

  /** Follow `socket`'s drain and close; the function returned lets go of it again. */
  private watch(socket: Socket): () => void {
    const drain = () => {
      const w = this.drainWaiter;
      this.drainWaiter = undefined;
      w?.();
    };
    const close = () => {
      this.closed = true;
      this.drainWaiter?.();
    };
    socket.on('drain', drain);
    socket.on('close', close);
    return () => {
      socket.off('drain', drain);
      socket.off('close', close);
    };
  }
  private unwatch: (() => void) | undefined;

  /** Serve the connection to its end; never rejects (a client's failure is not the server's). */
  async run(): Promise<void> {
    try {
      const timer = setTimeout(() => {
        this.o.log?.('handshake not completed in time: connection closed');
        this.socket.destroy();
      }, this.o.handshakeMs);
      let go: boolean;
      try {
        go = await this.handshake();
      } finally {
        clearTimeout(timer);
      }
      if (go) await this.transmission();
    } catch (e) {
      if (!(e instanceof PeerGone)) this.o.log?.(`connection closed: ${(e as Error).message}`);
    } finally {
      await this.settled();
      this.socket.end();
      this.socket.destroySoon?.();
    }
  }

  // ---- handshake -----------------------------------------------------------

  private async handshake(): Promise<boolean> {
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(NBDMAGIC, 0);
    hello.writeBigUInt64BE(IHAVEOPT, 8);
    hello.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
    this.send([hello]);
    const flags = (await this.reader.read(4)).readUInt32BE(0);
    if ((flags & FLAG_C_FIXED_NEWSTYLE) === 0 || (flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)) !== 0) {
      throw new Error(`client flags 0x${flags.toString(16)}: only the fixed newstyle handshake is served`);
    }
    this.noZeroes = (flags & FLAG_C_NO_ZEROES) !== 0;
    for (let n = 0; n < MAX_OPTIONS; n++) {
      const h = await this.reader.read(16);
      if (h.readBigUInt64BE(0) !== IHAVEOPT) throw new Error('option request without the IHAVEOPT magic');
      const option = h.readUInt32BE(8);
      const length = h.readUInt32BE(12);
      if (length > MAX_OPTION_BYTES) throw new Error(`option ${option} of ${length} bytes is over the ${MAX_OPTION_BYTES}-byte limit`);
      const data = await this.reader.read(length);
      const r = this.option(option, data);
      if (r === 'go') return true;
      if (r === 'abort') return false;
      if (r === 'starttls') await this.startTls();
    }
    throw new Error(`more than ${MAX_OPTIONS} options`);
  }

  /**
   * The rest of the handshake over TLS: the client's ClientHello follows the
   * acknowledgement at once, so nothing it sent can be waiting in the reader.
   */
  private async startTls(): Promise<void> {
    const raw = this.socket;
    this.reader.detach();
    this.unwatch?.();
    // the ACK must leave in the clear, before the TLS socket takes the connection
    await new Promise<void>((resolve) => (raw.writableLength === 0 ? resolve() : raw.once('drain', () => resolve())));
    const { socket: secure, identity } = await upgrade(raw, this.o.tls!);
    // qemu-nbd --tls-authz: the client's identity decides, before any option is read over TLS
    const authz = this.o.tls!.authz;
    if (authz && (identity === undefined || !authz(identity))) {
      secure.destroy();
      throw new Error(`TLS ${this.o.tls!.kind === 'psk' ? 'PSK' : 'x509'} authz check for ${identity ?? '(no identity)'} is denied`);
    }
    this.socket = secure;
    this.secure = true;
    this.reader = new SocketReader(secure);
    this.unwatch = this.watch(secure);
  }

  /** One option: its replies sent; 'go' enters transmission, 'abort' ends the connection, 'starttls' upgrades it. */
  private option(option: number, data: Buffer): 'go' | 'abort' | 'more' | 'starttls' {
    const exp = this.exp;
    // with TLS configured, only STARTTLS and ABORT before TLS (qemu-nbd: ERR_TLS_REQD; EXPORT_NAME has no error reply)
    if (this.o.tls && !this.secure && option !== OPT.STARTTLS && option !== OPT.ABORT) {
      if (option === OPT.EXPORT_NAME) throw new Error('NBD_OPT_EXPORT_NAME before TLS: connection closed');
      return this.reject(option, REP.ERR_TLS_REQD, 'Option not permitted before TLS');
    }
    switch (option) {
      case OPT.EXPORT_NAME: {
        // no error reply exists for this option: an unknown name ends the connection, and so does the
        // option after EXTENDED_HEADERS (which only GO may follow into transmission)
        if (this.replies.style === 'extended') throw new Error('NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS');
        if (data.toString('utf8') !== exp.name) throw new Error(`no export named '${data.toString('utf8')}'`);
        const b = Buffer.alloc(this.noZeroes ? 10 : 134);
        b.writeBigUInt64BE(BigInt(exp.backend.size), 0);
        b.writeUInt16BE(this.flags(), 8);
        this.send([b]);
        return 'go';
      }
      case OPT.ABORT:
        this.send([optionReply(option, ACK)]);
        return 'abort';
      case OPT.LIST: {
        if (data.length !== 0) return this.reject(option, REP.ERR_INVALID, 'NBD_OPT_LIST takes no data');
        const name = Buffer.from(exp.name, 'utf8');
        const d = Buffer.alloc(4 + name.length);
        d.writeUInt32BE(name.length, 0);
        d.set(name, 4);
        this.send([optionReply(option, REP.SERVER, d), optionReply(option, ACK)]);
        return 'more';
      }
      case OPT.STARTTLS:
        if (!this.o.tls) return this.reject(option, REP.ERR_POLICY, 'TLS not configured');
        if (this.secure) return this.reject(option, REP.ERR_INVALID, 'TLS already enabled');
        if (data.length !== 0) return this.reject(option, REP.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
        this.send([optionReply(option, ACK)]);
        return 'starttls';
      case OPT.INFO:
      case OPT.GO:
        return this.infoOrGo(option, data);
      case OPT.STRUCTURED_REPLY:
        if (data.length !== 0) return this.reject(option, REP.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        if (this.replies.style === 'extended') return this.reject(option, REP.ERR_EXT_HEADER_REQD, 'extended headers are already negotiated');
        if (this.replies.style === 'structured') return this.reject(option, REP.ERR_INVALID, 'structured replies are already negotiated');
        this.replies.style = 'structured';
        this.send([optionReply(option, ACK)]);
        return 'more';
      case OPT.EXTENDED_HEADERS:
        // 32-byte requests and replies with 64-bit lengths; they take the place of structured replies
        if (data.length !== 0) return this.reject(option, REP.ERR_INVALID, 'NBD_OPT_EXTENDED_HEADERS takes no data');
        if (this.replies.style === 'extended') return this.reject(option, REP.ERR_INVALID, 'extended headers are already negotiated');
        this.replies.style = 'extended';
        this.send([optionReply(option, ACK)]);
        return 'more';
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT:
        return this.metaContext(option, data);
      default:
        return this.reject(option, REP.ERR_UNSUP, `option ${option} is not supported`);
    }
  }

  private reject(option: number, type: number, message: string): 'more' {
    this.send([optionError(option, type, message)]);
    return 'more';
  }

  /** NBD_OPT_INFO and NBD_OPT_GO: u32 name length, name, u16 count, count × u16 info requests. */
  private infoOrGo(option: number, data: Buffer): 'go' | 'more' {
    if (data.length < 6) return this.reject(option, REP.ERR_INVALID, 'request too short');
    const nameLen = data.readUInt32BE(0);
    if (nameLen > data.length - 6) return this.reject(option, REP.ERR_INVALID, 'name length past the request');
    const name = data.subarray(4, 4 + nameLen).toString('utf8');
    const count = data.readUInt16BE(4 + nameLen);
    if (data.length !== 6 + nameLen + 2 * count) return this.reject(option, REP.ERR_INVALID, 'request length does not match its info requests');
    if (name !== this.exp.name) return this.reject(option, REP.ERR_UNKNOWN, `no export named '${name}'`);
    const asked = new Set<number>();
    for (let i = 0; i < count; i++) asked.add(data.readUInt16BE(6 + nameLen + 2 * i));
    const out = [optionReply(option, REP.INFO, infoExport(this.exp.backend.size, this.flags()))];
    if (asked.has(INFO.NAME)) out.push(optionReply(option, REP.INFO, infoString(INFO.NAME, this.exp.name)));
    if (asked.has(INFO.DESCRIPTION) && this.exp.description !== undefined) out.push(optionReply(option, REP.INFO, infoString(INFO.DESCRIPTION, this.exp.description)));
    out.push(optionReply(option, REP.INFO, infoBlockSize(this.exp.minBlock, this.exp.preferredBlock, this.exp.maxBlock)));
    out.push(optionReply(option, ACK));
    this.send(out);
    return option === OPT.GO ? 'go' : 'more';
  }

  /** LIST_META_CONTEXT / SET_META_CONTEXT: u32 name length, name, u32 count, count × (u32 length, query). */
  private metaContext(option: number, data: Buffer): 'more' {
    const set = option === OPT.SET_META_CONTEXT;
    if (set && !this.replies.chunked) return this.reject(option, REP.ERR_INVALID, 'metadata contexts need structured replies or extended headers first');
    if (data.length < 8) return this.reject(option, REP.ERR_INVALID, 'request too short');
    const nameLen = data.readUInt32BE(0);
    if (nameLen > data.length - 8) return this.reject(option, REP.ERR_INVALID, 'name length past the request');
    const name = data.subarray(4, 4 + nameLen).toString('utf8');
    const count = data.readUInt32BE(4 + nameLen);
    const queries: string[] = [];
    let o = 8 + nameLen;
    for (let i = 0; i < count; i++) {
      if (o + 4 > data.length) return this.reject(option, REP.ERR_INVALID, 'query past the request');
      const n = data.readUInt32BE(o);
      if (n > data.length - o - 4) return this.reject(option, REP.ERR_INVALID, 'query past the request');
      queries.push(data.subarray(o + 4, o + 4 + n).toString('utf8'));
      o += 4 + n;
    }
    if (o !== data.length) return this.reject(option, REP.ERR_INVALID, 'request length does not match its queries');
    if (name !== this.exp.name) return this.reject(option, REP.ERR_UNKNOWN, `no export named '${name}'`);
    // contexts asked by name; LIST also answers a namespace ("base:", "qemu:", "qemu:dirty-bitmap:") and no query at all
    const names = this.contextNames();
    const matches = (n: string) => queries.includes(n) || (!set && (queries.length === 0 || queries.some((q) => q.endsWith(':') && n.startsWith(q))));
    const wanted = names.flatMap((n, i) => (matches(n) ? [i + 1] : []));
    const out: Buffer[] = [];
    if (set) this.contexts = wanted;
    for (const id of wanted) {
      const ctx = Buffer.from(names[id - 1]!, 'utf8');
      const d = Buffer.alloc(4 + ctx.length);
      d.writeUInt32BE(set ? id : 0, 0);
      d.set(ctx, 4);
      out.push(optionReply(option, REP.META_CONTEXT, d));
    }
    out.push(optionReply(option, ACK));
    this.send(out);
    return 'more';
  }

  /** The transmission flags of this export on this connection. */
  private flags(): number {
    // One backend behind every connection: a flush on any of them makes every completed write durable.
    // Advertised only where a second connection is let in (as qemu-nbd): a client that believed it
    // with -e 1 (nbdcopy) would open four and lose the three the server turns away.
    let f = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_CACHE | (this.o.multiConn ? TF.CAN_MULTI_CONN : 0);
    if (this.exp.backend.readOnly) f |= TF.READ_ONLY;
    else f |= TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO;
    if (this.replies.chunked) f |= TF.SEND_DF;
    return f;
  }

  // ---- transmission ----------------------------------------------------------

  private async transmission(): Promise<void> {
    this.inTransmission = true;
    for (;;) {
      await this.room();
      const extended = this.replies.style === 'extended';
      const req = extended ? decodeExtendedRequest(await this.reader.read(32)) : decodeRequest(await this.reader.read(28));
      if (!req) throw new Error(extended ? 'request without the extended request magic' : 'request without the request magic');
      if (req.type === CMD.DISC) return; // in-flight requests finish first (run waits)
      let payload: Uint8Array | undefined;
      let pooled = false;
      // a payload follows a compact WRITE, and an extended request that says so (PAYLOAD_LEN: a WRITE must)
      const carries = extended ? (req.flags & CF.PAYLOAD_LEN) !== 0 : req.type === CMD.WRITE;
      if (extended && req.type === CMD.WRITE && !carries) {
        this.reply(req, ERRNO.EINVAL, 'an extended write without NBD_CMD_FLAG_PAYLOAD_LEN');
        continue;
      }
      if (carries) {
        if (req.length > this.exp.maxBlock) {
          // past the advertised maximum an extended client has broken the protocol (a 64-bit length
          // could be anything): disconnect; a compact write's payload is dropped in bounded pieces
          if (extended) throw new Error(`a payload of ${req.length} bytes is over the ${this.exp.maxBlock}-byte maximum`);
          await this.reader.skip(req.length);
          this.reply(req, ERRNO.EOVERFLOW, `write of ${req.length} bytes is over the ${this.exp.maxBlock}-byte maximum`);
          continue;
        }
        if (req.type !== CMD.WRITE) {
          // no other command takes a payload here (NBD_FLAG_BLOCK_STATUS_PAYLOAD is not advertised)
          await this.reader.skip(req.length);
          this.reply(req, ERRNO.EINVAL, `command ${req.type} takes no payload`);
          continue;
        }
        ({ data: payload, pooled } = await this.reader.readPooled(req.length, this.pool));
      }
      this.inFlight++;
      void this.handle(req, payload).finally(() => {
        // the engine has written the payload (or refused it): it keeps no reference past its promise
        if (pooled) this.pool.release(payload!);
        this.inFlight--;
        const s = this.slot;
        this.slot = undefined;
        s?.();
      });
    }
  }

  /**
   * Wait while too many requests are in flight or too many reply bytes wait
   * for the client to read them (a client that sends and never reads is held
   * there; one that reads is never slowed: a socket's own high-water mark,
   * 16 KiB, is below one read reply).
   */
  private async room(): Promise<void> {
    while (this.inFlight >= this.o.maxInFlight) await new Promise<void>((r) => (this.slot = r));
    while (this.socket.writableLength > MAX_QUEUED_REPLY_BYTES && !this.closed) await new Promise<void>((r) => (this.drainWaiter = r));
  }

  /** Every request in flight has finished (replies sent or dropped). */
  private async settled(): Promise<void> {
    while (this.inFlight > 0) await new Promise<void>((r) => (this.slot = r));
  }

  private async handle(req: Request, payload: Uint8Array | undefined): Promise<void> {
    const b = this.exp.backend;
    const known = CF.FUA | CF.NO_HOLE | CF.DF | CF.REQ_ONE | CF.FAST_ZERO | (this.replies.style === 'extended' ? CF.PAYLOAD_LEN : 0);
    if (req.flags & ~known) return this.reply(req, ERRNO.EINVAL, `unknown command flags 0x${req.flags.toString(16)}`);
    const writes = req.type === CMD.WRITE || req.type === CMD.TRIM || req.type === CMD.WRITE_ZEROES;
    if (req.type > CMD.BLOCK_STATUS || req.type === CMD.DISC) return this.reply(req, ERRNO.EINVAL, `unknown command ${req.type}`);
    if (writes && b.readOnly) return this.reply(req, ERRNO.EPERM, 'the export is read-only');
    if (req.type === CMD.READ && req.length > this.exp.maxBlock) return this.reply(req, ERRNO.EOVERFLOW, `read of ${req.length} bytes is over the ${this.exp.maxBlock}-byte maximum`);
    if (req.type !== CMD.FLUSH && (req.offset > b.size || req.length > b.size - req.offset)) {
      return this.reply(req, ERRNO.EINVAL, `range 0x${req.offset.toString(16)}+${req.length} is past the export's ${b.size} bytes`);
    }
    try {
      switch (req.type) {
        case CMD.READ:
          return await this.read(req);
        case CMD.WRITE:
          await b.write(req.offset, payload!);
          break;
        case CMD.FLUSH:
          await b.flush();
          break;
        case CMD.TRIM:
          await b.trim(req.offset, req.length);
          break;
        case CMD.WRITE_ZEROES:
          await b.writeZeroes(req.offset, req.length, (req.flags & CF.NO_HOLE) === 0);
          break;
        case CMD.CACHE:
          break; // the page cache and the table cache fill on demand; nothing to prefetch ahead of a read
        case CMD.BLOCK_STATUS:
          return await this.blockStatus(req);
      }
      if (writes && req.flags & CF.FUA) await b.flush();
      this.reply(req, 0);
    } catch (e) {
      this.reply(req, errnoOf(e), (e as Error).message);
    }
  }

  /** A read: with structured replies, data chunks and hole chunks by the backend's map (one data chunk with DF). */
  private async read(req: Request): Promise<void> {
    const b = this.exp.backend;
    const r = this.replies;
    if (req.length === 0 && r.chunked) return void this.send([r.header(REPLY_FLAG_DONE, REPLY_TYPE.NONE, req, 0)]);
    // the reply's data, read into one pooled buffer handed back once the socket has taken it
    const buf = this.pool.get(req.length);
    let sent = false;
    try {
      const fill = async (at: number, out: Uint8Array): Promise<Uint8Array> => {
        if (b.readInto) {
          await b.readInto(at, out);
          return out;
        }
        return b.read(at, out.length);
      };
      if (!r.chunked) {
        const data = await fill(req.offset, buf);
        sent = this.send([simpleReply(0, req.cookie), data], () => this.pool.release(buf));
        return;
      }
      const pieces: Uint8Array[] = [];
      const end = req.offset + req.length;
      const df = (req.flags & CF.DF) !== 0;
      for (let at = req.offset; at < end; ) {
        const st = df ? { length: end - at, zero: false } : await b.status(at, end - at);
        const n = Math.max(1, Math.min(st.length, end - at));
        const last = at + n >= end;
        const flags = last ? REPLY_FLAG_DONE : 0;
        if (st.zero && n >= 512) {
          const h = Buffer.allocUnsafe(12);
          h.writeBigUInt64BE(BigInt(at), 0);
          h.writeUInt32BE(n, 8);
          pieces.push(r.header(flags, REPLY_TYPE.OFFSET_HOLE, req, 12), h);
        } else {
          const data = await fill(at, buf.subarray(at - req.offset, at - req.offset + n));
          const h = Buffer.allocUnsafe(8);
          h.writeBigUInt64BE(BigInt(at), 0);
          pieces.push(r.header(flags, REPLY_TYPE.OFFSET_DATA, req, 8 + data.length), h, data);
        }
        at += n;
      }
      sent = this.send(pieces, () => this.pool.release(buf));
    } finally {
      if (!sent) this.pool.release(buf);
    }
  }

  private async blockStatus(req: Request): Promise<void> {
    if (!this.replies.chunked || this.contexts.length === 0) return this.reply(req, ERRNO.EINVAL, 'no metadata context is selected (SET_META_CONTEXT base:allocation)');
    if (req.length === 0) return this.reply(req, ERRNO.EINVAL, 'block status of 0 bytes');
    const one = (req.flags & CF.REQ_ONE) !== 0;
    // one chunk per selected context, the last one done
    const chunks: Buffer[] = [];
    for (const [k, id] of this.contexts.entries()) {
      const name = this.contextNames()[id - 1]!;
      const desc = await extentsOf(this.exp.backend, name, req, one, this.replies.style === 'extended');
      chunks.push(...this.replies.blockStatus(req, id, desc, k === this.contexts.length - 1));
    }
    this.send(chunks);
  }

  /** The contexts this export serves, in qemu-nbd's order; a context's id is its index + 1. */
  private contextNames(): string[] {
    return contextNames(this.exp.backend);
  }

  /** A reply without data, in the negotiated style (nbd-replies.ts). */
  private reply(req: Request, error: number, message = ''): void {
    this.send(error === 0 ? this.replies.done(req) : this.replies.error(req, error, message));
  }

  /**
   * Buffers of one reply, written in one go so replies never interleave;
   * `done` runs once the socket no longer needs them (written or failed).
   * False: the connection is gone and nothing was queued.
   */
  private send(parts: Uint8Array[], done?: () => void): boolean {
    if (this.closed || this.socket.destroyed) return false;
    if (!this.inTransmission) {
      // the handshake: one reply at a time, written at once (a STARTTLS reply leaves before the upgrade)
      this.socket.cork();
      for (const p of parts) this.socket.write(p);
      this.socket.uncork();
      return true;
    }
    // Replies that complete in the same turn of the event loop go out in one writev: the socket is
    // corked until the loop's check phase, after every socket read and file completion of this
    // poll phase (requests that arrived together are answered together). Uncorking at the end of
    // each callback instead sent one 16-byte write reply per system call, each waking the client:
    // a seventh of the server's CPU in a copy into the export; at queue depth 1 the wait is nil.
    if (!this.batching) {
      this.batching = true;
      this.socket.cork();
      const flush = () => {
        this.batching = false;
        this.socket.uncork();
      };
      setImmediate(flush);
    }
    for (let i = 0; i < parts.length; i++) this.socket.write(parts[i]!, i === parts.length - 1 && done ? () => done() : undefined);
    return true;
  }

  /** the socket is corked for the replies of this turn */
  private batching = false;
  /** replies are batched only after the handshake (a STARTTLS reply must leave before the upgrade) */
  private inTransmission = false;
}

/** The errno a failed operation answers with. */
export function errnoOf(e: unknown): number {
  const code = (e as { code?: unknown }).code ?? (e instanceof QledgerError ? e.data['code'] : undefined);
  if (code === 'ENOSPC' || code === 'EDQUOT') return ERRNO.ENOSPC;
  if (code === 'EFBIG') return ERRNO.EOVERFLOW;
  if (e instanceof QledgerError) {
    if (e.code === 'E_RANGE') return ERRNO.EINVAL;
    if (e.code === 'E_READ_ONLY') return ERRNO.EPERM;
    if (e.code === 'E_CLOSED') return ERRNO.ESHUTDOWN;
  }
  return ERRNO.EIO;
}
