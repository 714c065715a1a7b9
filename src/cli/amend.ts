/**
 * qemu-img amend: `amend [-f FMT] [-p] [-q] [--force] [--image-opts] -o
 * OPTS IMG`, with qemu-img's option checks and messages. qledger changes
 * compat (1.1: v2 made v3; 0.10: v3 made v2), lazy_refcounts,
 * refcount_bits, size (a resize to exactly that size) and data_file (the
 * data file's name; data_file_raw=on is refused as QEMU refuses it on an
 * existing image); options only
 * image creation takes, and unknown ones, get qemu-img's words.
 */

import { QledgerError, UnsupportedError, UsageError } from '../errors.ts';
import { Image } from '../engine/image.ts';
import { downgradeRefusal, downgradeToV2, renameDataFile, upgradeToV3 } from '../engine/amend.ts';
import { changeRefcountOrder } from '../engine/refcount-order.ts';
import { probeFormat } from '../engine/open.ts';
import { FileDevice } from '../io/file-device.ts';
import { loadQcow2 } from '../engine/qcow2-layer.ts';
import { locateJournal } from '../engine/journal/locate.ts';
import { AUTOCLEAR_DATA_FILE_RAW, AUTOCLEAR_JOURNAL, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY } from '../format/features.ts';
import { patchHeader } from '../engine/write/header-bits.ts';
import { getopt, parseOptionList, parseSize } from './args.ts';
import { imageSpec } from './image-spec.ts';
import { fail, type Output } from './output.ts';

/** qcow2 create options amend does not take (qemu-img: "only supported for image creation"). */
const CREATE_ONLY = new Set(['cluster_size', 'preallocation', 'extended_l2', 'compression_type', 'encryption', 'encrypt.format', 'encrypt.key-secret', 'encrypt.cipher-alg', 'encrypt.cipher-mode', 'encrypt.ivgen-alg', 'encrypt.ivgen-hash-alg', 'encrypt.hash-alg', 'encrypt.iter-time']);

/** Whether the refcounts on disk may not be exact: the dirty bit (lazy refcounts), or a journal transaction not in place yet. */
async function mayNeedRecovery(path: string): Promise<boolean> {
  const dev = await FileDevice.open(path, { readOnly: true });
  try {
    const { parsed, fileSize } = await loadQcow2(dev);
    const h = parsed.header;
    if (h.version !== 3) return false;
    if ((h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n) return true;
    if ((h.autoclearFeatures & AUTOCLEAR_JOURNAL) === 0n) return false;
    const j = await locateJournal(dev, parsed, fileSize);
    return j.kind === 'valid' && j.scan.transactions.some((t) => t.committed && t.tx > j.appliedTx);
  } finally {
    await dev.close();
  }
}

export async function runAmend(argv: string[], io: Output): Promise<number> {
  const p = getopt(argv, { withArg: 'fo', flags: 'pqh', long: { force: false, 'image-opts': false, object: true } }, 'amend');
  const lists = p.opts.filter(([k]) => k === 'o').map(([, v]) => String(v));
  if (lists.length === 0) return fail(io, "Must specify options (-o)\nTry 'qledger --help' for more information");
  if (p.positional.length !== 1) return fail(io, "Expecting one image file name\nTry 'qledger --help' for more information");
  const opts = new Map<string, string>();
  for (const l of lists) for (const [k, v] of parseOptionList(l)) opts.set(k, v);
  for (const k of opts.keys()) {
    if (CREATE_ONLY.has(k)) return fail(io, `Invalid parameter '${k}'\nThis option is only supported for image creation`);
    if (!['compat', 'lazy_refcounts', 'refcount_bits', 'size', 'backing_file', 'backing_fmt', 'data_file', 'data_file_raw'].includes(k)) return fail(io, `Invalid parameter '${k}'`);
  }
  if (opts.has('backing_file') || opts.has('backing_fmt')) return fail(io, "Cannot amend the backing file\nYou can use 'qledger rebase' instead.");
  const compatText = opts.get('compat');
  let compat: '0.10' | '1.1' | undefined;
  if (compatText !== undefined) {
    if (compatText === '0.10' || compatText === 'v2') compat = '0.10';
    else if (compatText === '1.1' || compatText === 'v3') compat = '1.1';
    else return fail(io, `Unknown compatibility level ${compatText}`);
  }
  const lazyText = opts.get('lazy_refcounts');
  if (lazyText !== undefined && lazyText !== 'on' && lazyText !== 'off') return fail(io, "Parameter 'lazy_refcounts' expects 'on' or 'off'");
  const lazy = lazyText === undefined ? undefined : lazyText === 'on';

  const spec = imageSpec(p.positional[0]!, p.opts.some(([k]) => k === 'image-opts'));
  const fmt = p.opts.filter(([k]) => k === 'f').at(-1)?.[1] ?? spec.format;
  if (fmt !== undefined && fmt !== 'qcow2' && fmt !== 'raw') throw new UsageError(`Unknown file format '${String(fmt)}'`);
  const dev = await FileDevice.open(spec.path, { readOnly: true });
  let probed: string;
  let version: 2 | 3 = 3;
  try {
    probed = await probeFormat(dev);
    // the header only (its checks as an open makes them): amend opens nothing else it does not need
    if (probed === 'qcow2') version = (await loadQcow2(dev)).parsed.header.version;
  } finally {
    await dev.close();
  }
  if (fmt === 'raw' || probed === 'raw') return fail(io, "Format driver 'raw' does not support option amendment");
  // qemu-img's checks, before anything changes
  const target = compat === '1.1' ? 3 : compat === '0.10' ? 2 : version;
  if (lazy === true && target === 2) return fail(io, 'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  const rb = opts.get('refcount_bits');
  if (rb !== undefined && rb !== '16' && target === 2) return fail(io, 'Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  let order: number | undefined;
  if (rb !== undefined) {
    const n = Number(rb);
    order = Number.isInteger(n) && n >= 1 && n <= 64 && (n & (n - 1)) === 0 ? Math.log2(n) : undefined;
    if (order === undefined) return fail(io, 'Refcount width must be a power of two and may not exceed 64 bits');
  }
  let size: number | undefined;
  if (opts.has('size')) {
    try {
      size = parseSize(opts.get('size')!);
    } catch {
      return fail(io, "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.");
    }
    if (size === 0) size = undefined; // QEMU: 0 changes nothing
  }
  const dataFile = opts.get('data_file');
  let clearRaw = false;
  const rawText = opts.get('data_file_raw');
  if (rawText !== undefined && rawText !== 'on' && rawText !== 'off') return fail(io, "Parameter 'data_file_raw' expects 'on' or 'off'");
  if (dataFile !== undefined || rawText !== undefined) {
    const { hasDataFile, raw } = await dataFileOf(spec.path);
    if (dataFile !== undefined && !hasDataFile) return fail(io, 'data-file can only be set for images that use an external data file');
    if (rawText === 'on' && !raw) return fail(io, 'data-file-raw cannot be set on existing images');
    clearRaw = rawText === 'off' && raw;
    if (dataFile === '') throw new UsageError("amend: data_file= (no name) would leave the image without its data file's name; qledger refuses it");
  }
  if (size !== undefined && size % 512 !== 0) return fail(io, 'The new size must be a multiple of 512');

  if (compat === '0.10' && version === 3) {
    // everything checked before the first write, then QEMU's order: zero clusters expanded, refcounts exact, the header
    const refusal = await downgradeRefusal(spec.path);
    if (refusal?.notYet) throw new UnsupportedError(refusal.message);
    if (refusal) return fail(io, refusal.message);
    // QEMU changes the size before it downgrades
    if (size !== undefined) {
      const r = await resizeTo(spec.path, size, io);
      if (r !== 0) return r;
    }
    // no journal for this session: the v2 image it becomes has no place for one
    const img = await Image.open(spec.path, { format: 'qcow2', write: true, journal: false, onWarning: (m) => io.err(`qledger: warning: ${m}\n`) });
    try {
      await img.writer!.expandZeroClusters();
      await img.writer!.setLazyRefcounts(false);
    } finally {
      await img.close();
    }
    await downgradeToV2(spec.path);
    return 0;
  }
  if (compat === '1.1') await upgradeToV3(spec.path);
  if (order !== undefined) {
    // exact refcounts first: a read-write open completes a journal's pending transaction, a close cleans a dirty image
    if (await mayNeedRecovery(spec.path)) {
      const img = await Image.open(spec.path, { format: 'qcow2', write: true, onWarning: (m) => io.err(`qledger: warning: ${m}\n`) });
      await img.close();
    }
    await changeRefcountOrder(spec.path, order);
  }
  if (lazy !== undefined) {
    const img = await Image.open(spec.path, { format: 'qcow2', write: true, onWarning: (m) => io.err(`qledger: warning: ${m}\n`) });
    try {
      await img.writer!.setLazyRefcounts(lazy);
    } finally {
      await img.close();
    }
  }
  // QEMU's order: the size after lazy_refcounts, then the data file
  if (size !== undefined) {
    const r = await resizeTo(spec.path, size, io);
    if (r !== 0) return r;
  }
  if (dataFile !== undefined) await renameDataFile(spec.path, dataFile);
  if (clearRaw) await clearDataFileRaw(spec.path);
  return 0;
}

/** amend -o size=N: qemu-img resize to exactly N, shrinking too (QEMU's blk_truncate with exact=true), through the write engine. */
async function resizeTo(path: string, size: number, io: Output): Promise<number> {
  const img = await Image.open(path, { format: 'qcow2', write: true, onWarning: (m) => io.err(`qledger: warning: ${m}\n`) });
  try {
    if (img.size === size) return 0;
    await img.truncate(size);
    return 0;
  } catch (e) {
    // the write engine's refusals (a v2 image with snapshots, an inconsistent bitmap) in qemu-img's words, without the file name
    if (e instanceof QledgerError && (e.code === 'E_UNSUPPORTED' || e.code === 'E_USAGE')) return fail(io, e.message.replace(`${path}: `, ''));
    throw e;
  } finally {
    await img.close();
  }
}

/** Whether the image has an external data file (incompatible bit 2), and whether it is raw (autoclear bit 1). */
async function dataFileOf(path: string): Promise<{ hasDataFile: boolean; raw: boolean }> {
  const dev = await FileDevice.open(path, { readOnly: true });
  try {
    const h = (await loadQcow2(dev)).parsed.header;
    return { hasDataFile: (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n, raw: (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n };
  } finally {
    await dev.close();
  }
}

/** data_file_raw=off: the autoclear bit cleared, one sector write of the header (the data file keeps its bytes; it is no longer promised raw). */
async function clearDataFileRaw(path: string): Promise<void> {
  const dev = await FileDevice.open(path, { readOnly: false });
  try {
    const h = (await loadQcow2(dev)).parsed.header;
    await patchHeader(dev, h, { autoclearFeatures: h.autoclearFeatures & ~AUTOCLEAR_DATA_FILE_RAW });
    await dev.flush();
  } finally {
    await dev.close();
  }
}
