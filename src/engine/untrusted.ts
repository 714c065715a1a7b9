/**
 * The untrusted-image policy (`Image.open(…, { trusted: false })`,
 * `--untrusted`): what an image from somewhere else may make qledger open.
 * A backing file or external data file must lie inside the allowed
 * directory (by default the image's own, symbolic links resolved), be named
 * as a plain file (no protocol, no json:), and a backing file must name its
 * format (nothing is probed: a raw file probed as qcow2 is how a guest
 * reads the host's files); the chain is at most 16 images deep, and an
 * image's tables together at most 256 MiB. Each refusal is one line naming
 * the field and the reason.
 */

import { realpathSync } from 'node:fs';
import { dirname, isAbsolute, relative, resolve } from 'node:path';
import { UsageError } from '../errors.ts';
import type { ParsedHeader } from '../format/header.ts';

export interface UntrustedPolicy {
  /** backing and data files must lie inside this directory (default: the top image's) */
  readonly allowedDir?: string | undefined;
}

/** How deep an untrusted chain may be (QEMU's limit is the trusted one). */
export const UNTRUSTED_MAX_DEPTH = 16;
/** L1 table, refcount table and snapshot table bytes an untrusted image may ask for, together. */
export const UNTRUSTED_MAX_METADATA = 256 * 1024 * 1024;

export class UntrustedError extends UsageError {
  constructor(message: string, data: Record<string, unknown> = {}) {
    super(message, { ...data, untrusted: true });
  }
}

function real(p: string): string {
  try {
    return realpathSync(p);
  } catch {
    // not there yet: its directory's real path and the name
    try {
      return resolve(realpathSync(dirname(p)), p.slice(p.lastIndexOf('/') + 1));
    } catch {
      return resolve(p);
    }
  }
}

/** The directory an untrusted top image at `path` may reference files in. */
export function allowedDirOf(path: string, policy: UntrustedPolicy): string {
  return real(policy.allowedDir ?? dirname(resolve(path)));
}

/**
 * Refuse a reference an untrusted image makes: `field` names it in the
 * message ("backing file", "data file"), `name` as the header holds it,
 * `resolved` as qledger would open it.
 */
export function checkReference(image: string, field: 'backing file' | 'data file', name: string, resolved: string, allowedDir: string, format?: string | undefined): void {
  if (name.startsWith('json:') || /^[a-z][a-z0-9+.-]*:/i.test(name)) throw new UntrustedError(`${image}: ${field} '${name}' is not a plain file name; an untrusted image may name only files`, { field, name });
  const target = real(resolved);
  const rel = relative(allowedDir, target);
  if (rel.startsWith('..') || isAbsolute(rel)) throw new UntrustedError(`${image}: ${field} '${name}' (${target}) is outside the allowed directory ${allowedDir}`, { field, name, target, allowedDir });
  if (field === 'backing file' && format === undefined) throw new UntrustedError(`${image}: backing file '${name}' names no format; an untrusted image's backing file is never probed (rebase with -F, or open it trusted)`, { field, name });
}

/** Refuse an untrusted image whose tables ask for more memory than the policy allows. */
export function checkMetadataSize(image: string, parsed: ParsedHeader, snapshotTableBytes: number): void {
  const h = parsed.header;
  const cs = 2 ** h.clusterBits;
  const bytes = h.l1Size * 8 + h.refcountTableClusters * cs + snapshotTableBytes;
  if (bytes > UNTRUSTED_MAX_METADATA) throw new UntrustedError(`${image}: its L1, refcount and snapshot tables take ${bytes} bytes, more than the ${UNTRUSTED_MAX_METADATA} an untrusted image may`, { bytes });
}
