/**
 * The qledger command line. Subcommands, options, output and exit codes
 * follow qemu-img (and qemu-io for `io`), so scripts can swap the command.
 */

import { existsSync } from 'node:fs';
import { NotFoundError, QledgerError, UsageError, UnsupportedError } from '../errors.ts';
import { LockedError } from '../io/image-lock.ts';
import { setInlineIo, setWriteBehind } from '../io/file-device.ts';

/** the CLI's inline limit (file-device.ts): every request of a one-request-at-a-time command */
const INLINE_IO_LIMIT = 256 * 1024;
/** write-behind every this many bytes of sequential writes (file-device.ts: setWriteBehind) */
const WRITE_BEHIND_FROM = 4 << 20;
import { CACHE_MODES, SIZE_SUFFIX_HELP, forceShareOf, getopt, parseOptionList, parseSize } from './args.ts';
import { Image } from '../engine/image.ts';
import { convertToRaw, compareImages } from '../engine/convert.ts';
import { formatInfoHuman, qemuJson, type ImageInfo } from '../engine/info.ts';
import { formatMapHuman, MapHumanError, streamMapJson, type MapEntry } from '../engine/map.ts';
import type { ImageFormat } from '../engine/open.ts';
import { progressPrinter } from './io-format.ts';
import { imageSpec, type ImageSpec } from './image-spec.ts';
import { fail, stdio, type Output } from './output.ts';
import { VERSION } from '../version.ts';

export type { Output } from './output.ts';
import type { RepairMode } from '../engine/check/report.ts';

// Subcommands load what only they need when they run: `info` and `map`
// never load the write engine, the checker, the crash harness or their
// dependencies (start-up time is most of a short command's time).
const lazy = {
  locate: () => import('../engine/journal/locate.ts'),
  create: () => import('../engine/create.ts'),
  convertQcow2: () => import('../engine/convert-qcow2.ts'),
  check: () => import('../engine/check/check.ts'),
  report: () => import('../engine/check/report.ts'),
};

type Subcommand = (argv: string[], io: Output) => Promise<number>;

/** Subcommands with a module of their own, loaded when they run. */
const MODULE_COMMANDS: Readonly<Record<string, () => Promise<Subcommand>>> = {
  io: async () => (await import('./io.ts')).runIo,
  'crash-test': async () => (await import('./crash-test.ts')).runCrashTest,
  journal: async () => (await import('./journal.ts')).runJournal,
  resize: async () => (await import('./resize.ts')).runResize,
  snapshot: async () => (await import('./snapshot.ts')).runSnapshot,
  nbd: async () => (await import('./nbd.ts')).runNbd,
  amend: async () => (await import('./amend.ts')).runAmend,
  measure: async () => (await import('./measure.ts')).runMeasure,
  dd: async () => (await import('./dd.ts')).runDd,
  commit: async () => (await import('./commit.ts')).runCommit,
  rebase: async () => (await import('./rebase.ts')).runRebase,
  dedup: async () => (await import('./dedup.ts')).runDedup,
  bitmap: async () => (await import('./bitmap.ts')).runBitmap,
  fuzz: async () => (await import('./fuzz.ts')).runFuzz,
};

const USAGE = `usage: qledger COMMAND [options]
Commands (options as in qemu-img / qemu-io):
  create -f qcow2 [-o OPTIONS] [-b BACKING -F FMT] [-q] FILE [SIZE]
     options: cluster_size compat refcount_bits lazy_refcounts extended_l2 compression_type
              backing_file backing_fmt data_file data_file_raw preallocation=off|metadata|falloc|full
  check [-f qcow2] [--output=human|json] [-r leaks|all] [-q] FILE
     exit: 0 clean, 1 check not completed, 2 corruptions, 3 leaks only
  crash-test [-o CREATE_OPTS] [--workload FILE | --random] [--seed N] [--runs N] [--max-states N]
             [--fault NAME|list] [--qemu-samples N] [--journal=on|off] [--dedup] [--backing raw|qcow2]
             [--jobs N] [--output=human|json]
     exit: 0 no corruption and no wrong data in any crash state, 2 otherwise
  info [-f fmt] [--output=human|json] [--backing-chain] [--dedup] FILE
  map [-f fmt] [--output=human|json] [--start-offset=N] [--max-length=N] FILE
  convert [-f fmt] [-O raw|qcow2] [-o OPTIONS] [-B BACKING -F fmt] [-c] [-n] [--target-is-zero] [-S SIZE] [-m N] [-W] [-l SNAPSHOT] [-t CACHE] [-T CACHE] [-p] [-q] [--dedup] IN OUT
  snapshot [-l | -c SNAPSHOT | -a SNAPSHOT | -d SNAPSHOT] [-q] [-U] FILE
  bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b FILE [-F fmt]] [-g GRAN] [-f fmt] FILE BITMAP
  commit [-f fmt] [-t cache] [-b BASE] [-d] [-p] [-q] FILE
  amend [-f fmt] [-p] [-q] -o OPTIONS FILE
     compat=0.10|1.1, lazy_refcounts=on|off, refcount_bits=N, size=N, data_file=NAME, data_file_raw=off
  dedup [-f qcow2] [-p] [-q] [--output=human|json] FILE
     offline content dedup: identical clusters of the active tree stored once (qledger's own)
  fuzz [--cases N] [--seed S] [--shard I/N] [--commands info,check,map,read,convert,write] [--timeout MS] [--memory MIB] [--out DIR] [--qemu] [--output=human|json] [--in-process] [--checkpoint FILE [--resume]] [IMAGE...]
     seeded mutations of images, every command run on each, outcomes counted (qledger's own); exit 2 on a crash, hang, memory or write after error
  dd [-f fmt] [-O raw|qcow2] [-U] [bs=N] [count=N] [skip=N] if=INPUT of=OUTPUT
  measure [--output=human|json] [-O qcow2|raw] [-o OPTIONS] [--size N | [-f fmt] [-l SNAPSHOT] [-U] FILE]
  rebase [-f fmt] [-p] [-q] [-u] -b BACKING [-F fmt] FILE
  resize [--shrink] [--preallocation=off|metadata|falloc|full] [-f fmt] [--image-opts] [-q] FILE [+|-]SIZE
  compare [-f fmt] [-F fmt] [-s] [-q] FILE1 FILE2
  nbd [-r] [-k SOCKET | -p PORT -b ADDR] [-x NAME] [-D DESC] [-e N] [-t] [-f fmt] [-l SNAPSHOT] [-A] [-B BITMAP] [--pid-file FILE] [--fork] [--dedup] FILE
     serve the image over NBD (qemu-nbd's options); until the last client leaves, or with -t until SIGTERM
  journal dump [--output=human|json] FILE
     the journal's transactions and records, read-only
  io [-r] [-f fmt] [--journal=on|off] [--detect-zeroes=off|on|unmap] [--overlap-check=none|constant|cached|all] [--dedup] -c CMD [-c CMD ...] FILE
     io commands: read [-P pattern] [-v] [-q] OFF LEN | write [-P pattern] [-z [-u]] [-q] OFF LEN
                  | discard OFF LEN | flush | truncate SIZE | abort | map | alloc OFF [LEN] | info | length
`;

/** qemu-img's words for an image it cannot lock (qemu-io: "can't open device"; qemu-img create: the name alone). */
function lockedMessage(e: LockedError, tool: 'img' | 'io' | 'create'): string {
  const path = String(e.data['path']);
  const head = tool === 'img' ? `Could not open '${path}'` : tool === 'io' ? `can't open device ${path}` : path;
  return `qledger: ${head}: ${e.message}\n${String(e.data['hint'])}\n`;
}

/**
 * Image argument `i`: a filename, a json: pseudo-filename, or with
 * --image-opts an option string; with the format (-f, or `fmtKey`, else
 * -f) and -U folded in.
 */
function imageOf(p: { opts: ReadonlyArray<readonly [string, string | true]>; positional: string[] }, i: number, fmtKey = 'f'): ImageSpec {
  const imageOpts = p.opts.some(([k]) => k === 'image-opts');
  const spec = imageSpec(p.positional[i]!, imageOpts);
  const given = formatArg(last(p.opts, fmtKey) ?? last(p.opts, 'f'));
  if (imageOpts && given !== undefined) throw new UsageError('--image-opts and --format are mutually exclusive');
  // --untrusted (qledger's own): the untrusted-image policy for the image and everything it names
  return { path: spec.path, format: spec.format ?? given, forceShare: spec.forceShare || forceShareOf(p), trusted: !p.opts.some(([k]) => k === 'untrusted') };
}

function formatArg(v: string | true | undefined): ImageFormat | undefined {
  if (v === undefined) return undefined;
  if (v === 'qcow2' || v === 'raw') return v;
  throw new UsageError(`Unknown file format '${String(v)}' (qledger reads qcow2 and raw)`);
}

function outputArg(v: string | true | undefined): 'human' | 'json' {
  if (v === undefined || v === 'human') return 'human';
  if (v === 'json') return 'json';
  throw new UsageError(`--output must be used with human or json as argument.`);
}

function last(opts: ReadonlyArray<readonly [string, string | true]>, ...names: string[]): string | true | undefined {
  let v: string | true | undefined;
  for (const [k, x] of opts) if (names.includes(k)) v = x;
  return v;
}

function one(positional: string[], n: number, cmd: string): void {
  if (positional.length < n) throw new UsageError(`${cmd}: expecting ${n === 1 ? 'a filename' : `${n} filenames`}`);
  if (positional.length > n) throw new UsageError(`${cmd}: unexpected argument '${positional[n]}'`);
}

async function cmdInfo(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'f', flags: 'hU', long: { output: true, 'backing-chain': false, 'force-share': false, 'image-opts': false, dedup: false, untrusted: false } }, 'info');
  one(p.positional, 1, 'info');
  const output = outputArg(last(p.opts, 'output'));
  const chain = last(p.opts, 'backing-chain') === true;
  // qledger's own: each qcow2 image's dedup state (from its metadata) after what qemu-img prints
  const dedup = last(p.opts, 'dedup') === true;
  const at = imageOf(p, 0);
  const img = await Image.open(at.path, { format: at.format, noBacking: !chain, forceShare: at.forceShare, trusted: at.trusted });
  try {
    const layers = chain ? img.chain : [img.top];
    const infos: ImageInfo[] = [];
    for (const l of layers) {
      const info = await img.info(l);
      if (dedup && l.format === 'qcow2') {
        const st = await img.dedupState(l);
        const j = { 'data-clusters': st.dataClusters, 'stored-clusters': st.storedClusters, 'shared-clusters': st.sharedClusters, 'bytes-saved': st.bytesSaved, ratio: Math.round(st.ratio * 1000) / 1000 };
        infos.push(Object.assign(info, { dedup: j }));
      } else infos.push(info);
    }
    if (output === 'json') io.out(qemuJson(chain ? infos : infos[0]) + '\n');
    else {
      io.out(
        layers
          .map((l, i) => {
            const d = (infos[i] as { dedup?: Record<string, number> }).dedup;
            const extra = d ? `Dedup:\n    data clusters: ${d['data-clusters']}\n    stored clusters: ${d['stored-clusters']}\n    shared clusters: ${d['shared-clusters']}\n    bytes saved: ${d['bytes-saved']}\n    ratio: ${d['ratio']!.toFixed(3)}\n` : '';
            return formatInfoHuman(infos[i]!, img.snapshotsOf(l)) + extra;
          })
          .join('\n'),
      );
    }
    return 0;
  } finally {
    await img.close();
  }
}

async function cmdMap(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'f', flags: 'hU', long: { output: true, 'start-offset': true, 'max-length': true, 'force-share': false, 'image-opts': false, untrusted: false } }, 'map');
  one(p.positional, 1, 'map');
  const output = outputArg(last(p.opts, 'output'));
  const at = imageOf(p, 0);
  const img = await Image.open(at.path, { format: at.format, forceShare: at.forceShare, trusted: at.trusted });
  try {
    const so = last(p.opts, 'start-offset');
    const ml = last(p.opts, 'max-length');
    const start = typeof so === 'string' ? parseSize(so, 'start offset') : 0;
    const maxLen = typeof ml === 'string' ? parseSize(ml, 'max length') : Infinity;
    const end = Math.min(img.size, start + maxLen);
    const from = Math.min(start, img.size);
    const len = Math.max(0, end - start);
    if (output === 'json') await streamMapJson(img.mapBatches(from, len), (b) => (io.outBytes ? io.outBytes(b) : io.out(Buffer.from(b).toString('latin1'))));
    else {
      const entries: MapEntry[] = [];
      for await (const e of img.map(from, len)) entries.push(e);
      try {
        io.out(formatMapHuman(entries));
      } catch (e) {
        if (e instanceof MapHumanError) throw new UnsupportedError(e.message);
        throw e;
      }
    }
    return 0;
  } finally {
    await img.close();
  }
}

/** -l takes "snapshot.id=ID,snapshot.name=NAME" or a bare id-or-name. */
function snapshotParam(v: string): string {
  if (!v.includes('=')) return v;
  const o = parseOptionList(v);
  const id = o.get('snapshot.id');
  const name = o.get('snapshot.name');
  const key = id ?? name;
  if (key === undefined) throw new UsageError(`invalid snapshot parameter '${v}'`);
  return key;
}

/**
 * convert's -S, -m, -W, -C, -T and --target-is-zero, checked as qemu-img
 * checks them (in the order given, then the combinations). -W (writes out
 * of order) is what qledger does anyway; -C (copy offloading) copies
 * through the same reads and writes; -T (the source's cache mode) changes
 * nothing for reads here.
 */
function convertTuning(opts: ReadonlyArray<readonly [string, string | true]>): { sparse: number | undefined; workers: number | undefined; targetIsZero: boolean } | { error: readonly string[] } {
  let sparse: number | undefined;
  let workers: number | undefined;
  for (const [k, v] of opts) {
    if (k === 'S') {
      let n: number;
      try {
        n = parseSize(String(v), 'buffer size for sparse output');
      } catch {
        return { error: [`Invalid buffer size for sparse output specified. ${SIZE_SUFFIX_HELP[0]}`, SIZE_SUFFIX_HELP[1]] };
      }
      if (n % 512 !== 0 || n > 16 * 1024 * 1024) throw new UsageError('Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).');
      sparse = n;
    } else if (k === 'm') {
      const t = String(v).trim();
      const n = /^[+-]?(0x[0-9a-f]+|\d+)$/i.test(t) ? Number(t) : NaN;
      if (!(n >= 1 && n <= 16)) throw new UsageError('Invalid number of coroutines. Allowed number of coroutines is between 1 and 16');
      workers = n;
    }
  }
  const copyOffload = opts.some(([k]) => k === 'C');
  if (copyOffload && opts.some(([k]) => k === 'c')) throw new UsageError('Cannot enable copy offloading when -c is used');
  if (copyOffload && sparse !== undefined) throw new UsageError('Cannot enable copy offloading when -S is used');
  return { sparse, workers, targetIsZero: opts.some(([k]) => k === 'target-is-zero') };
}

async function cmdConvert(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'fOlsoSmtTrBF', flags: 'pqnchUCW', long: { 'force-share': false, 'image-opts': false, 'target-image-opts': false, dedup: false, untrusted: false, 'target-is-zero': false } }, 'convert');
  const tuning = convertTuning(p.opts);
  if ('error' in tuning) return fail(io, ...tuning.error);
  if (p.positional.length < 2) throw new UsageError('convert: expecting an input and an output filename');
  if (p.positional.length > 2) throw new UnsupportedError('convert: concatenating several input images is not supported');
  const outFmt = last(p.opts, 'O') ?? 'raw';
  if (outFmt !== 'raw' && outFmt !== 'qcow2') throw new UnsupportedError(`convert: output format '${String(outFmt)}' is not supported (qcow2 and raw are)`);
  const compress = last(p.opts, 'c') === true;
  // qemu-img's words: raw output cannot be compressed
  if (compress && outFmt === 'raw') throw new UnsupportedError('Compression not supported for this file format');
  let createOpts = (await lazy.create()).createOptionsFrom(new Map(p.opts.filter(([k]) => k === 'o').flatMap(([, v]) => [...parseOptionList(String(v))])), (t, what) => parseSize(t, what));
  if (outFmt === 'raw' && p.opts.some(([k]) => k === 'o')) throw new UnsupportedError('convert: -o options apply to qcow2 output');
  // -B FILE [-F FMT] (or -o backing_file, backing_fmt): the output over a backing file, as qemu-img
  const B = last(p.opts, 'B');
  const F = last(p.opts, 'F');
  if (B !== undefined) createOpts = { ...createOpts, backingFile: String(B), ...(F !== undefined ? { backingFormat: formatArg(F) } : {}) };
  if (createOpts.backingFile !== undefined) {
    if (outFmt === 'raw') throw new UnsupportedError("Backing file not supported for file format 'raw'");
    if (createOpts.backingFormat === undefined) throw new UsageError('Use of backing file requires explicit backing format');
  }
  const existing = last(p.opts, 'n') === true;
  if (existing && p.opts.some(([k]) => k === 'o')) throw new UsageError('-o has no effect when skipping image creation');
  if (tuning.targetIsZero && !existing) throw new UsageError('--target-is-zero requires use of -n flag');
  const T = last(p.opts, 'T');
  if (T !== undefined && !CACHE_MODES.includes(String(T))) throw new UsageError(`Invalid source cache option: ${String(T)}`);
  if (tuning.targetIsZero && createOpts.backingFile !== undefined) throw new UsageError('Cannot use --target-is-zero when the destination image has a backing file');
  const outPath = p.positional[1]!;
  if (existing && !existsSync(outPath)) throw new NotFoundError(`Could not open '${outPath}': Could not open '${outPath}': No such file or directory`, { path: outPath });
  const l = last(p.opts, 'l');
  const s = last(p.opts, 's');
  const snapshot = typeof l === 'string' ? snapshotParam(l) : typeof s === 'string' ? s : undefined;
  const progress = last(p.opts, 'p') === true && last(p.opts, 'q') !== true;
  // -t: the output's cache mode; qemu-img's default for convert is 'unsafe' (no flush)
  const cache = last(p.opts, 't') ?? 'unsafe';
  if (!CACHE_MODES.includes(String(cache))) throw new UsageError(`Invalid cache option: ${String(cache)}`);
  const at = imageOf(p, 0);
  const img = await Image.open(at.path, { format: at.format, snapshot, forceShare: at.forceShare, trusted: at.trusted });
  try {
    const show = progressPrinter(io);
    const dedup = p.opts.some(([k]) => k === 'dedup');
    if (dedup && outFmt !== 'qcow2') throw new UsageError('convert: --dedup shares qcow2 clusters; it needs -O qcow2');
    if (dedup && compress) throw new UsageError('convert: --dedup and -c do not go together (compressed clusters are not shared)');
    const { sparse, workers, targetIsZero } = tuning;
    if (outFmt === 'qcow2') await (await lazy.convertQcow2()).convertToQcow2(img, outPath, { create: createOpts, compress, existing, sparse, targetIsZero, flush: cache !== 'unsafe', progress: progress ? show : undefined, dedup, onWarning: (m) => io.err(`qledger: warning: ${m}\n`) });
    else await convertToRaw(img, outPath, progress ? show : undefined, cache !== 'unsafe', undefined, { existing, sparse, workers, targetIsZero });
    if (progress) io.out('\n');
    return 0;
  } finally {
    await img.close();
  }
}

async function cmdCompare(argv: string[], io: Output): Promise<number> {
  // qemu-img compare: 0 identical, 1 different, 2 error
  try {
    const p = getopt(argv, { withArg: 'fFT', flags: 'sqpU', long: { 'force-share': false, 'image-opts': false, untrusted: false } }, 'compare');
    one(p.positional, 2, 'compare');
    const quiet = last(p.opts, 'q') === true;
    const sa = imageOf(p, 0);
    const sb = imageOf(p, 1, 'F');
    const a = await Image.open(sa.path, { format: sa.format, forceShare: sa.forceShare, trusted: sa.trusted });
    try {
      const b = await Image.open(sb.path, { format: sb.format, forceShare: sb.forceShare, trusted: sb.trusted });
      try {
        const strict = last(p.opts, 's') === true;
        const r = await compareImages(a, b, strict);
        if (r.sizeMismatch && !quiet) io.out(strict ? 'Strict mode: Image size mismatch!\n' : 'Warning: Image size mismatch!\n');
        if (r.identical) {
          if (!quiet) io.out('Images are identical.\n');
          return 0;
        }
        if (r.reason === 'content' && !quiet) io.out(`Content mismatch at offset ${r.offset}!\n`);
        if (r.reason === 'status' && !quiet) io.out(`Strict mode: Offset ${r.offset} block status mismatch!\n`);
        return 1;
      } finally {
        await b.close();
      }
    } finally {
      await a.close();
    }
  } catch (e) {
    if (e instanceof LockedError) {
      io.err(lockedMessage(e, 'img'));
      return 2;
    }
    if (e instanceof QledgerError) {
      io.err(`qledger: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
}

async function cmdCreate(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'fobFB', flags: 'quh', long: { 'object': true } }, 'create');
  const fmt = last(p.opts, 'f');
  if (fmt !== undefined && fmt !== 'qcow2') throw new UsageError(`create: only -f qcow2 is supported (got '${String(fmt)}')`);
  const opts = new Map<string, string>();
  for (const [k, v] of p.opts) {
    if (k !== 'o' || typeof v !== 'string') continue;
    if (v === 'help' || v === '?') {
      io.out(`Supported options:\n${(await lazy.create()).CREATE_OPTION_NAMES.map((n) => `  ${n}\n`).join('')}`);
      return 0;
    }
    for (const [ok, ov] of parseOptionList(v)) opts.set(ok, ov);
  }
  const b = last(p.opts, 'b', 'B');
  if (typeof b === 'string') opts.set('backing_file', b);
  const bf = last(p.opts, 'F');
  if (typeof bf === 'string') opts.set('backing_fmt', bf);
  if (p.positional.length < 1) throw new UsageError('create: expecting a filename');
  if (p.positional.length > 2) throw new UsageError(`create: unexpected argument '${p.positional[2]}'`);
  const path = p.positional[0]!;
  if (p.positional[1] !== undefined) {
    let size: number;
    try {
      size = parseSize(p.positional[1], 'size');
    } catch {
      throw new UsageError(`Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`);
    }
    opts.set('size', String(size));
  }
  const co = (await lazy.create()).createOptionsFrom(opts, parseSize);
  let summary: string;
  try {
    summary = await Image.create(path, co);
  } catch (e) {
    if (!(e instanceof LockedError)) throw e;
    io.err(lockedMessage(e, 'create'));
    return 1;
  }
  if (!p.opts.some(([k]) => k === 'q')) io.out(summary + '\n');
  return 0;
}

async function cmdCheck(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'fr', flags: 'qU', long: { output: true, 'force-share': false, 'image-opts': false } }, 'check');
  one(p.positional, 1, 'check');
  const fmt = last(p.opts, 'f');
  const output = outputArg(last(p.opts, 'output'));
  // qemu-img: a format without checks (raw, given or probed) is exit 63, in its words
  const noChecks = () => {
    io.err('qledger: This image format does not support checks\n');
    return 63;
  };
  if (fmt === 'raw') return noChecks();
  if (fmt !== undefined && fmt !== 'qcow2') throw new UsageError(`check: only qcow2 images can be checked (got -f ${String(fmt)})`);
  const at = imageOf(p, 0);
  if (at.format === 'raw') return noChecks();
  const r = last(p.opts, 'r');
  if (r !== undefined && r !== 'leaks' && r !== 'all') throw new UsageError(`Unknown option value for -r (expecting 'leaks' or 'all'): ${String(r)}`);
  const quiet = p.opts.some(([k]) => k === 'q');
  let report;
  try {
    // findings are printed as they are found and only the first thousand are kept: a damaged
    // image's millions of errors cost time, not memory (the totals stay exact)
    report = await (await lazy.check()).checkImage(at.path, { repair: r as RepairMode | undefined, forceShare: at.forceShare, onFinding: (f) => io.err(f.message + '\n'), maxFindings: 1000 });
  } catch (e) {
    if (e instanceof QledgerError && e.data['noChecks'] === true) return noChecks();
    throw e;
  }
  if (r === undefined && report.leaks && !report.corruptions) {
    const j = await (await lazy.locate()).readJournal(at.path).catch(() => undefined);
    if (j?.live && j.transactions.some((t) => t.committed && !t.applied)) {
      io.err(`qledger: note: the image's journal holds a committed write-back that is not in place yet; a read-write open completes it and removes these leaks (qledger io opens read-write when a command writes)\n`);
    }
  }

  if (report.failure) {
    io.err(`qledger: ${report.failure}\n`);
    return 1;
  }
  const { checkExitCode, checkHuman, checkJson } = await lazy.report();
  if (output === 'json') io.out(qemuJson(checkJson(report)) + '\n');
  else if (!quiet) io.out(checkHuman(report));
  // qemu-img: internal errors during the check end in "Check failed" and exit 1
  if (report.checkErrors) io.err('qledger: Check failed\n');
  return checkExitCode(report);
}

const COMMANDS = ['amend', 'check', 'commit', 'compare', 'convert', 'crash-test', 'create', 'dd', 'dedup', 'info', 'io', 'journal', 'map', 'measure', 'nbd', 'rebase', 'resize', 'snapshot'] as const;

/** The usage lines of one subcommand, from the overview above. */
function usageOf(cmd: string): string {
  const lines = USAGE.split('\n');
  const at = lines.findIndex((l) => l.startsWith(`  ${cmd} `) || l === `  ${cmd}`);
  if (at < 0) return USAGE;
  let end = at + 1;
  while (end < lines.length && lines[end]!.startsWith('     ')) end++;
  return `usage: qledger ${lines.slice(at, end).map((l) => l.trim()).join('\n       ')}\n`;
}

/** The command closest to a mistyped one (edit distance at most 2), for the error message. */
function nearest(cmd: string): string | undefined {
  const dist = (a: string, b: string) => {
    const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
    for (let j = 1; j <= b.length; j++) d[0]![j] = j;
    for (let i = 1; i <= a.length; i++) {
      for (let j = 1; j <= b.length; j++) d[i]![j] = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    return d[a.length]![b.length]!;
  };
  let best: string | undefined;
  let bestD = 3;
  for (const c of COMMANDS) {
    const x = dist(cmd, c);
    if (x < bestD) [best, bestD] = [c, x];
  }
  return best;
}

export async function main(argv: string[], io: Output = stdio): Promise<number> {
  const [cmd, ...rest] = argv;
  try {
    if (cmd !== undefined && (COMMANDS as readonly string[]).includes(cmd) && (rest[0] === '-h' || rest[0] === '--help')) {
      io.out(usageOf(cmd));
      return 0;
    }
    const module = cmd !== undefined && Object.hasOwn(MODULE_COMMANDS, cmd) ? MODULE_COMMANDS[cmd] : undefined;
    if (module) return await (await module())(rest, io);
    switch (cmd) {
      case 'info':
        return await cmdInfo(rest, io);
      case 'map':
        return await cmdMap(rest, io);
      case 'convert':
        return await cmdConvert(rest, io);
      case 'compare':
        return await cmdCompare(rest, io);
      case 'create':
        return await cmdCreate(rest, io);
      case 'check':
        return await cmdCheck(rest, io);
      case undefined:
      case '-h':
      case '--help':
      case 'help':
        io.out(USAGE);
        return cmd === undefined ? 1 : 0;
      case '-V':
      case '--version':
        io.out(`qledger version ${VERSION}\n`);
        return 0;
      default: {
        // qemu-img's words, then qledger's suggestion
        const near = nearest(cmd);
        io.err(`qledger: Command not found: ${cmd}\nTry 'qledger --help' for more information${near ? `\n(unknown command '${cmd}'; did you mean '${near}'?)` : `\n(unknown command '${cmd}')`}\n`);
        return 1;
      }
    }
  } catch (e) {
    if (e instanceof LockedError) {
      io.err(lockedMessage(e, cmd === 'io' ? 'io' : 'img'));
      return 1;
    }
    if (e instanceof QledgerError) {
      io.err(`qledger: ${e.message}\n`);
      return 1;
    }
    const err = e as Error;
    io.err(`qledger: internal error (a bug, please report it): ${err?.message}\n${err?.stack ?? ''}\n`);
    return 1;
  }
}

/**
 * Run as the qledger program (src/cli/bin.ts, the bundle's entry): the
 * process arguments, the exit status, and a reader that goes away
 * (qledger io -c 'read -v ...' | head -1) ending the output quietly, as
 * with qemu-io.
 */
export function runAsProgram(): void {
  for (const s of [process.stdout, process.stderr]) {
    s.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
      throw e;
    });
  }
  // One request at a time: file requests go straight to the kernel (file-device.ts). The server's
  // clients' requests overlap: there, only while they are page-cache quick (adaptive), and never a
  // flush. QLEDGER_INLINE_IO=BYTES overrides the limit (0: none inline).
  const env = process.env['QLEDGER_INLINE_IO'];
  setInlineIo(env !== undefined && /^\d+$/.test(env) ? Number(env) : INLINE_IO_LIMIT, { adaptive: process.argv[2] === 'nbd' });
  // Write-behind every 4 MiB of sequential writes (file-device.ts): the disk writes while the command goes
  // on, and its last flush waits for less. Not for the server: an nbdcopy of 1 GiB into an export took
  // 1.51-1.59 s with it against 1.33-1.54 s without (2026-12-04, BENCHMARKS.md). QLEDGER_WRITE_BEHIND=BYTES
  // sets the threshold, for the server too (0: off).
  const wb = process.env['QLEDGER_WRITE_BEHIND'];
  setWriteBehind(wb !== undefined && /^\d+$/.test(wb) ? Number(wb) : process.argv[2] === 'nbd' ? 0 : WRITE_BEHIND_FROM);
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
