/**
 * A persistent (immutable, structurally shared) map from small non-negative
 * integers to values: a 32-way radix trie. Setting a key copies the path to
 * it, O(log32 n) small arrays, and shares everything else. An editor makes a
 * batch of sets copy each path node once (Clojure's transients): nodes it
 * created carry its owner token and are changed in place until it finishes.
 *
 * immer cannot draft typed arrays and is slow on large maps (see
 * ../shared/design-notes.md), so the big tables of the metadata state live in
 * tries like this one, with raw table bytes as values.
 */

const BITS = 5;
const WIDTH = 1 << BITS;
const MASK = WIDTH - 1;
/** Keys are L1 indices, refcount-table indices and chunk numbers: all below 2^30. */
export const MAX_KEY = 2 ** 30 - 1;

interface Node<V> {
  owner: object | null;
  slots: Array<Node<V> | V | undefined>;
}

export class PTrie<V> {
  private constructor(
    /** @internal */ readonly root: Node<V> | undefined,
    /** @internal */ readonly shift: number,
  ) {}

  static empty<V>(): PTrie<V> {
    return new PTrie<V>(undefined, 0);
  }

  get(key: number): V | undefined {
    if (key < 0 || key >= 2 ** (this.shift + BITS)) return undefined;
    let node = this.root;
    for (let s = this.shift; s > 0 && node; s -= BITS) node = node.slots[(key >>> s) & MASK] as Node<V> | undefined;
    return node ? (node.slots[key & MASK] as V | undefined) : undefined;
  }

  set(key: number, value: V | undefined): PTrie<V> {
    const e = this.edit();
    e.set(key, value);
    return e.finish();
  }

  edit(): TrieEditor<V> {
    return new TrieEditor(this.root, this.shift, this);
  }

  /** Every (key, value) pair, in key order. */
  *entries(): Generator<[number, V]> {
    if (!this.root) return;
    yield* walk(this.root, this.shift, 0);
  }

  /**
   * Keys whose values differ between `a` and `b` (by identity), visiting only
   * subtrees that are not shared: the cost is proportional to the change.
   */
  static *diff<V>(a: PTrie<V>, b: PTrie<V>): Generator<[number, V | undefined, V | undefined]> {
    const shift = Math.max(a.shift, b.shift);
    yield* diffNodes(lift(a, shift), lift(b, shift), shift, 0);
  }
}

function lift<V>(t: PTrie<V>, shift: number): Node<V> | undefined {
  let n = t.root;
  for (let s = t.shift; s < shift && n; s += BITS) n = { owner: null, slots: [n] };
  return n;
}

function* walk<V>(n: Node<V>, shift: number, base: number): Generator<[number, V]> {
  for (let i = 0; i < n.slots.length; i++) {
    const c = n.slots[i];
    if (c === undefined) continue;
    const key = base + i * 2 ** shift;
    if (shift === 0) yield [key, c as V];
    else yield* walk(c as Node<V>, shift - BITS, key);
  }
}

function* diffNodes<V>(a: Node<V> | undefined, b: Node<V> | undefined, shift: number, base: number): Generator<[number, V | undefined, V | undefined]> {
  if (a === b) return;
  const n = Math.max(a?.slots.length ?? 0, b?.slots.length ?? 0);
  for (let i = 0; i < n; i++) {
    const x = a?.slots[i];
    const y = b?.slots[i];
    if (x === y) continue;
    const key = base + i * 2 ** shift;
    if (shift === 0) yield [key, x as V | undefined, y as V | undefined];
    else yield* diffNodes(x as Node<V> | undefined, y as Node<V> | undefined, shift - BITS, key);
  }
}

export class TrieEditor<V> {
  private readonly owner = {};
  private done = false;
  private changed = false;
  constructor(
    private root: Node<V> | undefined,
    private shift: number,
    /** returned by finish() when nothing was set, so unchanged tries stay identical */
    private readonly original?: PTrie<V>,
  ) {}

  get(key: number): V | undefined {
    if (key < 0 || key >= 2 ** (this.shift + BITS)) return undefined;
    let node = this.root;
    for (let s = this.shift; s > 0 && node; s -= BITS) node = node.slots[(key >>> s) & MASK] as Node<V> | undefined;
    return node ? (node.slots[key & MASK] as V | undefined) : undefined;
  }

  set(key: number, value: V | undefined): void {
    if (this.done) throw new Error('TrieEditor used after finish()');
    if (!Number.isInteger(key) || key < 0 || key > MAX_KEY) throw new RangeError(`trie key ${key} out of range`);
    this.changed = true;
    if (!this.root) this.root = { owner: this.owner, slots: [] };
    while (key >= 2 ** (this.shift + BITS)) {
      this.root = { owner: this.owner, slots: [this.root] };
      this.shift += BITS;
    }
    let node = this.own(this.root);
    this.root = node;
    for (let s = this.shift; s > 0; s -= BITS) {
      const i = (key >>> s) & MASK;
      const child = node.slots[i] as Node<V> | undefined;
      const next = child ? this.own(child) : { owner: this.owner, slots: [] };
      node.slots[i] = next;
      node = next;
    }
    node.slots[key & MASK] = value;
  }

  finish(): PTrie<V> {
    this.done = true;
    if (!this.changed && this.original) return this.original;
    return new (PTrie as unknown as new (r: Node<V> | undefined, s: number) => PTrie<V>)(this.root, this.shift);
  }

  private own(n: Node<V>): Node<V> {
    return n.owner === this.owner ? n : { owner: this.owner, slots: n.slots.slice() };
  }
}
