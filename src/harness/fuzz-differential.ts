/**
 * The fuzzer's comparison with QEMU (qledger fuzz --qemu): the same case's
 * bytes given to qemu-img and qemu-io, their outcome set beside qledger's.
 *
 * Two kinds of result, kept apart:
 * - check's totals (corruptions, leaks, check errors) must be equal: a
 *   difference is a `disagreement`, a failure of the campaign;
 * - whether an image opens (`info`) and reads (`read`) is for judgment: QEMU
 *   and qledger refuse different damage on purpose (qledger refuses tables
 *   past the end of the file that QEMU reads as zeros, for one). Those cases
 *   are counted in groups, by which side refused and the refusing side's
 *   message with its numbers and names taken out, so a campaign's summary
 *   says what the remaining differences are and how many of each.
 *
 * Each probe is one qemu process on a file: the rate of a campaign with
 * --qemu is set by them, not by qledger.
 */

import { spawnSync } from 'node:child_process';
import { u64 } from '../format/bytes.ts';

/** qemu-img check's totals on a file, or undefined when it could not check it. */
export function qemuTotals(file: string): string | undefined {
  const q = spawnSync('qemu-img', ['check', '--output=json', file], { encoding: 'utf8', timeout: 60_000 });
  if (q.status === null || q.status === 1 || q.status === 63) return undefined;
  try {
    const j = JSON.parse(q.stdout);
    return `${j['corruptions'] ?? 0}/${j['leaks'] ?? 0}/${j['check-errors'] ?? 0}`;
  } catch {
    return undefined;
  }
}

/** The commands whose outcome is compared for judgment. */
export type ProbeCommand = 'info' | 'read';

/** What QEMU made of the file: undefined when it gave no verdict (killed, timed out). */
export interface QemuOutcome {
  readonly ok: boolean;
  /** its first error line, when not ok */
  readonly message: string;
}

// The fuzzer opens its cases with the format probed and no backing file: a file with qcow2's
// magic is opened as qcow2 with no backing file, any other as QEMU probes it (raw, for these).
function isQcow2(bytes: Uint8Array): boolean {
  return bytes.length >= 4 && bytes[0] === 0x51 && bytes[1] === 0x46 && bytes[2] === 0x49 && bytes[3] === 0xfb;
}

function spec(file: string, bytes: Uint8Array): string {
  return isQcow2(bytes) ? `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: file }, backing: null })}` : file;
}

function outcome(r: ReturnType<typeof spawnSync>, what: RegExp): QemuOutcome | undefined {
  if (r.status === null) return undefined;
  const out = `${r.stdout ?? ''}${r.stderr ?? ''}`;
  const line = out.split('\n').find((l) => what.test(l)) ?? out.split('\n').find((l) => l.trim() !== '') ?? '';
  return r.status === 0 ? { ok: true, message: '' } : { ok: false, message: line };
}

/**
 * QEMU's verdict on the fuzzer's command `cmd` for this file, whose bytes are
 * `bytes`: `info` is `qemu-img info` (QEMU's open validates what it trusts),
 * `read` is qemu-io reading what the fuzzer's read command reads (the first
 * MiB and the last 4 KiB of the virtual disk).
 */
export function qemuProbe(cmd: ProbeCommand, file: string, bytes: Uint8Array): QemuOutcome | undefined {
  if (cmd === 'info') {
    const r = spawnSync('qemu-img', ['info', '--output=json', spec(file, bytes)], { encoding: 'utf8', timeout: 60_000 });
    return outcome(r, /qemu-img:/);
  }
  // the virtual size as QEMU takes it (rounded down to sectors; a raw file's length); a header too short to hold it reads as 0
  const raw = !isQcow2(bytes) ? bytes.length : bytes.length >= 32 ? u64(bytes, 24) : 0;
  const size = Number.isSafeInteger(raw) ? Math.floor(raw / 512) * 512 : 2 ** 53;
  const cmds = ['-c', `read -q 0 ${Math.min(size, 1 << 20)}`];
  if (size > 0) cmds.push('-c', `read -q ${Math.max(0, size - 4096)} ${Math.min(4096, size)}`);
  const r = spawnSync('qemu-io', ['-r', ...cmds, spec(file, bytes)], { encoding: 'utf8', timeout: 60_000 });
  return outcome(r, /failed|can't open|qemu-io:/);
}

/**
 * A refusal's message with what varies between cases taken out (paths, numbers,
 * offsets), so refusals for the same reason fall in one group.
 */
export function reasonOf(message: string): string {
  let m = message.split('\n')[0]!.trim();
  m = m.replace(/^[A-Za-z]*Error: /, '');
  m = m.replace(/^qemu-(?:img|io): /, '');
  m = m.replace(/^(?:Could not open|can't open(?: device)?) '?json:\{.*?"backing":null\}'?: /, '');
  m = m.replace(/^(?:Could not open|can't open(?: device)?) '[^']*': /, '');
  m = m.replace(/^case-\d+\.qcow2: /, '');
  m = m.replace(/'[^'\s]*'/g, "'…'");
  m = m.replace(/0x[0-9a-fA-F]+/g, 'X').replace(/\b\d+\b/g, 'N');
  return m.length > 160 ? `${m.slice(0, 157)}...` : m;
}

/** One group of cases where the two tools differ on whether a command works. */
export interface DifferentialGroup {
  readonly command: ProbeCommand;
  /** `qemu-only`: QEMU does it, qledger refuses; `qledger-only`: the other way round */
  readonly side: 'qemu-only' | 'qledger-only';
  /** the refusing side's message, normalised */
  readonly reason: string;
  readonly count: number;
  /** the first case of the group, to reproduce it */
  readonly example: number;
}

/** The groups of a campaign, counted as cases come. */
export class DifferentialTally {
  private readonly groups = new Map<string, { command: ProbeCommand; side: 'qemu-only' | 'qledger-only'; reason: string; count: number; example: number }>();
  /** cases where both tools were asked and gave a verdict */
  compared = 0;

  /** A tally carried on from a checkpoint's groups (a resumed campaign). */
  constructor(from?: { readonly compared: number; readonly groups: readonly DifferentialGroup[] }) {
    if (!from) return;
    this.compared = from.compared;
    for (const g of from.groups) this.groups.set(`${g.command}\0${g.side}\0${g.reason}`, { ...g });
  }

  /** qledger's outcome (`ok`, or refused with `message`) beside QEMU's, for case k. */
  add(k: number, command: ProbeCommand, ours: { ok: boolean; message: string }, theirs: QemuOutcome): void {
    this.compared++;
    if (ours.ok === theirs.ok) return;
    const side = theirs.ok ? 'qemu-only' : 'qledger-only';
    const reason = reasonOf(theirs.ok ? ours.message : theirs.message);
    const key = `${command}\0${side}\0${reason}`;
    const g = this.groups.get(key);
    if (g) g.count++;
    else this.groups.set(key, { command, side, reason, count: 1, example: k });
  }

  /** The groups, largest first. */
  list(): DifferentialGroup[] {
    return [...this.groups.values()].map((g) => ({ ...g })).sort((a, b) => b.count - a.count || a.example - b.example);
  }
}
