/**
 * TLS credentials for the NBD server, as qemu-nbd takes them: `--object
 * tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]` or
 * `--object tls-creds-psk,id=ID,dir=DIR,endpoint=server` with
 * `--tls-creds ID`. The files are QEMU's names in DIR: ca-cert.pem,
 * server-cert.pem, server-key.pem (and ca-crl.pem when there) for X.509;
 * keys.psk (lines `username:hexkey`) for PSK. Also the upgrade of a
 * connection once a client's NBD_OPT_STARTTLS has been acknowledged.
 */

import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { TLSSocket, createSecureContext, type SecureContext } from 'node:tls';
import type { Socket } from 'node:net';
import { UsageError } from '../errors.ts';
import { distinguishedName } from './nbd-authz.ts';

export interface NbdTls {
  readonly kind: 'x509' | 'psk';
  readonly context: SecureContext;
  /** X.509: ask for and check the client's certificate (QEMU's verify-peer, on by default) */
  readonly verifyPeer: boolean;
  /** PSK: the key of each identity */
  readonly keys?: ReadonlyMap<string, Buffer> | undefined;
  /** who may go on once TLS is up, by identity (qemu-nbd --tls-authz; nbd-authz.ts); everyone when absent */
  readonly authz?: ((identity: string) => boolean) | undefined;
}

/** A `--object` value: its type and its properties (the CLI parses QEMU's `type,key=value,…`). */
export interface TlsObject {
  readonly type: string;
  readonly props: ReadonlyMap<string, string>;
}

const onOff = (v: string | undefined, name: string, dflt: boolean): boolean => {
  if (v === undefined) return dflt;
  if (v === 'on' || v === 'yes' || v === 'true') return true;
  if (v === 'off' || v === 'no' || v === 'false') return false;
  throw new UsageError(`Parameter '${name}' expects 'on' or 'off'`);
};

/** Where a server's credentials are: QEMU's file names in `dir` (X.509: verifyPeer on by default). */
export type NbdTlsSpec = { readonly kind: 'x509'; readonly dir: string; readonly verifyPeer?: boolean | undefined } | { readonly kind: 'psk'; readonly dir: string };

/** The credentials `--tls-creds ID` names among the `--object` values, read from their directory. */
export function tlsCredentials(objects: readonly TlsObject[], id: string): NbdTls {
  const o = objects.find((x) => x.props.get('id') === id);
  if (!o) throw new UsageError(`No TLS credentials with id '${id}'`);
  if (o.type !== 'tls-creds-x509' && o.type !== 'tls-creds-psk') throw new UsageError(`Object with id '${id}' is not TLS credentials`);
  for (const k of o.props.keys()) if (!['id', 'dir', 'endpoint', 'verify-peer', 'priority', 'username'].includes(k)) throw new UsageError(`Property '${o.type}.${k}' not found`);
  const endpoint = o.props.get('endpoint') ?? 'client';
  // qemu-nbd's words
  if (endpoint !== 'server') throw new UsageError('Expecting TLS credentials with a server endpoint');
  const dir = o.props.get('dir');
  if (dir === undefined) throw new UsageError(`TLS credentials '${id}' name no directory (dir=)`);
  if (o.type === 'tls-creds-psk') return loadTlsCredentials({ kind: 'psk', dir });
  return loadTlsCredentials({ kind: 'x509', dir, verifyPeer: onOff(o.props.get('verify-peer'), 'verify-peer', true) });
}

/** PSK with and without an ephemeral exchange: the suites GnuTLS clients (libnbd, QEMU) offer that OpenSSL has. */
const PSK_CIPHERS = 'ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256';

/** A server's TLS credentials (serveNbd's `tls`), read from their directory. */
export function loadTlsCredentials(spec: NbdTlsSpec): NbdTls {
  const file = (name: string, required: boolean): Buffer | undefined => {
    const f = join(spec.dir, name);
    if (!existsSync(f)) {
      if (required) throw new UsageError(`Unable to access credentials ${f}: No such file or directory`);
      return undefined;
    }
    return readFileSync(f);
  };
  if (spec.kind === 'x509') {
    const context = createSecureContext({ ca: file('ca-cert.pem', true), cert: file('server-cert.pem', true), key: file('server-key.pem', true), crl: file('ca-crl.pem', false) });
    return { kind: 'x509', context, verifyPeer: spec.verifyPeer ?? true };
  }
  const keys = new Map<string, Buffer>();
  for (const line of file('keys.psk', true)!.toString('utf8').split('\n')) {
    const t = line.trim();
    if (!t) continue;
    const colon = t.indexOf(':');
    if (colon <= 0 || !/^[0-9a-fA-F]+$/.test(t.slice(colon + 1))) throw new UsageError(`${join(spec.dir, 'keys.psk')}: a line is not 'username:hexkey'`);
    keys.set(t.slice(0, colon), Buffer.from(t.slice(colon + 1), 'hex'));
  }
  const context = createSecureContext({ ciphers: PSK_CIPHERS, maxVersion: 'TLSv1.2' });
  return { kind: 'psk', context, verifyPeer: false, keys };
}

/**
 * The server side of TLS over `raw`, resolved once the handshake has
 * succeeded (rejects when it fails), with the client's identity: its
 * certificate's distinguished name (X.509) or its PSK username.
 */
export function upgrade(raw: Socket, t: NbdTls): Promise<{ socket: TLSSocket; identity: string | undefined }> {
  let pskIdentity: string | undefined;
  const s = new TLSSocket(raw, {
    isServer: true,
    secureContext: t.context,
    requestCert: t.kind === 'x509' && t.verifyPeer,
    rejectUnauthorized: t.kind === 'x509' && t.verifyPeer,
    ...(t.kind === 'psk' ? { pskCallback: (_socket: TLSSocket, identity: string) => {
          const key = t.keys!.get(identity);
          if (key) pskIdentity = identity;
          return key ?? null;
        }, ciphers: PSK_CIPHERS, maxVersion: 'TLSv1.2' as const } : {}),
  });
  return new Promise((resolve, reject) => {
    const fail = (e: Error) => {
      s.destroy();
      reject(e);
    };
    s.once('secure', () => {
      s.off('error', fail);
      const cert = t.kind === 'x509' ? s.getPeerX509Certificate() : undefined;
      resolve({ socket: s, identity: t.kind === 'psk' ? pskIdentity : cert ? distinguishedName(cert) : undefined });
    });
    s.once('error', fail);
    s.once('close', () => reject(new Error('the client closed the connection during the TLS handshake')));
  });
}
