/**
 * The NBD server: `serveNbd(image, options)` exports one image over a Unix
 * socket or TCP, every connection a session (nbd-session.ts) over the same
 * image, so a flush on any connection makes every completed write durable
 * (CAN_MULTI_CONN). Like qemu-nbd, it stops after its last client unless
 * `persistent`, and takes at most `shared` clients at once.
 */

import type { NbdTls } from './nbd-tls.ts';
import { createServer, type Server, type Socket } from 'node:net';
import { rmSync } from 'node:fs';
import type { Image } from '../engine/image.ts';
import type { DirtyBitmap } from '../engine/bitmaps/dirty-bitmap.ts';
import { readAt, type BlockDevice } from '../io/device.ts';
import { zeroRun } from '../io/holes.ts';
import { QledgerError } from '../errors.ts';
import { NbdSession, type NbdBackend, type NbdExport } from './nbd-session.ts';

export interface NbdServeOptions {
  /** a Unix socket path (qemu-nbd -k); otherwise TCP on `host`:`port` */
  readonly socket?: string | undefined;
  /** TCP port (default 10809, qemu-nbd's) */
  readonly port?: number | undefined;
  /** TCP address (default '0.0.0.0', as qemu-nbd -b) */
  readonly host?: string | undefined;
  /** the export's name (default '', qemu-nbd -x) */
  readonly exportName?: string | undefined;
  /** the export's description (qemu-nbd -D) */
  readonly description?: string | undefined;
  /** serve read-only even from an image opened for writing (qemu-nbd -r) */
  readonly readOnly?: boolean | undefined;
  /** persistent dirty bitmaps exported as qemu:dirty-bitmap:NAME metadata contexts (qemu-nbd -B NAME) */
  readonly bitmaps?: readonly string[] | undefined;
  /** the qemu:allocation-depth metadata context (qemu-nbd -A) */
  readonly allocationDepth?: boolean | undefined;
  /** clients at once (default 1, qemu-nbd -e); more are refused until one leaves */
  readonly shared?: number | undefined;
  /** keep serving after the last client leaves (qemu-nbd -t) */
  readonly persistent?: boolean | undefined;
  /** the handshake's time limit in milliseconds (default 10 s, qemu-nbd --handshake-limit) */
  readonly handshakeMs?: number | undefined;
  /**
   * What TRIM, and WRITE_ZEROES that may punch holes, do: 'unmap' (the
   * default) discards clusters; 'ignore' (qemu-nbd's default) acknowledges a
   * TRIM without doing anything and writes zeroes without deallocating.
   */
  readonly discard?: 'unmap' | 'ignore' | undefined;
  /** lines about clients that misbehaved */
  readonly log?: ((line: string) => void) | undefined;
  /** TLS credentials (tlsCredentials()): every client must negotiate TLS first, as with qemu-nbd --tls-creds */
  readonly tls?: NbdTls | undefined;
}

export interface NbdServerHandle {
  /** where it listens: the socket path, or host and port */
  readonly address: { readonly socket: string } | { readonly host: string; readonly port: number };
  /** resolves when the server has stopped (closed, or its last client left without `persistent`) */
  readonly done: Promise<void>;
  /** Stop: no new clients, every connection closed once its requests finished. The image stays open (close it after). */
  close(): Promise<void>;
}

/** The largest request payload: qemu-nbd's NBD_MAX_BUFFER_SIZE. */
export const NBD_MAX_BLOCK = 32 * 1024 * 1024;

/** The library's image as an export's backend; `bitmaps` are exported as qemu:dirty-bitmap contexts. */
export function imageBackend(img: Image, readOnly: boolean, discard: 'unmap' | 'ignore' = 'unmap', bitmaps: readonly string[] = [], allocationDepth = false): NbdBackend {
  const unmapping = discard === 'unmap';
  // a read-only export's bitmaps cannot change: read once
  const stable = new Map<string, Promise<DirtyBitmap>>();
  const bitsOf = (name: string) => {
    if (!readOnly) return img.bitmaps.bits(name);
    let p = stable.get(name);
    if (!p) stable.set(name, (p = img.bitmaps.bits(name)));
    return p;
  };
  return {
    bitmaps,
    // qemu-img map's extent: its depth in the chain, present or not
    depth: allocationDepth
      ? async (offset, length) => {
          for await (const e of img.map(offset, length)) return { length: e.length, depth: e.present ? e.depth + 1 : 0 };
          return { length, depth: 0 };
        }
      : undefined,
    async dirty(name, offset, length) {
      return [...(await bitsOf(name)).extents(offset, offset + length)];
    },
    get size() {
      return img.size;
    },
    readOnly,
    read: (offset, length) => img.read(offset, length),
    readInto: (offset, out) => img.readInto(out, offset),
    write: (offset, data) => img.write(offset, data),
    writeZeroes: (offset, length, unmap) => img.writeZeroes(offset, length, { unmap: unmap && unmapping }),
    // TRIM is advisory: ignoring it is a valid answer (what reads return afterwards is unspecified)
    trim: (offset, length) => (unmapping ? img.discard(offset, length) : Promise.resolve()),
    // a read-only export has nothing to make durable
    flush: () => (readOnly ? Promise.resolve() : img.flush()),
    async status(offset, length) {
      const e = await img.status(offset, length);
      // base:allocation: a hole where no layer holds data, zero where it reads as zero (QEMU's BDRV_BLOCK_DATA/ZERO)
      return { length: e.length, hole: !e.data, zero: e.zero };
    },
  };
}

/**
 * Export `image` over NBD. An image opened without `write` is served
 * read-only.
 *
 * @example
 * import { Image, serveNbd } from 'qledger';
 * import { mkdtempSync } from 'node:fs';
 * import { tmpdir } from 'node:os';
 * import { join } from 'node:path';
 *
 * const dir = mkdtempSync(join(tmpdir(), 'qledger-'));
 * await Image.create(join(dir, 'disk.qcow2'), { size: 64 << 20 });
 * const img = await Image.open(join(dir, 'disk.qcow2'), { write: true });
 * const server = await serveNbd(img, { socket: join(dir, 'disk.sock'), persistent: true });
 * console.log('socket' in server.address); // true
 * // clients connect to nbd+unix:///?socket=<dir>/disk.sock (qemu-io -f raw, nbdinfo, nbdcopy, ...)
 * await server.close();
 * await img.close();
 */
export async function serveNbd(image: Image, o: NbdServeOptions = {}): Promise<NbdServerHandle> {
  const readOnly = o.readOnly === true || image.writer === undefined;
  // qemu-nbd -B: each bitmap must exist and be consistent, checked before the server starts
  const list = await image.bitmaps.list();
  for (const name of o.bitmaps ?? []) {
    const b = list.find((x) => x.name === name);
    if (!b) throw new QledgerError('E_USAGE', `Bitmap '${name}' is not found`, { notFound: true });
    if (b.inconsistent) throw new QledgerError('E_USAGE', `Bitmap '${name}' is inconsistent and cannot be used`, { inconsistent: true });
  }
  return serveBackend(imageBackend(image, readOnly, o.discard, o.bitmaps, o.allocationDepth), o);
}

/**
 * A raw file opened read-write as an export's backend: guest bytes are
 * file bytes; holes (SEEK_HOLE) are base:allocation holes that read as zero.
 */
export function rawFileBackend(dev: BlockDevice, size: number, discard: 'unmap' | 'ignore' = 'unmap'): NbdBackend {
  const unmapping = discard === 'unmap';
  return {
    size,
    readOnly: dev.readOnly,
    read: (offset, length) => readAt(dev, offset, length),
    write: (offset, data) => dev.write(offset, data),
    writeZeroes: (offset, length, unmap) => dev.writeZeroes(offset, length, unmap && unmapping),
    trim: (offset, length) => (unmapping ? dev.discard(offset, length) : Promise.resolve()),
    flush: () => (dev.readOnly ? Promise.resolve() : dev.flush()),
    async status(offset, length) {
      const z = await zeroRun(dev, offset, length);
      return { length: z.length, hole: z.zero, zero: z.zero };
    },
  };
}

/** Export any backend over NBD (serveNbd's body; the CLI serves writable raw files through it). */
export async function serveBackend(backend: NbdBackend, o: NbdServeOptions = {}): Promise<NbdServerHandle> {
  const exp: NbdExport = {
    name: o.exportName ?? '',
    description: o.description,
    backend,
    minBlock: 1,
    // qemu-nbd says 4096 for qcow2 and raw alike
    preferredBlock: 4096,
    maxBlock: NBD_MAX_BLOCK,
  };
  const shared = o.shared ?? 1;
  if (!Number.isSafeInteger(shared) || shared < 0) throw new QledgerError('E_USAGE', `shared connections must be a non-negative integer (got ${shared})`);
  const sockets = new Set<Socket>();
  const sessions = new Set<Promise<void>>();
  let served = 0;
  let stopping = false;
  let resolveDone!: () => void;
  const done = new Promise<void>((r) => (resolveDone = r));
  const server: Server = createServer({ pauseOnConnect: true }, (socket) => {
    if (stopping || (shared > 0 && sockets.size >= shared)) {
      socket.destroy();
      return;
    }
    sockets.add(socket);
    served++;
    const s = new NbdSession(socket, exp, { handshakeMs: o.handshakeMs ?? 10_000, maxInFlight: 16, log: o.log, tls: o.tls, multiConn: shared !== 1 })
      .run()
      .finally(() => {
        sockets.delete(socket);
        sessions.delete(s);
        if (!o.persistent && sockets.size === 0 && served > 0) void stop();
      });
    sessions.add(s);
  });
  const stop = async (): Promise<void> => {
    if (!stopping) {
      stopping = true;
      // no new clients; the listener's callback waits for the connections, which are ended next
      const closed = new Promise<void>((r) => server.close(() => r()));
      for (const s of sockets) s.end();
      await Promise.all([...sessions]);
      await closed;
      if (o.socket) rmSync(o.socket, { force: true });
      resolveDone();
    }
    await done;
  };
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e: NodeJS.ErrnoException) => reject(new QledgerError('E_IO', `Failed to ${o.socket ? `bind socket to ${o.socket}` : `listen on ${o.host ?? '0.0.0.0'}:${o.port ?? 10809}`}: ${e.message}`, { code: e.code })));
    if (o.socket) {
      rmSync(o.socket, { force: true });
      server.listen(o.socket, resolve);
    } else server.listen(o.port ?? 10809, o.host ?? '0.0.0.0', resolve);
  });
  const a = server.address();
  const address = o.socket ? { socket: o.socket } : { host: typeof a === 'object' && a ? a.address : (o.host ?? '0.0.0.0'), port: typeof a === 'object' && a ? a.port : (o.port ?? 10809) };
  return { address, done, close: stop };
}
