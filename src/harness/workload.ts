/**
 * Crash-test workloads: guest operations, their qemu-io command lines
 * (qledger io and qemu-io both take them; `make_empty`, `dedup`, `amend`,
 * `reopen`, `rebase_flatten`, `commit`, the snapshot and the bitmap lines are workload-file lines of
 * qledger's own, with no qemu-io command)
 * and the parser for workload files of such lines.
 */

import { QledgerError } from '../errors.ts';

export type GuestOp =
  | { readonly op: 'write'; readonly offset: number; readonly length: number; readonly pattern: number }
  /** qemu-io write -c: whole clusters that hold no data yet (refused otherwise, as by QEMU) */
  | { readonly op: 'compress'; readonly offset: number; readonly length: number; readonly pattern: number }
  | { readonly op: 'zero'; readonly offset: number; readonly length: number; readonly unmap: boolean }
  | { readonly op: 'discard'; readonly offset: number; readonly length: number }
  | { readonly op: 'flush' }
  | { readonly op: 'truncate'; readonly size: number }
  /**
   * the image emptied (qemu-img commit's make_empty); workload files only: qemu-io has no such command.
   * `offline`: between sessions, by the O(1) path qledger commit takes (make_empty_offline)
   */
  | { readonly op: 'make-empty'; readonly offline?: boolean }
  /** qemu-img snapshot -c / -a / -d NAME; workload files only (snapshot_create, snapshot_apply, snapshot_delete) */
  | { readonly op: 'snapshot'; readonly action: SnapshotAction; readonly name: string }
  /** qemu-img amend -o compat=V or refcount_bits=N (an offline rewrite between sessions); workload files only (amend OPT=V) */
  | { readonly op: 'amend'; readonly option: 'compat' | 'refcount_bits'; readonly value: string }
  /** qledger dedup: offline content dedup of the active tree; workload files only (dedup) */
  | { readonly op: 'dedup' }
  /** qemu-img bitmap --add [-g GRAN] / --remove / --clear / --enable / --disable NAME; workload files only (bitmap_add NAME [GRAN], ...) */
  | { readonly op: 'bitmap'; readonly action: BitmapAction; readonly name: string; readonly granularity?: number | undefined }
  /** the session closes clean and a new one opens (bitmaps stored, journal checkpointed); workload files only (reopen) */
  | { readonly op: 'reopen' }
  /**
   * qemu-img rebase -b '' (onto no backing file: the backing file's content copied in where the image
   * allocates nothing, then the header switched) or with \`unsafe\`, rebase -u -b '' (the header only);
   * workload files only (rebase_flatten, rebase_flatten_unsafe)
   */
  | { readonly op: 'rebase'; readonly unsafe: boolean }
  /** qemu-img commit: the top's data into its backing file, made durable, then the top emptied; workload files only (commit) */
  | { readonly op: 'commit' };

export type BitmapAction = 'add' | 'remove' | 'clear' | 'enable' | 'disable';

export type SnapshotAction = 'create' | 'apply' | 'delete';

/** The operations that have no qemu-io command: a workload with one replays from a workload file. */
export function needsWorkloadFile(ops: readonly GuestOp[]): boolean {
  return ops.some((o) => o.op === 'make-empty' || o.op === 'snapshot' || o.op === 'amend' || o.op === 'dedup' || o.op === 'bitmap' || o.op === 'reopen' || o.op === 'rebase' || o.op === 'commit');
}

/** The workload as qemu-io commands (qledger io and qemu-io both take them). */
export function workloadCommands(ops: readonly GuestOp[]): string[] {
  return ops.map((o) => {
    switch (o.op) {
      case 'write':
        return `write -P ${o.pattern} ${o.offset} ${o.length}`;
      case 'compress':
        return `write -c -P ${o.pattern} ${o.offset} ${o.length}`;
      case 'zero':
        return `write -z${o.unmap ? ' -u' : ''} ${o.offset} ${o.length}`;
      case 'discard':
        return `discard ${o.offset} ${o.length}`;
      case 'flush':
        return 'flush';
      case 'truncate':
        return `truncate ${o.size}`;
      case 'make-empty':
        return o.offline ? 'make_empty_offline' : 'make_empty';
      case 'snapshot':
        return `snapshot_${o.action} ${o.name}`;
      case 'amend':
        return `amend ${o.option}=${o.value}`;
      case 'dedup':
        return 'dedup';
      case 'bitmap':
        return `bitmap_${o.action} ${o.name}${o.granularity !== undefined ? ` ${o.granularity}` : ''}`;
      case 'reopen':
        return 'reopen';
      case 'rebase':
        return o.unsafe ? 'rebase_flatten_unsafe' : 'rebase_flatten';
      case 'commit':
        return 'commit';
    }
  });
}

/** Parse qemu-io-style commands (one per line, '#' comments) into guest ops. */
export function parseWorkload(text: string): GuestOp[] {
  const out: GuestOp[] = [];
  for (const [n, raw] of text.split('\n').entries()) {
    const line = raw.replace(/#.*/, '').trim();
    if (!line) continue;
    const w = line.split(/\s+/);
    const bad = () => new QledgerError('E_USAGE', `workload line ${n + 1}: cannot parse '${line}'`);
    const num = (s: string | undefined) => {
      if (s === undefined) throw bad();
      const m = /^(\d+)([kKmMgG]?)$/.exec(s);
      if (!m) throw bad();
      return Number(m[1]) * ({ '': 1, k: 1024, m: 1 << 20, g: 1 << 30 } as Record<string, number>)[m[2]!.toLowerCase()]!;
    };
    if (w[0] === 'flush') out.push({ op: 'flush' });
    else if (w[0] === 'make_empty') out.push({ op: 'make-empty' });
    else if (w[0] === 'make_empty_offline') out.push({ op: 'make-empty', offline: true });
    else if (w[0] === 'dedup' && w.length === 1) out.push({ op: 'dedup' });
    else if (w[0] === 'reopen' && w.length === 1) out.push({ op: 'reopen' });
    else if (w[0] === 'commit' && w.length === 1) out.push({ op: 'commit' });
    else if ((w[0] === 'rebase_flatten' || w[0] === 'rebase_flatten_unsafe') && w.length === 1) out.push({ op: 'rebase', unsafe: w[0] === 'rebase_flatten_unsafe' });
    else if (/^bitmap_(add|remove|clear|enable|disable)$/.test(w[0]!)) {
      const action = w[0]!.slice('bitmap_'.length) as BitmapAction;
      if (w.length !== 2 && !(action === 'add' && w.length === 3)) throw bad();
      out.push({ op: 'bitmap', action, name: w[1]!, granularity: w[2] !== undefined ? num(w[2]) : undefined });
    }
    else if (w[0] === 'amend') {
      const m = /^(compat|refcount_bits)=(\S+)$/.exec(w[1] ?? '');
      if (w.length !== 2 || !m) throw bad();
      out.push({ op: 'amend', option: m[1] as 'compat' | 'refcount_bits', value: m[2]! });
    } else if (w[0] === 'snapshot_create' || w[0] === 'snapshot_apply' || w[0] === 'snapshot_delete') {
      if (w.length !== 2) throw bad();
      out.push({ op: 'snapshot', action: w[0].slice('snapshot_'.length) as SnapshotAction, name: w[1]! });
    }
    else if (w[0] === 'truncate') out.push({ op: 'truncate', size: num(w[1]) });
    else if (w[0] === 'discard') out.push({ op: 'discard', offset: num(w[1]), length: num(w[2]) });
    else if (w[0] === 'write') {
      const args = w.slice(1);
      const z = args.includes('-z');
      const u = args.includes('-u');
      const pi = args.indexOf('-P');
      const pattern = pi >= 0 ? Number(args[pi + 1]) : 0xcd;
      const pos = args.filter((a, i) => !a.startsWith('-') && !(pi >= 0 && i === pi + 1));
      if (pos.length !== 2 || !Number.isInteger(pattern) || pattern < 0 || pattern > 255) throw bad();
      if (z) out.push({ op: 'zero', offset: num(pos[0]), length: num(pos[1]), unmap: u });
      else if (args.includes('-c')) out.push({ op: 'compress', offset: num(pos[0]), length: num(pos[1]), pattern });
      else out.push({ op: 'write', offset: num(pos[0]), length: num(pos[1]), pattern });
    } else throw bad();
  }
  return out;
}

/** A shell line that replays a workload with qledger (for failure reports). */
export function reproduction(ops: readonly GuestOp[], o: { readonly create: import('../engine/create.ts').CreateOptions; readonly seed: number; readonly fault?: string | undefined; readonly dedup?: boolean | undefined; readonly withBacking?: 'raw' | 'qcow2' | undefined }): string {
  const c = o.create;
  const opts: string[] = [];
  if (c.clusterSize) opts.push(`cluster_size=${c.clusterSize}`);
  if (c.compat) opts.push(`compat=${c.compat}`);
  if (c.refcountBits) opts.push(`refcount_bits=${c.refcountBits}`);
  if (c.lazyRefcounts) opts.push('lazy_refcounts=on');
  if (c.extendedL2) opts.push('extended_l2=on');
  if (needsWorkloadFile(ops) || o.withBacking) {
    // make_empty and the snapshot lines have no qemu-io command: the workload file is the way to replay them
    return `printf '%s\\n' ${workloadCommands(ops).map((x) => `'${x}'`).join(' ')} > workload.txt && qledger crash-test${opts.length ? ` -o ${opts.join(',')},size=${c.size ?? 0}` : ` -o size=${c.size ?? 0}`} --workload workload.txt --seed ${o.seed}${o.fault ? ` --fault ${o.fault}` : ''}${o.dedup ? ' --dedup' : ''}${o.withBacking ? ` --backing ${o.withBacking}` : ''}`;
  }
  const cmds = workloadCommands(ops).map((x) => `-c '${x}'`).join(' ');
  return `qledger create -f qcow2${opts.length ? ` -o ${opts.join(',')}` : ''} crash.qcow2 ${c.size ?? 0} && qledger io${o.dedup ? ' --dedup' : ''} ${cmds} crash.qcow2   # crash-test --seed ${o.seed}${o.fault ? ` --fault ${o.fault}` : ''}${o.dedup ? ' --dedup' : ''}`;
}
