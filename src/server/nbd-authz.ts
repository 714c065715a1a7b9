/**
 * Who may use an NBD export once TLS is up, as qemu-nbd's `--tls-authz ID`
 * decides it: the `--object` with that id is an `authz-simple` (one
 * `identity`), an `authz-list` (`policy=allow|deny`, the default deny, and
 * `rules.N.match`, `rules.N.policy`, `rules.N.format=exact|glob` tried in
 * order, the first match deciding) or an `authz-listfile` (the same list as
 * JSON in `filename`, read again for every connection, as QEMU's refresh
 * does). A client's identity is its certificate's distinguished name as
 * qemu-nbd 7.2 sees it through GnuTLS (the subject's parts in the
 * certificate's order, joined by commas: `C=GB,O=Example,CN=laptop` for a
 * certificate made with `-subj /C=GB/O=Example/CN=laptop`) or, with PSK,
 * its username.
 */

import { readFileSync } from 'node:fs';
import type { X509Certificate } from 'node:crypto';
import { UnsupportedError, UsageError } from '../errors.ts';
import type { TlsObject } from './nbd-tls.ts';

/** The decision for one identity (true: let in). */
export type NbdAuthz = (identity: string) => boolean;

interface Rule {
  readonly match: string;
  readonly allow: boolean;
  readonly glob: boolean;
}

/** The authorization `--tls-authz ID` names among the `--object` values. */
export function tlsAuthz(objects: readonly TlsObject[], id: string): NbdAuthz {
  const o = objects.find((x) => x.props.get('id') === id);
  if (!o) throw new UsageError(`No authorization object with id '${id}'`);
  const known = (keys: string[]) => {
    for (const k of o.props.keys()) if (!keys.includes(k) && !(o.type === 'authz-list' && /^rules\.\d+\.(match|policy|format)$/.test(k))) throw new UsageError(`Property '${o.type}.${k}' not found`);
  };
  switch (o.type) {
    case 'authz-simple': {
      known(['id', 'identity']);
      const identity = o.props.get('identity');
      if (identity === undefined) throw new UsageError(`Parameter 'identity' is missing`);
      return (who) => who === identity;
    }
    case 'authz-list': {
      known(['id', 'policy']);
      const byIndex = new Map<number, Map<string, string>>();
      for (const [k, v] of o.props) {
        const m = /^rules\.(\d+)\.(\w+)$/.exec(k);
        if (!m) continue;
        const i = Number(m[1]);
        if (!byIndex.has(i)) byIndex.set(i, new Map());
        byIndex.get(i)!.set(m[2]!, v);
      }
      const rules = [...byIndex.entries()].sort((a, b) => a[0] - b[0]).map(([, r]) => rule(r.get('match'), r.get('policy'), r.get('format')));
      return decide(rules, policy(o.props.get('policy')));
    }
    case 'authz-listfile': {
      known(['id', 'filename', 'refresh']);
      const file = o.props.get('filename');
      if (file === undefined) throw new UsageError(`Parameter 'filename' is missing`);
      const load = (): NbdAuthz => {
        let j: { policy?: unknown; rules?: unknown };
        try {
          j = JSON.parse(readFileSync(file, 'utf8'));
        } catch (e) {
          throw new UsageError(`Unable to read '${file}': ${(e as Error).message}`);
        }
        const list = Array.isArray(j.rules) ? j.rules : [];
        const rules = list.map((r: { match?: unknown; policy?: unknown; format?: unknown }) => rule(str(r.match), str(r.policy), str(r.format)));
        return decide(rules, policy(str(j.policy)));
      };
      load(); // a bad file is refused at start, as qemu-nbd refuses it
      return (who) => {
        try {
          return load()(who);
        } catch {
          return false; // a file that went bad since lets nobody in
        }
      };
    }
    case 'authz-pam':
      throw new UnsupportedError(`nbd: --tls-authz: '${o.type}' is not supported (authz-simple, authz-list and authz-listfile are)`);
    default:
      throw new UsageError(`Object with id '${id}' is not an authorization object`);
  }
}

const str = (v: unknown): string | undefined => (typeof v === 'string' ? v : undefined);

function policy(p: string | undefined): boolean {
  if (p === undefined || p === 'deny') return false;
  if (p === 'allow') return true;
  throw new UsageError(`Invalid parameter 'policy': '${p}' is not allow or deny`);
}

function rule(match: string | undefined, p: string | undefined, format: string | undefined): Rule {
  if (match === undefined) throw new UsageError(`Parameter 'match' is missing`);
  if (format !== undefined && format !== 'exact' && format !== 'glob') throw new UsageError(`Invalid parameter 'format': '${format}' is not exact or glob`);
  return { match, allow: policy(p ?? 'deny'), glob: format === 'glob' };
}

function decide(rules: readonly Rule[], dflt: boolean): NbdAuthz {
  const tests = rules.map((r) => ({ allow: r.allow, test: r.glob ? globTest(r.match) : (s: string) => s === r.match }));
  return (who) => tests.find((t) => t.test(who))?.allow ?? dflt;
}

/** fnmatch(3) without flags, as QEMU's glob rules use it: `*`, `?`, `[set]`, `\` escapes. */
function globTest(pattern: string): (s: string) => boolean {
  let re = '';
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i]!;
    if (c === '*') re += '[\\s\\S]*';
    else if (c === '?') re += '[\\s\\S]';
    else if (c === '\\' && i + 1 < pattern.length) re += escapeRe(pattern[++i]!);
    else if (c === '[') {
      const end = pattern.indexOf(']', i + 2);
      if (end < 0) re += '\\[';
      else {
        let set = pattern.slice(i + 1, end);
        const negate = set.startsWith('!');
        if (negate) set = set.slice(1);
        re += `[${negate ? '^' : ''}${set.replace(/[\\\]^]/g, '\\$&')}]`;
        i = end;
      }
    } else re += escapeRe(c);
  }
  const r = new RegExp(`^${re}$`);
  return (s) => r.test(s);
}

const escapeRe = (c: string) => c.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');

/**
 * A certificate's subject as qemu-nbd's x509 authz compares it (GnuTLS's
 * gnutls_x509_crt_get_dn in Debian 12): the parts in the certificate's
 * order, joined by commas, with RFC 4514's escapes in the values.
 */
export function distinguishedName(cert: X509Certificate): string {
  return cert.subject
    .split('\n')
    .filter((x) => x !== '')
    .map((part) => {
      const eq = part.indexOf('=');
      const value = part.slice(eq + 1).replace(/[,+"\\<>;]/g, '\\$&').replace(/^[ #]/, '\\$&').replace(/ $/, '\\ ');
      return `${part.slice(0, eq)}=${value}`;
    })
    .join(',');
}
