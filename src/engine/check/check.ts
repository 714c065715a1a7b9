/**
 * Consistency check and repair of a qcow2 image, as `qemu-img check [-r
 * leaks|all]`: count (count.ts), compare with the stored refcounts and
 * check COPIED flags, repairing where asked (repair.ts), then, after a
 * repair, check again without repairing; the report (report.ts) is what
 * qemu-img prints.
 */

import { UnsupportedError, UsageError } from '../../errors.ts';
import { imagePermissions } from '../../io/image-lock.ts';
import { readAt, type BlockDevice } from '../../io/device.ts';
import { FileDevice } from '../../io/file-device.ts';
import { AUTOCLEAR_JOURNAL, INCOMPAT_DIRTY } from '../../format/features.ts';
import { probeFormat } from '../open.ts';
import { analyze, loadImage, type Analysis, type Image } from './count.ts';
import { Stored } from './stored.ts';
import { compare, checkCopied, rebuildRefcounts } from './repair.ts';
import { emptyReport, type CheckFinding, type CheckReport, type RepairMode } from './report.ts';
import { patchHeader } from '../write/header-bits.ts';

async function onePass(img: Image, repair: RepairMode | undefined, report: CheckReport): Promise<Analysis> {
  const a = await analyze(img);
  const h = img.parsed.header;
  const reftable = await readAt(img.dev, h.refcountTableOffset, h.refcountTableClusters * img.g.clusterSize);
  const stored = new Stored(img, reftable, await img.dev.size());
  await stored.load(a.nbClusters);
  // QEMU's corruption signal while reading; a repair rebuilds instead of marking the image corrupt
  const notes = stored.takeNotes();
  if (repair === undefined) for (const message of notes) a.findings.push({ counts: 'none', message, fixed: false });
  // As QEMU: compare without fixing first. When the refcount structure must
  // be rebuilt, nothing is written to the old one (its blocks may be guest
  // data now, a block an L2 entry points into), and -r leaks stops there.
  await compare(img, a, stored, repair, report);
  const rebuildNeeded = a.rebuild;
  if (rebuildNeeded && repair === 'all') {
    for (const f of a.findings) if (f.message.startsWith('ERROR cluster') || f.message.startsWith('Leaked cluster')) f.fixed = true;
    await rebuildRefcounts(img, a);
    report.corruptionsFixed += a.corruptions;
    report.leaksFixed += a.leaks;
    a.corruptions = 0;
    a.leaks = 0;
    a.rebuild = false;
    a.findings.push({ counts: 'none', message: 'Rebuilding refcount structure', fixed: true });
    return a;
  }
  if (rebuildNeeded && repair === 'leaks') {
    a.findings.push({ counts: 'check-error', message: 'ERROR need to rebuild refcount structures', fixed: false });
    a.checkErrors++;
    report.failure = 'Check failed: Input/output error';
    return a;
  }
  const fixCopied = repair === 'all' || (repair === 'leaks' && !a.checkErrors && !a.corruptions && !a.leaks);
  await checkCopied(img, a, stored, fixCopied, report);
  return a;
}

export interface CheckOptions {
  readonly repair?: RepairMode | undefined;
  /** abort the check: it rejects with the signal's reason; a repair that has started writing completes first */
  readonly signal?: AbortSignal | undefined;
  /** share every permission with the image's other users, as qemu-img check -U (no repair) */
  readonly forceShare?: boolean | undefined;
  /** receives each finding as it is found (qledger check prints them so, as qemu-img does) */
  readonly onFinding?: ((f: CheckFinding) => void) | undefined;
  /**
   * keep at most this many findings per pass in the report (default: all);
   * the totals stay exact. A damaged image can have millions.
   */
  readonly maxFindings?: number | undefined;
}

/**
 * Check (and with `repair`, repair) the qcow2 image at `path`, counting as
 * `qemu-img check` counts; the report has its totals and findings.
 *
 * @example
 * import { Image, checkImage } from 'qledger';
 * import { mkdtempSync } from 'node:fs';
 * import { tmpdir } from 'node:os';
 * import { join } from 'node:path';
 *
 * const path = join(mkdtempSync(join(tmpdir(), 'qledger-')), 'disk.qcow2');
 * await Image.create(path, { size: 16 << 20 });
 * const report = await checkImage(path);
 * console.log(report.corruptions, report.leaks, report.checkErrors); // 0 0 0
 * const repaired = await checkImage(path, { repair: 'all', signal: AbortSignal.timeout(60_000) });
 * console.log(repaired.corruptionsFixed); // 0
 */
export async function checkImage(path: string, opts: CheckOptions = {}): Promise<CheckReport> {
  if (opts.forceShare && opts.repair) throw new UsageError(`${path}: force-share=on can only be used with read-only images`);
  const dev = await FileDevice.open(path, { readOnly: opts.repair === undefined, lock: imagePermissions({ readOnly: opts.repair === undefined, forceShare: opts.forceShare }) });
  try {
    return await checkDevice(dev, path, opts);
  } finally {
    await dev.close();
  }
}

/** Check (and repair) the qcow2 image on any device; the crash harness checks in-memory images. */
export async function checkDevice(dev: BlockDevice, path: string, opts: CheckOptions = {}): Promise<CheckReport> {
  opts.signal?.throwIfAborted();
  {
    // qemu-img's words and exit code (63) for a format without checks; `noChecks` lets the CLI say them
    if ((await probeFormat(dev)) !== 'qcow2') throw new UnsupportedError(`${path}: This image format does not support checks`, { path, noChecks: true });
    let img = await loadImage(dev, path, opts.signal, opts);
    const report = emptyReport(path);
    const h0 = img.parsed.header;
    if (opts.repair && h0.version === 3 && (h0.autoclearFeatures & AUTOCLEAR_JOURNAL) !== 0n) {
      // A repair changes refcounts behind the journal's back: the journal is stale from
      // now on and must never be replayed (QEMU's repair clears the bit the same way).
      await patchHeader(dev, h0, { autoclearFeatures: h0.autoclearFeatures & ~AUTOCLEAR_JOURNAL });
      await dev.flush();
      img = await loadImage(dev, path, opts.signal, opts);
    }
    let a = await onePass(img, opts.repair, report);
    if (opts.repair && !report.failure) {
      await dev.flush();
      report.repairedFindings = a.findings;
      // double check the fixed image, without repairing
      img = await loadImage(dev, path, opts.signal, opts);
      a = await onePass(img, undefined, report);
      if (a.corruptions === 0 && a.leaks === 0 && a.checkErrors === 0 && (img.parsed.header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n) {
        await patchHeader(dev, img.parsed.header, { incompatibleFeatures: img.parsed.header.incompatibleFeatures & ~INCOMPAT_DIRTY });
        await dev.flush();
      }
    }
    const h = img.parsed.header;
    report.findings = a.findings;
    report.corruptions = a.corruptions;
    report.leaks = a.leaks;
    report.checkErrors = a.checkErrors;
    report.imageEndOffset = (a.highest + 1) * img.g.clusterSize;
    report.totalClusters = Math.ceil(h.size / img.g.clusterSize);
    report.allocatedClusters = a.allocated;
    report.fragmentedClusters = a.fragmented;
    report.compressedClusters = a.compressed;
    return report;
  }
}

/** qemu-img check's exit code for a report: 0 clean, 1 not completed, 2 corruptions, 3 leaks only. */