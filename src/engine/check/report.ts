/**
 * qemu-img check's report: findings, totals, exit codes, and the JSON and
 * human forms qemu-img prints (field order and messages as QEMU 7.2).
 */

export type RepairMode = 'leaks' | 'all';

export interface CheckFinding {
  /** what qemu-img counts it as ('none': reported, not counted by QEMU either) */
  readonly counts: 'corruption' | 'leak' | 'check-error' | 'none';
  /** QEMU's message for it, with the host offset in hex added */
  readonly message: string;
  readonly cluster?: number | undefined;
  readonly offset?: number | undefined;
  /**
   * An OFLAG_COPIED finding of the harmless direction: COPIED clear on a
   * cluster with one reference (a write copies it first, needlessly). A
   * crash inside a snapshot operation without the journal can leave it, as
   * QEMU's can; the crash harness tells it apart from real damage.
   */
  readonly copiedClear?: boolean | undefined;
  /** repaired by this run */
  fixed: boolean;
}

/**
 * The findings of one pass: each one goes to `sink` as it is found (the
 * CLI prints it then, as qemu-img does), and at most `keep` stay in the
 * list, so that a hostile image with a million errors costs a bounded
 * amount of memory; the totals are counted apart and stay exact.
 */
export class FindingList extends Array<CheckFinding> {
  /** findings past `keep`, sent to the sink but not kept */
  dropped = 0;
  private sink: ((f: CheckFinding) => void) | undefined;
  private keep = Infinity;

  // map, filter and slice make plain arrays, not lists that print
  static override get [Symbol.species](): ArrayConstructor {
    return Array;
  }

  static create(sink: ((f: CheckFinding) => void) | undefined, keep = Infinity): FindingList {
    const l = new FindingList();
    l.sink = sink;
    l.keep = keep;
    return l;
  }

  override push(...items: CheckFinding[]): number {
    for (const f of items) {
      this.sink?.(f);
      if (this.length < this.keep) super.push(f);
      else this.dropped++;
    }
    return this.length;
  }
}

export interface CheckReport {
  readonly filename: string;
  readonly format: 'qcow2';
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** findings of the (last) check, in the order found */
  findings: CheckFinding[];
  /** findings of the first pass, before any repair (when repairing) */
  repairedFindings: CheckFinding[];
  /** set when the check could not complete; the CLI prints it and exits 1 */
  failure?: string | undefined;
}

export function emptyReport(filename: string): CheckReport {
  return {
    filename,
    format: 'qcow2',
    checkErrors: 0,
    corruptions: 0,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    findings: [],
    repairedFindings: [],
  };
}

export function checkExitCode(r: CheckReport): number {
  if (r.failure || r.checkErrors) return 1;
  if (r.corruptions) return 2;
  if (r.leaks) return 3;
  return 0;
}

/** qemu-img check --output=json, field order as QEMU 7.2 prints it; zero counters omitted as QEMU does. */
export function checkJson(r: CheckReport): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  const put = (k: string, v: number) => {
    if (v) o[k] = v;
  };
  put('image-end-offset', r.imageEndOffset);
  put('compressed-clusters', r.compressedClusters);
  put('total-clusters', r.totalClusters);
  put('corruptions', r.corruptions);
  put('corruptions-fixed', r.corruptionsFixed);
  o['check-errors'] = r.checkErrors;
  put('leaks', r.leaks);
  put('leaks-fixed', r.leaksFixed);
  put('allocated-clusters', r.allocatedClusters);
  o['filename'] = r.filename;
  o['format'] = r.format;
  put('fragmented-clusters', r.fragmentedClusters);
  return o;
}

/** qemu-img check's human output (stdout part). */
export function checkHuman(r: CheckReport): string {
  let s = '';
  if (r.leaksFixed || r.corruptionsFixed) {
    s += `The following inconsistencies were found and repaired:\n\n    ${r.leaksFixed} leaked clusters\n    ${r.corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`;
  }
  if (!r.corruptions && !r.leaks && !r.checkErrors) s += 'No errors were found on the image.\n';
  else {
    if (r.corruptions) s += `\n${r.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
    if (r.leaks) s += `\n${r.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
    if (r.checkErrors) s += `\n${r.checkErrors} internal errors have occurred during the check.\n`;
  }
  if (r.totalClusters && r.allocatedClusters) {
    const pct = (x: number) => ((x / r.allocatedClusters) * 100).toFixed(2);
    s += `${r.allocatedClusters}/${r.totalClusters} = ${((r.allocatedClusters / r.totalClusters) * 100).toFixed(2)}% allocated, ${pct(r.fragmentedClusters)}% fragmented, ${pct(r.compressedClusters)}% compressed clusters\n`;
  }
  if (r.imageEndOffset > 0) s += `Image end offset: ${r.imageEndOffset}\n`;
  return s;
}

