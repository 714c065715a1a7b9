/**
 * A getopt in the manner of qemu-img's: short options (clustered or not,
 * with their argument attached or next), long options with `=value` or a
 * following argument, and options anywhere among the positionals (GNU
 * permutation) until `--`.
 */

import { UsageError } from '../errors.ts';

export interface OptSpec {
  /** short option letters that take an argument, e.g. "fFOol" */
  readonly withArg: string;
  /** short option letters that take none */
  readonly flags: string;
  /** long options: name -> takes an argument */
  readonly long: Readonly<Record<string, boolean>>;
}

export interface Parsed {
  /** every option in order, short ones by letter, long ones by name */
  readonly opts: Array<[string, string | true]>;
  readonly positional: string[];
}

export function getopt(argv: readonly string[], spec: OptSpec, cmd: string): Parsed {
  const opts: Array<[string, string | true]> = [];
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      positional.push(...argv.slice(i + 1));
      break;
    }
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = a.slice(2, eq < 0 ? undefined : eq);
      if (!(name in spec.long)) throw new UsageError(`${cmd}: unrecognized option '--${name}'`);
      if (spec.long[name]) {
        if (eq >= 0) opts.push([name, a.slice(eq + 1)]);
        else if (i + 1 < argv.length) opts.push([name, argv[++i]!]);
        else throw new UsageError(`${cmd}: option '--${name}' requires an argument`);
      } else {
        if (eq >= 0) throw new UsageError(`${cmd}: option '--${name}' doesn't allow an argument`);
        opts.push([name, true]);
      }
      continue;
    }
    if (a.startsWith('-') && a.length > 1) {
      for (let j = 1; j < a.length; j++) {
        const c = a[j]!;
        if (spec.withArg.includes(c)) {
          const rest = a.slice(j + 1);
          if (rest) opts.push([c, rest]);
          else if (i + 1 < argv.length) opts.push([c, argv[++i]!]);
          else throw new UsageError(`${cmd}: option requires an argument -- '${c}'`);
          break;
        }
        if (spec.flags.includes(c)) opts.push([c, true]);
        else throw new UsageError(`${cmd}: invalid option -- '${c}'`);
      }
      continue;
    }
    positional.push(a);
  }
  return { opts, positional };
}

/** -U / --force-share: share every permission with the image's other users (read-only opens). */
export function forceShareOf(p: { readonly opts: ReadonlyArray<readonly [string, string | true]> }): boolean {
  return p.opts.some(([k]) => k === 'U' || k === 'force-share');
}

const SUFFIX: Record<string, number> = { b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/**
 * Sizes as qemu parses them: a number (decimal, or hex with 0x), optionally
 * fractional, with a binary suffix k/M/G/T/P/E (any case) or b for bytes.
 * `defaultUnit` applies without a suffix (bytes for qemu-io and qemu-img).
 */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(0x[0-9a-f]+|\d+(?:\.\d+)?|\.\d+)\s*([bkmgtpe])?(?:i?b)?\s*$/i.exec(text);
  if (!m) throw new UsageError(`invalid ${what} '${text}': expected a number with an optional suffix k, M, G, T, P or E`);
  const n = m[1]!.toLowerCase().startsWith('0x') ? parseInt(m[1]!, 16) : Number(m[1]);
  const mult = m[2] ? SUFFIX[m[2].toLowerCase()]! : 1;
  if (m[1]!.toLowerCase().startsWith('0x') && m[2] && m[2].toLowerCase() !== 'b') {
    // qemu refuses hex with a unit suffix; so do we, rather than guess
    throw new UsageError(`invalid ${what} '${text}': hex numbers take no unit suffix`);
  }
  const v = n * mult;
  if (!Number.isFinite(v) || v > Number.MAX_SAFE_INTEGER) throw new UsageError(`invalid ${what} '${text}': too large`);
  if (!Number.isInteger(v)) throw new UsageError(`invalid ${what} '${text}': not a whole number of bytes`);
  return v;
}

/** -o key=value,key2=value2 (qemu's ",," escapes a comma inside a value). */
export function parseOptionList(text: string): Map<string, string> {
  const out = new Map<string, string>();
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < text.length; i++) {
    if (text[i] === ',' && text[i + 1] === ',') {
      cur += ',';
      i++;
    } else if (text[i] === ',') {
      parts.push(cur);
      cur = '';
    } else cur += text[i];
  }
  parts.push(cur);
  for (const p of parts) {
    if (!p) continue;
    const eq = p.indexOf('=');
    if (eq < 0) out.set(p, 'on');
    else out.set(p.slice(0, eq), p.slice(eq + 1));
  }
  return out;
}

/** qemu-io's command line splitting: whitespace separated words, "quoted" words allowed. */
export function splitCommand(line: string): string[] {
  const out: string[] = [];
  const re = /"([^"]*)"|'([^']*)'|(\S+)/g;
  for (let m = re.exec(line); m; m = re.exec(line)) out.push(m[1] ?? m[2] ?? m[3]!);
  return out;
}

/** The cache modes QEMU's bdrv_parse_cache_mode takes ('off' is 'none'), for -t and -T. */
export const CACHE_MODES: readonly string[] = ['unsafe', 'writeback', 'writethrough', 'none', 'off', 'directsync'];

/** qemu's two lines after an unparsable size ("Invalid X specified. " goes before the first). */
export const SIZE_SUFFIX_HELP = ['You may use k, M, G, T, P or E suffixes for', 'kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.'] as const;
