/**
 * Image locking as QEMU's file driver does it (block/file-posix.c,
 * raw_apply_lock_bytes and raw_check_lock_bytes), so that qemu-img, qemu-io
 * and qemu-nbd refuse an image qledger is writing and qledger refuses one
 * they are writing, with the same words.
 *
 * A user of a file holds permissions (QEMU's BLK_PERM_* bits) and shares
 * some with other users. Both are advertised with shared OFD byte-range
 * locks: byte 100 + bit for each permission held, byte 200 + bit for each
 * permission *not* shared. Before using a file, a user takes its own locks,
 * then tests for conflicting ones held by other open file descriptions:
 * a permission it wants that someone does not share (byte 200 + bit locked),
 * or a permission it does not share that someone holds (byte 100 + bit).
 *
 * OFD locks belong to an open file description, so two opens in one process
 * conflict like two processes. They need the native helper; without it the
 * same rules hold within this process only (a registry by device and inode).
 */

import { QledgerError } from '../errors.ts';
import { native } from './native.ts';

/** QEMU's permission bits, in the order of its lock bytes. */
export const PERM_CONSISTENT_READ = 0x1;
export const PERM_WRITE = 0x2;
export const PERM_WRITE_UNCHANGED = 0x4;
export const PERM_RESIZE = 0x8;
export const PERM_ALL = 0xf;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'] as const;
const PERM_BITS = [0, 1, 2, 3] as const;

/** Offsets of the lock bytes (RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE). */
export const LOCK_PERM_BASE = 100;
export const LOCK_SHARED_BASE = 200;

/** What one user of a file holds and what it lets others hold. */
export interface LockPermissions {
  readonly perm: number;
  readonly shared: number;
}

/**
 * The permissions QEMU's qcow2 driver takes on its files, read off the
 * locks a running qemu-io holds (bytes in /proc/locks):
 * - an image (or backing file) read-only: reads, shares all but write and resize;
 * - an image read-write: reads, writes and resizes, shares reads and unchanged writes;
 * - an external data file: the same permissions, sharing all but resize;
 * - with force-share (read-only only): reads, shares everything.
 */
export function imagePermissions(opts: { readOnly: boolean; forceShare?: boolean | undefined; dataFile?: boolean | undefined }): LockPermissions {
  if (opts.forceShare) return { perm: PERM_CONSISTENT_READ, shared: PERM_ALL };
  const perm = opts.readOnly ? PERM_CONSISTENT_READ : PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE;
  const shared = opts.dataFile ? PERM_ALL & ~PERM_RESIZE : opts.readOnly ? PERM_ALL & ~(PERM_WRITE | PERM_RESIZE) : PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED;
  return { perm, shared };
}

/** The image is in use by someone whose permissions conflict with ours. */
export class LockedError extends QledgerError {
  constructor(path: string, permission: string, shared: boolean) {
    super('E_LOCKED', `Failed to get ${shared ? 'shared ' : ''}"${permission}" lock`, { path, permission, shared, hint: `Is another process using the image [${path}]?` });
  }
}

/** Users of each file in this process, by device and inode (the rules without OFD locks). */
const inProcess = new Map<string, Set<HeldLock>>();

/** The lock bytes a user's permissions take. */
function lockBytes(p: LockPermissions): number[] {
  const bytes: number[] = [];
  for (const i of PERM_BITS) if (p.perm & (1 << i)) bytes.push(LOCK_PERM_BASE + i);
  for (const i of PERM_BITS) if (~p.shared & (1 << i)) bytes.push(LOCK_SHARED_BASE + i);
  return bytes;
}

export class HeldLock {
  private released = false;
  private constructor(
    private readonly fd: number,
    private readonly key: string,
    readonly permissions: LockPermissions,
    private readonly ofdBytes: readonly number[],
  ) {}

  /**
   * Take the locks for `permissions` on the open file `fd` (file identity
   * `key`: device and inode), then test for conflicts; on a conflict the
   * locks are dropped again and a LockedError names the first permission,
   * in QEMU's order and words.
   */
  static acquire(fd: number, key: string, path: string, permissions: LockPermissions): HeldLock {
    const taken: number[] = [];
    const release = () => {
      for (const b of taken) native!.ofdLock!(fd, b, 1, 0);
    };
    let ofd = native?.ofdLock !== undefined && native.ofdHeld !== undefined;
    if (ofd) {
      for (const b of lockBytes(permissions)) {
        try {
          native!.ofdLock!(fd, b, 1, 1);
        } catch (e) {
          release();
          taken.length = 0;
          // only an exclusive lock (never QEMU's) refuses a shared one
          if ((e as { code?: string }).code === 'EAGAIN') throw new LockedError(path, nameOfByte(b), b >= LOCK_SHARED_BASE);
          // a file system without OFD locks: the rules still hold within this process
          ofd = false;
          break;
        }
        taken.push(b);
      }
    }
    const others = inProcess.get(key) ?? new Set<HeldLock>();
    const heldByOthers = (byte: number): boolean => {
      if (ofd && native!.ofdHeld!(fd, byte, 1)) return true;
      for (const o of others) if (lockBytes(o.permissions).includes(byte)) return true;
      return false;
    };
    for (const i of PERM_BITS) {
      if (permissions.perm & (1 << i) && heldByOthers(LOCK_SHARED_BASE + i)) {
        if (ofd) release();
        throw new LockedError(path, PERM_NAMES[i], false);
      }
    }
    for (const i of PERM_BITS) {
      if (~permissions.shared & (1 << i) && heldByOthers(LOCK_PERM_BASE + i)) {
        if (ofd) release();
        throw new LockedError(path, PERM_NAMES[i], true);
      }
    }
    return new HeldLock(fd, key, permissions, taken).register();
  }

  private register(): HeldLock {
    let set = inProcess.get(this.key);
    if (!set) inProcess.set(this.key, (set = new Set()));
    set.add(this);
    return this;
  }

  /** Drop the locks (before the file is closed; closing the descriptor drops OFD locks too). */
  release(): void {
    if (this.released) return;
    this.released = true;
    for (const b of this.ofdBytes) {
      try {
        native!.ofdLock!(this.fd, b, 1, 0);
      } catch {
        // the descriptor is closing anyway
      }
    }
    const set = inProcess.get(this.key);
    set?.delete(this);
    if (set && set.size === 0) inProcess.delete(this.key);
  }
}

function nameOfByte(b: number): string {
  return PERM_NAMES[(b - LOCK_PERM_BASE) % 100] ?? 'consistent read';
}
