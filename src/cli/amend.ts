/**
 * qemu-img amend: `amend [-f FMT] [-p] [-q] [--force] [--image-opts] -o
 * OPTS IMG`, with qemu-img's option checks and messages. qledger changes
 * compat (1.1: v2 made v3; 0.10: v3 made v2) and lazy_refcounts;
 * refcount_bits, size and data_file are refused by name as not supported
 * yet; options only
 * image creation takes, and unknown ones, get qemu-img's words.
 */

import { UnsupportedError, UsageError } from '../errors.ts';
import { Image } from '../engine/image.ts';
import { downgradeRefusal, downgradeToV2, upgradeToV3 } from '../engine/amend.ts';
import { changeRefcountOrder } from '../engine/refcount-order.ts';
import { probeFormat } from '../engine/open.ts';
import { FileDevice } from '../io/file-device.ts';
import { loadQcow2 } from '../engine/qcow2-layer.ts';
import { locateJournal } from '../engine/journal/locate.ts';
import { AUTOCLEAR_JOURNAL, INCOMPAT_DIRTY } from '../format/features.ts';
import { getopt, parseOptionList } from './args.ts';
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
  if (opts.has('size')) throw new UnsupportedError("amend: size is not supported yet (use 'qledger resize')");
  if (opts.has('data_file') || opts.has('data_file_raw')) throw new UnsupportedError('amend: data_file and data_file_raw are not supported yet');

  if (compat === '0.10' && version === 3) {
    // everything checked before the first write, then QEMU's order: zero clusters expanded, refcounts exact, the header
    const refusal = await downgradeRefusal(spec.path);
    if (refusal?.notYet) throw new UnsupportedError(refusal.message);
    if (refusal) return fail(io, refusal.message);
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
  return 0;
}
