/**
 * Repair for the check (-r leaks / -r all): lower leaked refcounts, raise
 * low ones, fix COPIED flags, and rebuild the refcount table and blocks at
 * the end of the file when they are broken. Every repair write only ever
 * adds references or removes ones nothing uses, and a rebuilt refcount
 * structure is complete and flushed before the header switches to it, so a
 * crash during repair leaves the image no worse.
 */

import { hexDigits, hexWord } from '../../errors.ts';
import { cluster, clusterOf, host } from '../../format/offsets.ts';
import { readAt, readClusters } from '../../io/device.ts';
import { putU32 } from '../../format/bytes.ts';
import { INCOMPAT_DATA_FILE } from '../../format/features.ts';
import { COPIED_HI } from '../../format/l1.ts';
import { isCompressed, isCopied, readL2Entry, standardOffset, type RawL2Entry, L2E_COPIED_HI } from '../../format/l2.ts';
import { getRefcount, setRefcount, setRefcountTableEntry, maxRefcount, refcountStructureSize, refcountText } from '../../format/refcount.ts';
import { l1Entry, l1Used, repeated, BATCH_BYTES, type Analysis, type Image } from './count.ts';
import { Stored } from './stored.ts';
import type { CheckFinding, CheckReport, RepairMode } from './report.ts';
import { patchHeader } from '../write/header-bits.ts';

/**
 * Compare stored and counted refcounts over the clusters of the file. A
 * first pass only finds the mismatches (a block at a time, no per-cluster
 * lookups); fixes, when asked for and possible without a rebuild, follow.
 */
export async function compare(img: Image, a: Analysis, stored: Stored, repair: RepairMode | undefined, report: CheckReport): Promise<void> {
  const cs = img.g.clusterSize;
  const E = img.g.refcountBlockEntries;
  const order = img.g.refcountOrder;
  const counted = new Uint32Array(Math.min(E, a.nbClusters));
  // the COPIED verdict from the counting walk's marks: only for a check that changes nothing here
  const marks = repair === undefined && !a.copiedSlow ? a.copiedMarks : undefined;
  let clean = marks !== undefined && marks.length <= a.nbClusters;
  for (let base = 0; base < a.nbClusters; base += E) {
    const block = stored.block(base / E);
    const end = Math.min(a.nbClusters, base + E);
    if (stored.unreadable(base / E)) {
      // QEMU cannot read the block: each cluster is a check error, compared with nothing
      for (let c = base; c < end; c++) a.findings.push({ counts: 'check-error', message: `Can't get refcount for cluster ${c}: Input/output error`, cluster: c, offset: c * cs, fixed: false });
      a.checkErrors += end - base;
      continue;
    }
    a.counts.copyRange(base, end - base, counted);
    for (let c = base; c < end; c++) {
      const i = c - base;
      // 16-bit refcounts (the default) decoded here, the others through getRefcount
      const s = !block ? 0 : order === 4 ? (block[2 * i]! << 8) | block[2 * i + 1]! : getRefcount(block, i, order);
      const n = counted[i]!;
      if (clean && c < marks!.length) {
        const m = marks![c]!;
        // an entry with COPIED on a cluster whose refcount is not 1, or one without it on a cluster whose refcount is
        if (m && (s === 1 ? m & 2 : m & 1)) clean = false;
      }
      if (s === n) {
        if (s > 0) a.highest = c;
        continue;
      }
      if (s > 0 || n > 0) a.highest = c;
      a.mismatches.push({ cluster: c, stored: s, counted: n, storedText: order === 6 && s > Number.MAX_SAFE_INTEGER ? refcountText(block!, c - base, order) : undefined });
      if (s === 0) a.rebuild = true;
    }
  }
  a.copiedClean = clean;
  const fixing = repair !== undefined && !a.rebuild;
  for (const { cluster: c, stored: s, counted: n, storedText } of a.mismatches) {
    const fix = fixing && ((s > n && repair !== undefined) || (s < n && repair === 'all')) ? (s > n ? 'leak' : 'corruption') : undefined;
    const word = fix ? 'Repairing' : s < n ? 'ERROR' : 'Leaked';
    const finding: CheckFinding = { counts: s < n ? 'corruption' : 'leak', message: `${word} cluster ${c} refcount=${storedText ?? s} reference=${n} (host offset 0x${hexDigits(c * cs)})`, cluster: c, offset: c * cs, fixed: false };
    a.findings.push(finding);
    if (fix && (await stored.set(c, n))) {
      finding.fixed = true;
      if (fix === 'leak') report.leaksFixed++;
      else report.corruptionsFixed++;
      continue;
    }
    if (s < n) a.corruptions++;
    else a.leaks++;
  }
}

export async function checkCopied(img: Image, a: Analysis, stored: Stored, repair: boolean, report: CheckReport): Promise<void> {
  const { dev, parsed, g } = img;
  const h = parsed.header;
  const cs = g.clusterSize;
  const fileSize = await dev.size();
  const hasDataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  if (h.l1TableOffset + h.l1Size * 8 > fileSize) return;
  const l1 = await readAt(dev, h.l1TableOffset, h.l1Size * 8);
  const e: RawL2Entry = { hi: 0, lo: 0, bitmapHi: 0, bitmapLo: 0 };
  const used = l1Used(l1, h.l1Size).filter((i) => l1Entry(l1, i).l2 !== 0);
  const perBatch = Math.max(1, Math.floor(BATCH_BYTES / cs));
  // how often each table is named, and the findings of each one judged that is named again
  const refs = repeated(Float64Array.from(used, (i) => l1Entry(l1, i).l2));
  const judged = new Map<number, CheckFinding[]>();
  const l1End = h.l1TableOffset + h.l1Size * 8;
  // clusters from here on lie past what the stored refcounts' load covered: their blocks are read on demand
  const pastLoaded = Math.ceil(a.nbClusters / g.refcountBlockEntries) * g.refcountBlockEntries * cs;
  for (let b = 0; b < used.length; b += perBatch) {
    const batch = Array.from(used.subarray(b, b + perBatch), (i) => l1Entry(l1, i));
    // a table past the end of the file reads as zeros there, as QEMU's file driver reads it (a repair writes only inside the file)
    const wanted = batch.filter((x) => x.l2 % cs === 0 && (!repair || x.l2 + cs <= fileSize)).map((x) => x.l2);
    // the counting walk's marks found every data entry's COPIED flag right: no table is looked at again
    const tables = a.copiedClean ? new Map<number, Uint8Array>() : await readClusters(dev, wanted.filter((o) => !a.activeTables.has(o) && !judged.has(o)), cs);
    if (!a.copiedClean) {
      // QEMU reads a table at an unaligned offset too (its entries judged as any others); a repair
      // would write it there, over other metadata, which QEMU's overlap check refuses: not repaired here
      if (!repair) for (const x of batch) if (x.l2 % cs !== 0 && !tables.has(x.l2) && !judged.has(x.l2)) tables.set(x.l2, await readAt(dev, x.l2, cs));
      for (const o of wanted) if (a.activeTables.has(o)) tables.set(o, a.activeTables.get(o)!);
    }
    for (const { i, hi, lo, l2 } of batch) {
      if (l2 >= pastLoaded) await stored.ensure(Math.floor(l2 / cs));
      const rc = stored.get(Math.floor(l2 / cs));
      // an unreadable refcount: QEMU skips the entry (its corruption signal printed, the first time)
      if (rc === undefined) {
        if (!repair) for (const message of stored.takeNotes()) a.findings.push({ counts: 'none', message, fixed: false });
        continue;
      }
      if ((rc === 1) !== ((hi & COPIED_HI) !== 0)) {
        const f: CheckFinding = { counts: 'corruption', message: `${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hexWord(hi, lo)} refcount=${stored.text(Math.floor(l2 / cs))} (L2 table at 0x${hexDigits(l2)})`, offset: l2, cluster: Math.floor(l2 / cs), copiedClear: rc === 1, fixed: false };
        a.findings.push(f);
        if (repair) {
          putU32(l1, i * 8, rc === 1 ? (hi | COPIED_HI) >>> 0 : (hi & ~COPIED_HI) >>> 0);
          await dev.write(h.l1TableOffset + i * 8, l1.subarray(i * 8, i * 8 + 8));
          f.fixed = true;
          report.corruptionsFixed++;
        } else a.corruptions++;
      }
      // a table named again is judged again: its findings again (QEMU reports them at every
      // reference), from one walk of it; repaired, it has none left at its later references
      const seen = judged.get(l2);
      if (seen) {
        for (const f of seen) {
          a.findings.push({ ...f });
          a.corruptions++;
        }
        const left = refs.get(l2)! - 1;
        refs.set(l2, left);
        if (!left) judged.delete(l2);
        continue;
      }
      const t0 = tables.get(l2);
      if (!t0) continue;
      // repairing: read it again, an L1 repair above may have written into it
      const t = repair ? await readAt(dev, l2, cs) : t0;
      let dirty = false;
      const found: CheckFinding[] = [];
      for (let j = 0; j < g.l2Entries; j++) {
        readL2Entry(t, j, g, e);
        if (isCompressed(e)) continue;
        const off = standardOffset(e);
        if (off === 0 && !(hasDataFile && isCopied(e))) continue;
        if (!hasDataFile && off >= pastLoaded) await stored.ensure(Math.floor(off / cs));
        const rc2 = hasDataFile ? 1 : stored.get(Math.floor(off / cs));
        if (rc2 === undefined) continue;
        if ((rc2 === 1) !== isCopied(e)) {
          const f: CheckFinding = { counts: 'corruption', message: `${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hexWord(e.hi, e.lo)} refcount=${hasDataFile ? '1' : stored.text(Math.floor(off / cs))} (host offset 0x${hexDigits(off)})`, offset: off, cluster: Math.floor(off / cs), copiedClear: rc2 === 1, fixed: false };
          a.findings.push(f);
          if (repair) {
            putU32(t, j * g.l2EntrySize, rc2 === 1 ? (e.hi | L2E_COPIED_HI) >>> 0 : (e.hi & ~L2E_COPIED_HI) >>> 0);
            dirty = true;
            f.fixed = true;
            report.corruptionsFixed++;
          } else {
            a.corruptions++;
            found.push({ ...f });
          }
        }
      }
      // kept while later references remain, unless the L1 table's repairs write into it
      const left = (refs.get(l2) ?? 1) - 1;
      if (left > 0) refs.set(l2, left);
      if (left > 0 && !(repair && l2 < l1End && l2 + cs > h.l1TableOffset)) judged.set(l2, found);
      if (dirty) await dev.write(l2, t);
    }
  }
}

/**
 * QEMU's rebuild_refcount_structure(): a new refcount table and blocks,
 * counting every reference found (and themselves), written after the end of
 * the file and flushed before the header points at them.
 */
export async function rebuildRefcounts(img: Image, a: Analysis): Promise<void> {
  const { dev, g, parsed } = img;
  const h = parsed.header;
  const cs = g.clusterSize;
  const E = g.refcountBlockEntries;
  // the old structure is dropped: its clusters are no longer referenced
  const oldTable = clusterOf(host(h.refcountTableOffset), cs);
  for (let i = 0; i < h.refcountTableClusters; i++) a.counts.add(cluster(oldTable + i), -1);
  for (const c of a.countedBlocks) a.counts.add(c, -1);
  const start = a.nbClusters;
  const { blocks, tableClusters } = refcountStructureSize(g, start, 0, 0, 1);
  for (let c = start; c < start + blocks + tableClusters; c++) a.counts.add(cluster(c), 1);
  const table = new Uint8Array(tableClusters * cs);
  const max = maxRefcount(g.refcountOrder);
  for (let b = 0; b < blocks; b++) {
    const block = new Uint8Array(cs);
    for (let i = 0; i < E; i++) {
      const v = a.counts.get(cluster(b * E + i));
      if (v) setRefcount(block, i, g.refcountOrder, Math.min(v, max));
    }
    await dev.write((start + b) * cs, block);
    setRefcountTableEntry(table, b, (start + b) * cs);
  }
  await dev.write((start + blocks) * cs, table);
  await dev.flush();
  await patchHeader(dev, h, { refcountTableOffset: (start + blocks) * cs, refcountTableClusters: tableClusters });
  await dev.flush();
}
