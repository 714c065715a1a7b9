/**
 * A compact map from host cluster to a small bitmask (the overlap index's
 * storage; write/overlap.ts gives the bits their meaning). Metadata is a
 * few thousand clusters per terabyte, mostly in runs, so the map stores
 * fragments, not clusters: the cluster space is cut into windows of 2^16
 * clusters, and each window that holds anything keeps a sorted array of
 * fragments (first cluster, length, bits), each packed into one double.
 * A lookup is one Map probe and a binary search inside one window; an
 * update rewrites one window's array (O(fragments in the window)). This is
 * Max Reitz's 2015 design (windows of clusters with fragment lists) with
 * the bitmap fallback left out: a window's fragment list is never longer
 * than its cluster count, and a dense window is rare in qcow2 (metadata is
 * allocated in runs).
 */

const WINDOW_BITS = 16;
const WINDOW = 2 ** WINDOW_BITS;
/** bits a fragment holds (the kinds): 12 */
const BITS = 12;
const BITS_SPAN = 2 ** BITS;
const LEN_SPAN = 2 ** WINDOW_BITS;

// fragment = ((start * LEN_SPAN) + (length - 1)) * BITS_SPAN + bits; start and length within one window
function pack(start: number, length: number, bits: number): number {
  return (start * LEN_SPAN + (length - 1)) * BITS_SPAN + bits;
}
function fStart(f: number): number {
  return Math.floor(f / (LEN_SPAN * BITS_SPAN));
}
function fLength(f: number): number {
  return (Math.floor(f / BITS_SPAN) % LEN_SPAN) + 1;
}
function fBits(f: number): number {
  return f % BITS_SPAN;
}

/** Index of the first fragment of `w` that ends after cluster `s` (in-window), or w.length. */
function firstEndingAfter(w: readonly number[], s: number): number {
  let lo = 0;
  let hi = w.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    const f = w[mid]!;
    if (fStart(f) + fLength(f) <= s) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export interface KindRun {
  readonly first: number;
  readonly count: number;
  readonly bits: number;
}

export class ClusterKinds {
  private readonly windows = new Map<number, number[]>();

  /** The bits of cluster `c` (0: none). */
  at(c: number): number {
    const w = this.windows.get(Math.floor(c / WINDOW));
    if (!w) return 0;
    const s = c % WINDOW;
    const i = firstEndingAfter(w, s);
    if (i === w.length) return 0;
    const f = w[i]!;
    return fStart(f) <= s ? fBits(f) : 0;
  }

  /**
   * The first cluster of [first, first + count) whose bits meet `mask`,
   * with its bits; undefined when there is none. O(log n) per window the
   * range touches, plus the fragments inside it.
   */
  find(first: number, count: number, mask: number): { cluster: number; bits: number } | undefined {
    if (mask === 0 || count <= 0) return undefined;
    const end = first + count;
    // the common case, one window and a map with no fragment there: one probe
    if (this.windows.size === 0) return undefined;
    for (let base = Math.floor(first / WINDOW) * WINDOW; base < end; base += WINDOW) {
      const w = this.windows.get(base / WINDOW);
      if (!w) continue;
      const s = Math.max(first, base) - base;
      const e = Math.min(end, base + WINDOW) - base;
      for (let i = firstEndingAfter(w, s); i < w.length; i++) {
        const f = w[i]!;
        const fs = fStart(f);
        if (fs >= e) break;
        const b = fBits(f);
        if (b & mask) return { cluster: base + Math.max(fs, s), bits: b };
      }
    }
    return undefined;
  }

  /** Set `bits` on the clusters [first, first + count). */
  add(first: number, count: number, bits: number): void {
    if (bits) this.update(first, count, (b) => b | bits);
  }

  /** Clear `bits` on the clusters [first, first + count). */
  remove(first: number, count: number, bits: number): void {
    if (bits) this.update(first, count, (b) => b & ~bits);
  }

  /** Apply `fn` to the bits of every cluster in [first, first + count), window by window. */
  update(first: number, count: number, fn: (bits: number) => number): void {
    const end = first + count;
    for (let base = Math.floor(first / WINDOW) * WINDOW; base < end; base += WINDOW) {
      const key = base / WINDOW;
      const s = Math.max(first, base) - base;
      const e = Math.min(end, base + WINDOW) - base;
      const w = this.windows.get(key) ?? [];
      const next = updateWindow(w, s, e, fn);
      if (next.length) this.windows.set(key, next);
      else this.windows.delete(key);
    }
  }

  /**
   * Replace the whole map by runs (any order, overlapping allowed: bits of
   * overlapping runs are OR-ed). O(n log n), for building at open.
   */
  load(runs: Iterable<KindRun>): void {
    this.windows.clear();
    // boundary events; a per-bit counter tells which bits hold between them
    const pos: number[] = [];
    const delta: number[] = [];
    for (const r of runs) {
      if (r.count <= 0 || r.bits === 0) continue;
      pos.push(r.first, r.first + r.count);
      delta.push(r.bits, -r.bits);
    }
    const order = Array.from(pos.keys()).sort((a, b) => pos[a]! - pos[b]!);
    const counters = new Array<number>(BITS).fill(0);
    let bits = 0;
    let at = 0;
    const emit = (from: number, to: number, b: number) => {
      for (let c = from; c < to; ) {
        const base = Math.floor(c / WINDOW) * WINDOW;
        const stop = Math.min(to, base + WINDOW);
        const key = base / WINDOW;
        let w = this.windows.get(key);
        if (!w) this.windows.set(key, (w = []));
        append(w, c - base, stop - base, b);
        c = stop;
      }
    };
    for (let k = 0; k < order.length; ) {
      const p = pos[order[k]!]!;
      if (bits && p > at) emit(at, p, bits);
      // every event at this position
      for (; k < order.length && pos[order[k]!] === p; k++) {
        const d = delta[order[k]!]!;
        const m = Math.abs(d);
        for (let i = 0; i < BITS; i++) if (m & (1 << i)) counters[i]! += Math.sign(d);
      }
      bits = 0;
      for (let i = 0; i < BITS; i++) if (counters[i]! > 0) bits |= 1 << i;
      at = p;
    }
    // exact-size arrays: push leaves growth slack (about half again)
    for (const [k, w] of this.windows) this.windows.set(k, w.slice());
  }

  /** Every run of equal bits, in cluster order. */
  *runs(): Generator<KindRun> {
    for (const key of [...this.windows.keys()].sort((a, b) => a - b)) {
      for (const f of this.windows.get(key)!) yield { first: key * WINDOW + fStart(f), count: fLength(f), bits: fBits(f) };
    }
  }

  /** Fragments held (each one double). */
  get fragments(): number {
    let n = 0;
    for (const w of this.windows.values()) n += w.length;
    return n;
  }

  /**
   * Bytes of memory the map holds: about 48 bytes a window (its Map entry,
   * the array and its backing store's headers, on 64-bit Node 20) and 8 a
   * fragment; the overlap benchmark checks the figure against the heap.
   */
  bytes(): number {
    let b = 64;
    for (const w of this.windows.values()) b += 48 + 8 * w.length;
    return b;
  }
}

/** Append the run [start, end) of `bits` to a window's sorted fragments, merged into the last one where it continues it; empty runs and runs of no bits are left out. */
function append(w: number[], start: number, end: number, bits: number): void {
  if (end <= start || bits === 0) return;
  const last = w[w.length - 1];
  if (last !== undefined && fBits(last) === bits && fStart(last) + fLength(last) === start) w[w.length - 1] = pack(fStart(last), end - fStart(last), bits);
  else w.push(pack(start, end - start, bits));
}

/** The window's fragments with `fn` applied to [s, e), merged and without empty runs. */
function updateWindow(w: readonly number[], s: number, e: number, fn: (bits: number) => number): number[] {
  const i0 = firstEndingAfter(w, s);
  const out: number[] = w.slice(0, i0);
  const push = (start: number, end: number, b: number) => append(out, start, end, b);
  let at = s;
  let i = i0;
  for (; i < w.length; i++) {
    const f = w[i]!;
    const fs = fStart(f);
    const fe = fs + fLength(f);
    if (fs >= e) break;
    const b = fBits(f);
    if (fs < s) push(fs, s, b);
    const from = Math.max(fs, s);
    if (from > at) push(at, from, fn(0)); // the gap before it
    const to = Math.min(fe, e);
    push(from, to, fn(b));
    at = to;
    if (fe > e) push(e, fe, b);
  }
  if (at < e) push(at, e, fn(0));
  for (; i < w.length; i++) {
    const f = w[i]!;
    push(fStart(f), fStart(f) + fLength(f), fBits(f));
  }
  // exact size (push leaves slack): the window is rewritten whole anyway
  return out.slice();
}
