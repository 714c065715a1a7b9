/**
 * The dedup state of an image's active tree, from its metadata alone (no
 * data is read): how many guest clusters map whole data clusters, how many
 * host clusters hold them, how many of those several active entries
 * share, and the bytes that sharing saves. Clusters shared only with an
 * internal snapshot count once: this measures dedup, not snapshots. And
 * the one rule of which images can share clusters at all.
 */

import { isCompressed, isCopied, readL2Entry, standardOffset, type RawL2Entry } from '../../format/l2.ts';
import type { Qcow2Layer } from '../qcow2-layer.ts';

/** Why an image cannot share clusters, or undefined. */
export function dedupRefusal(refcountBits: number, hasDataFile: boolean): string | undefined {
  if (refcountBits < 2) return 'refcount_bits=1 cannot count a second reference, so no cluster can be shared';
  if (hasDataFile) return 'clusters in an external data file carry no refcounts, so none can be shared';
  return undefined;
}

export interface DedupState {
  /** guest clusters of the active tree that map a host cluster of data */
  readonly dataClusters: number;
  /** distinct host clusters those map */
  readonly storedClusters: number;
  /** host clusters two or more active entries map */
  readonly sharedClusters: number;
  /** (dataClusters - storedClusters) × cluster size */
  readonly bytesSaved: number;
  /** dataClusters / storedClusters (1 with nothing shared or nothing stored) */
  readonly ratio: number;
}

export async function dedupState(layer: Qcow2Layer): Promise<DedupState> {
  const g = layer.geometry;
  const e: RawL2Entry = { hi: 0, lo: 0, bitmapHi: 0, bitmapLo: 0 };
  let data = 0;
  let own = 0;
  let hosts = new Float64Array(1024);
  let m = 0;
  for (let i = 0; i < layer.l1Count(); i++) {
    const off = layer.l1At(i);
    if (!off) continue;
    const table = await layer.l2Table(off, i);
    for (let j = 0; j < g.l2Entries; j++) {
      readL2Entry(table, j, g, e);
      if (isCompressed(e) || standardOffset(e) === 0) continue;
      data++;
      if (isCopied(e)) {
        own++;
        continue;
      }
      if (m === hosts.length) {
        const h2 = new Float64Array(m * 2);
        h2.set(hosts);
        hosts = h2;
      }
      hosts[m++] = standardOffset(e);
    }
  }
  const sorted = hosts.subarray(0, m).sort();
  let distinct = 0;
  let shared = 0;
  for (let k = 0; k < m; ) {
    let n = 1;
    while (k + n < m && sorted[k + n] === sorted[k]) n++;
    distinct++;
    if (n > 1) shared++;
    k += n;
  }
  const stored = own + distinct;
  return { dataClusters: data, storedClusters: stored, sharedClusters: shared, bytesSaved: (data - stored) * g.clusterSize, ratio: stored ? data / stored : 1 };
}
