/**
 * qledger nbd: qemu-nbd's server mode with qemu-nbd's option names where
 * they overlap: `[-r] [-k SOCKET | -p PORT -b ADDR] [-x NAME] [-D DESC]
 * [-e N] [-t] [-f FMT] [-l SNAPSHOT] [--pid-file FILE] [--detect-zeroes=…]
 * [--overlap-check=…] [--dedup] IMG` (--dedup, qledger's own: content
 * dedup of whole-cluster writes). It serves until its last client leaves
 * (or, with -t, until SIGTERM or SIGINT, which flush and close the image).
 * TLS as qemu-nbd takes it: `--object tls-creds-x509,id=ID,dir=DIR,
 * endpoint=server` (or tls-creds-psk) and `--tls-creds ID`, and who may
 * connect with `--tls-authz ID` (authz-simple, authz-list, authz-listfile).
 * `--fork` as qemu-nbd's: the command returns once the server listens (exit
 * 0) or has failed (its message, exit 1), and the server goes on in the
 * background; Node cannot fork, so the server is the same command started
 * again, detached, and it reports readiness over a pipe. qemu-nbd's other
 * modes (-c to attach a kernel device, -d, -L) are refused by name.
 */

import { closeSync, writeSync, writeFileSync, rmSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { UnsupportedError, UsageError } from '../errors.ts';
import { Image } from '../engine/image.ts';
import { isOverlapMode, type OverlapMode } from '../engine/write/overlap.ts';
import type { DetectZeroes } from '../engine/writer.ts';
import { rawFileBackend, serveBackend, serveNbd } from '../server/nbd-server.ts';
import { tlsCredentials } from '../server/nbd-tls.ts';
import { tlsAuthz } from '../server/nbd-authz.ts';
import { FileDevice } from '../io/file-device.ts';
import { imagePermissions } from '../io/image-lock.ts';
import { getopt, parseOptionList } from './args.ts';
import { imageSpec } from './image-spec.ts';
import type { Output } from './output.ts';

const LONG = {
  'read-only': false, socket: true, port: true, bind: true, 'export-name': true, description: true, shared: true, persistent: false, format: true,
  'load-snapshot': true, 'pid-file': true, 'image-opts': false, 'detect-zeroes': true, 'overlap-check': true, dedup: false, cache: true, discard: true, aio: true,
  'handshake-limit': true, untrusted: false, fork: false, connect: true, disconnect: false, 'tls-creds': true, 'tls-authz': true, 'tls-hostname': true, object: true, verbose: false,
  'allocation-depth': false, bitmap: true, 'fork-nbd': false, offset: true, 'list': false, nocache: false, 'trace': true,
};
const ALIAS: Record<string, string> = { r: 'read-only', k: 'socket', p: 'port', b: 'bind', x: 'export-name', D: 'description', e: 'shared', t: 'persistent', f: 'format', l: 'load-snapshot', c: 'connect', d: 'disconnect', v: 'verbose', B: 'bitmap', A: 'allocation-depth', o: 'offset', L: 'list', n: 'nocache', T: 'trace' };

export async function runNbd(argv: string[], out: Output): Promise<number> {
  // the server started by --fork: it tells the command that started it when it listens,
  // and from then on, as qemu-nbd's, writes nothing (the command's stderr is gone)
  const forked = process.env['QLEDGER_NBD_FORKED'] === '1';
  let detached = false;
  const io: Output = forked ? { ...out, out: (t) => detached || out.out(t), err: (t) => detached || out.err(t) } : out;
  const p = getopt(argv, { withArg: 'kpbxDeflcBoT', flags: 'rtdvALn', long: LONG }, 'nbd');
  const opt = new Map<string, string | true>();
  for (const [k, v] of p.opts) opt.set(ALIAS[k] ?? k, v);
  const str = (k: string) => (typeof opt.get(k) === 'string' ? (opt.get(k) as string) : undefined);
  for (const k of ['connect', 'disconnect', 'list']) if (opt.has(k)) throw new UnsupportedError(`nbd: --${k} is not supported (qledger serves NBD; it does not attach kernel devices or act as a client)`);
  if (opt.has('fork') && !forked) return forkServer(argv, io);
  if (opt.has('tls-hostname')) throw new UnsupportedError(`nbd: --tls-hostname is not supported`);
  // --object may repeat; --tls-creds names one of them
  const objects = p.opts.filter(([k]) => k === 'object').map(([, v]) => {
    // QEMU's `TYPE,key=value,…` (or qom-type=TYPE,…)
    const props = parseOptionList(String(v));
    const [first] = props.keys();
    const type = props.get('qom-type') ?? first ?? '';
    props.delete(props.has('qom-type') ? 'qom-type' : type);
    return { type, props };
  });
  const tlsId = str('tls-creds');
  const authzId = str('tls-authz');
  // qemu-nbd's words
  if (authzId !== undefined && tlsId === undefined) throw new UsageError('--tls-authz is not permitted without --tls-creds');
  const tls = tlsId !== undefined ? { ...tlsCredentials(objects, tlsId), ...(authzId !== undefined ? { authz: tlsAuthz(objects, authzId) } : {}) } : undefined;
  for (const k of ['offset', 'trace']) if (opt.has(k)) throw new UnsupportedError(`nbd: --${k} is not supported yet`);
  // -B may repeat: every bitmap named is exported, listed last named first as qemu-nbd lists them
  const bitmaps = p.opts.filter(([k]) => k === 'B' || k === 'bitmap').map(([, v]) => String(v)).reverse();
  const cache = str('cache');
  if (cache !== undefined && cache !== 'writeback' && cache !== 'none' && cache !== 'writethrough' && cache !== 'unsafe' && cache !== 'directsync') throw new UsageError(`Invalid cache mode '${cache}'`);
  if (p.positional.length !== 1) throw new UsageError("Expected exactly one image file name\nTry 'qledger nbd --help' for more information");
  if (opt.has('socket') && (opt.has('port') || opt.has('bind'))) throw new UsageError('nbd: -k and -p/-b cannot be used together');
  const portText = str('port');
  const port = portText === undefined ? 10809 : Number(portText);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new UsageError(`Invalid port '${portText}'`);
  const sharedText = str('shared');
  const shared = sharedText === undefined ? 1 : Number(sharedText);
  if (!Number.isInteger(shared) || shared < 0) throw new UsageError(`Invalid shared device number '${sharedText}'`);
  const limitText = str('handshake-limit');
  const handshakeMs = limitText === undefined ? 10_000 : Number(limitText) * 1000;
  if (!Number.isFinite(handshakeMs) || handshakeMs < 0) throw new UsageError(`Invalid handshake limit '${limitText}'`);
  const dz = str('detect-zeroes');
  if (dz !== undefined && dz !== 'off' && dz !== 'on' && dz !== 'unmap') throw new UsageError(`Invalid detect-zeroes '${dz}'`);
  const oc = str('overlap-check');
  if (oc !== undefined && !isOverlapMode(oc)) throw new UsageError(`nbd: --overlap-check expects none, constant, cached or all`);
  const discard = str('discard') ?? 'ignore';
  if (discard !== 'ignore' && discard !== 'off' && discard !== 'unmap' && discard !== 'on') throw new UsageError(`Invalid discard mode '${discard}'`);
  const fmt = str('format');
  if (fmt !== undefined && fmt !== 'qcow2' && fmt !== 'raw') throw new UsageError(`Unknown file format '${fmt}'`);
  const spec = imageSpec(p.positional[0]!, opt.has('image-opts'));
  const snapshot = str('load-snapshot');
  // a snapshot is served read-only, as qemu-nbd -l does
  const readOnly = opt.has('read-only') || snapshot !== undefined;
  const format = (fmt as 'qcow2' | 'raw' | undefined) ?? spec.format;
  let img: Image | undefined;
  let rawDev: FileDevice | undefined;
  if (readOnly && opt.has('dedup')) throw new UsageError('nbd: --dedup shares clusters as clients write; it cannot be used with a read-only export');
  // --untrusted (qledger's own): the untrusted-image policy for what the image names
  const trusted = !opt.has('untrusted');
  if (readOnly) img = await Image.open(spec.path, { format, snapshot, trusted });
  else {
    const probe = await Image.open(spec.path, { format, noBacking: true });
    const raw = probe.format === 'raw';
    await probe.close();
    if (raw && opt.has('dedup')) throw new UsageError(`nbd: --dedup shares qcow2 clusters; '${spec.path}' is raw`);
    // a raw file is its own guest: served straight from the file, locked as qemu-nbd locks it
    if (raw) rawDev = await FileDevice.open(spec.path, { readOnly: false, lock: imagePermissions({ readOnly: false }) });
    else img = await Image.open(spec.path, {
      format: 'qcow2',
      write: true,
      trusted,
      detectZeroes: dz as DetectZeroes | undefined,
      overlapCheck: oc as OverlapMode | undefined,
      dedup: opt.has('dedup') ? true : undefined,
      onWarning: (m) => io.err(`qledger: warning: ${m}\n`),
    });
  }
  const pidFile = str('pid-file');
  try {
    const options = {
      socket: str('socket'),
      port,
      host: str('bind') ?? '0.0.0.0',
      exportName: str('export-name') ?? '',
      description: str('description'),
      readOnly,
      // qemu-nbd's --discard: ignore (its default) or unmap
      discard: discard === 'unmap' || discard === 'on' ? 'unmap' : 'ignore',
      shared,
      persistent: opt.has('persistent'),
      handshakeMs,
      bitmaps,
      allocationDepth: opt.has('allocation-depth'),
      tls,
      log: opt.has('verbose') ? (l: string) => io.err(`qledger: nbd: ${l}\n`) : undefined,
    } as const;
    // a raw file has no bitmaps (qemu-nbd: not found either)
    if (rawDev && bitmaps.length) throw new UsageError(`Bitmap '${bitmaps[0]}' is not found`);
    const server = rawDev ? await serveBackend(rawFileBackend(rawDev, await rawDev.size(), options.discard), options) : await serveNbd(img!, options);
    if (pidFile) writeFileSync(pidFile, `${process.pid}\n`);
    if (forked) {
      // listening: the starting command may return (fd 3 is its pipe)
      try {
        writeSync(3, 'ready\n');
        closeSync(3);
      } catch {
        // not started by --fork after all (no pipe there)
      }
      detached = true;
      process.stderr.on('error', () => {});
    }
    const stop = () => void server.close();
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
    try {
      await server.done;
    } finally {
      process.off('SIGTERM', stop);
      process.off('SIGINT', stop);
    }
  } finally {
    // flushes: every write a client had acknowledged is durable, and a journalled session closes clean
    if (img) await img.close();
    if (rawDev) {
      await rawDev.flush();
      await rawDev.close();
    }
    if (pidFile) rmSync(pidFile, { force: true });
  }
  return 0;
}

/**
 * `--fork`: this command again without --fork, detached, its stderr
 * relayed until it listens (its errors print as the command's would), and
 * a pipe on which it says so. Returns 0 then, or the server's exit status
 * when it ends first. The server keeps none of the command's output
 * streams (a caller that waits for them to close, as ssh does, returns).
 */
async function forkServer(argv: readonly string[], io: Output): Promise<number> {
  const entry = process.argv[1];
  if (!entry) throw new UnsupportedError('nbd: --fork needs qledger run as a program');
  const args = argv.filter((a) => a !== '--fork');
  const child = spawn(process.execPath, [...process.execArgv, entry, 'nbd', ...args], {
    detached: true,
    stdio: ['ignore', 'ignore', 'pipe', 'pipe'],
    env: { ...process.env, QLEDGER_NBD_FORKED: '1' },
  });
  const pipe = child.stdio[3] as NodeJS.ReadableStream;
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (t: string) => io.err(t));
  let said = '';
  pipe.setEncoding('utf8');
  const ready = await new Promise<boolean>((resolve) => {
    pipe.on('data', (d: string) => {
      said += d;
      if (said.includes('ready')) resolve(true);
    });
    child.once('exit', () => resolve(said.includes('ready')));
    child.once('error', (e) => {
      io.err(`qledger: nbd: --fork: ${e.message}\n`);
      resolve(false);
    });
  });
  if (ready) {
    (pipe as unknown as { destroy(): void }).destroy();
    child.stderr!.destroy();
    child.unref();
    return 0;
  }
  const code = child.exitCode ?? (await new Promise<number | null>((r) => child.once('exit', (c) => r(c))));
  // what it said before it ended
  await new Promise((r) => (child.stderr!.readableEnded ? r(undefined) : child.stderr!.once('end', r)));
  return code && code > 0 ? code : 1;
}
