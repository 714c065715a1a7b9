/**
 * `qledger journal dump [--output=human|json] FILE`: the journal of an image
 * as the event stream it is, one record per line (or JSON), read-only.
 */

import { UsageError, hex } from '../errors.ts';
import { readJournal, type JournalDump } from '../engine/journal/locate.ts';
import { describe, type JournalRecord } from '../journal/records.ts';
import { getopt } from './args.ts';
import type { Output } from './output.ts';


export async function runJournal(argv: string[], io: Output): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub !== 'dump') throw new UsageError(`journal: unknown subcommand '${sub ?? ''}' (usage: qledger journal dump [--output=human|json] FILE)`);
  const p = getopt(rest, { withArg: 'f', flags: '', long: { output: true } }, 'journal dump');
  const output = p.opts.find(([k]) => k === 'output')?.[1] ?? 'human';
  if (output !== 'human' && output !== 'json') throw new UsageError('--output must be used with human or json as argument.');
  const fmt = p.opts.find(([k]) => k === 'f')?.[1];
  if (fmt !== undefined && fmt !== 'qcow2') throw new UsageError(`journal dump: only qcow2 images have a journal (got -f ${String(fmt)})`);
  if (p.positional.length !== 1) throw new UsageError('journal dump: expecting one image file name');
  const path = p.positional[0]!;
  const d = await readJournal(path);
  if (output === 'json') io.out(JSON.stringify(toJson(d), null, 4) + '\n');
  else io.out(human(path, d));
  return 0;
}

function human(path: string, d: JournalDump): string {
  const lines: string[] = [];
  if (d.state === 'v2') return `${path}: version 2 images have no journal\n`;
  if (d.state === 'absent') return `${path}: no journal${d.live ? ' (but the journal autoclear bit is set)' : ''}\n`;
  if (d.state === 'invalid') return `${path}: journal fails validation: ${d.reason}\n`;
  const a = d.area!;
  lines.push(`journal area ${hex(a.offset)}, ${a.size} bytes, generation ${hex(a.generation)}, applied up to tx ${a.appliedTx}, ${d.live ? 'live' : 'not live (autoclear bit clear)'}`);
  for (const t of d.transactions) {
    lines.push(`tx ${t.tx}: ${t.frames} frame${t.frames === 1 ? '' : 's'} from seq ${t.firstSeq}, ${t.committed ? 'committed' : 'not committed (torn)'}, ${t.applied ? 'applied' : 'not applied'}`);
    for (const r of t.records) lines.push('  ' + describe(r));
  }
  lines.push(`end of journal at area offset ${hex(d.end!.at)}: ${d.end!.reason}`);
  return lines.join('\n') + '\n';
}

/** Records as plain JSON: 64-bit values as hex strings, table images as base64. */
export function recordJson(r: JournalRecord): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(r)) {
    if (typeof v === 'bigint') o[k] = hex(v);
    else if (v instanceof Uint8Array) o[k] = Buffer.from(v).toString('base64');
    else o[k] = v;
  }
  return o;
}

function toJson(d: JournalDump): Record<string, unknown> {
  return {
    state: d.state,
    live: d.live,
    ...(d.reason !== undefined ? { reason: d.reason } : {}),
    ...(d.area ? { area: { offset: d.area.offset, size: d.area.size, generation: hex(d.area.generation), 'applied-tx': d.area.appliedTx } } : {}),
    transactions: d.transactions.map((t) => ({ tx: t.tx, 'first-seq': t.firstSeq, frames: t.frames, committed: t.committed, applied: t.applied, records: t.records.map(recordJson) })),
    ...(d.end ? { end: { offset: d.end.at, reason: d.end.reason } } : {}),
  };
}
