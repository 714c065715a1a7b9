/**
 * A BlockDevice over a file, through node:fs/promises, holding QEMU's image
 * locks (image-lock.ts) while it is open. Requests up to the inline limit
 * (setInlineIo) are made on the calling thread instead.
 */

import { fdatasyncSync, fstatSync, ftruncateSync, readSync, writeSync } from 'node:fs';
import { open, stat, statfs, constants as fsc, type FileHandle } from 'node:fs/promises';
import { IoError, NotFoundError, QledgerError, deviceError, hexDigits } from '../errors.ts';
import { ZERO_CHUNK, type BlockDevice } from './device.ts';
import { native } from './native.ts';
import { HeldLock, imagePermissions, type LockPermissions } from './image-lock.ts';

/**
 * Reads and writes of at most this many bytes (and flushes, sizes and
 * truncations, when it is not 0) go straight to the kernel on the calling
 * thread instead of through libuv's thread pool. A page-cache write of 4 KiB
 * then costs about 10 µs instead of about 70 µs (the pool's round trip and
 * the promise machinery), but the event loop waits for the disk meanwhile.
 * That is the right trade for a command that has one request in flight at a
 * time (qledger io, convert, check: QEMU's tools block their own thread the
 * same way in a synchronous request); a server with many clients uses the
 * adaptive mode below, which goes back to the pool when the disk is slow.
 */
let inlineLimit = 0;

/** One copy_file_range call's bytes at most: the thread is back between calls. */
const COPY_STEP = 8 << 20;

/**
 * Write-behind: once writes or copies that continue one another add up to
 * this many bytes (0: never), their write-back to the disk is started at
 * once (sync_file_range WRITE, not waited for) instead of when the kernel
 * gets to it. The disk
 * then works while the process goes on copying, and the flush at the end
 * (commit's, or qemu-io's at exit) waits for the last pieces only: a 1 GiB
 * copy's fdatasync here went from 0.2 s to under 0.02 s. Only for a device
 * whose flushes reach the disk (never cache=unsafe, which never flushes) and
 * only for sequential runs: scattered rewrites of a page under write-back
 * would wait for it.
 */
let writeBehindFrom = 0;

/** Set the write-behind threshold for every file device of the process (bytes; 0: off). Returns the previous one. */
export function setWriteBehind(bytes: number): number {
  const was = writeBehindFrom;
  writeBehindFrom = bytes;
  return was;
}

/**
 * Adaptive mode (a server's): reads and writes within the limit go inline
 * only while inline requests stay quick (page-cache hits, about 10–60 µs
 * for 256 KiB); one that takes longer than SLOW_MS (the disk, or the
 * kernel throttling dirty pages) sends the next POOL_AFTER_SLOW requests
 * through the pool, so a cold read never holds every other client for long
 * more than once in a while. Flushes and truncations always go through the
 * pool there: an fdatasync must not stop the other connections.
 */
let adaptive = false;
const SLOW_MS = 1;
const POOL_AFTER_SLOW = 256;
let pooledLeft = 0;

/** Whether a request of `bytes` goes inline now. */
function inlineNow(bytes: number): boolean {
  if (bytes > inlineLimit) return false;
  if (!adaptive) return true;
  if (pooledLeft > 0) {
    pooledLeft--;
    return false;
  }
  return true;
}

/** The clock before an inline request, in adaptive mode (0 otherwise). */
function inlineStart(): number {
  return adaptive ? performance.now() : 0;
}

/** After an inline request started at `t0`: a slow one sends the next requests through the pool. */
function inlineDone(t0: number): void {
  if (adaptive && performance.now() - t0 > SLOW_MS) pooledLeft = POOL_AFTER_SLOW;
}

/**
 * Set the inline limit for every file device of the process (bytes; 0:
 * everything through the pool); `adaptive`: the server's mode above.
 * Returns the previous limit.
 */
export function setInlineIo(limit: number, opts: { adaptive?: boolean } = {}): number {
  const was = inlineLimit;
  inlineLimit = limit;
  adaptive = opts.adaptive === true;
  pooledLeft = 0;
  return was;
}

/** Flushes, sizes and truncations inline: only in the plain (one request at a time) mode. */
function controlInline(): boolean {
  return inlineLimit > 0 && !adaptive;
}

/** How a file is locked while open (see image-lock.ts): QEMU's permissions, or not at all. */
export type FileLocking = LockPermissions | false;

export class FileDevice implements BlockDevice {
  private closed = false;
  private lock: HeldLock | undefined;
  private constructor(
    readonly name: string,
    readonly readOnly: boolean,
    private readonly fh: FileHandle,
  ) {}

  /** qemu's cache=unsafe: flushes are not passed to the file system */
  private ignoreFlush = false;

  /**
   * The last data run SEEK_DATA/SEEK_HOLE found, as QEMU's block-status
   * cache keeps it: a conversion asks at every data or zero run of its
   * input, and on tmpfs each SEEK_HOLE walks the file's pages to the next
   * hole (436 µs a call over 256 MiB, 3.6 s for a convert's 8,192 asks).
   * Writes cannot turn data into a hole; truncation, zeroing and discards
   * can, and forget it.
   */
  private dataRun: { from: number; to: number } | undefined;

  /**
   * Open a file, locked as QEMU locks an image file unless `lock` says
   * otherwise (default: an image opened read-only or read-write). `create`
   * empties the file, but only once the lock is held: a file another
   * program is using is refused untouched, as qemu-img create refuses it.
   * `unsafe`: QEMU's cache=unsafe, every flush returns at once (a crash may
   * then leave anything).
   */
  static async open(path: string, opts: { readOnly: boolean; create?: boolean; lock?: FileLocking; unsafe?: boolean | undefined }): Promise<FileDevice> {
    const flags = opts.readOnly ? fsc.O_RDONLY : opts.create ? fsc.O_RDWR | fsc.O_CREAT : fsc.O_RDWR;
    let fh: FileHandle | undefined;
    try {
      const st = await stat(path).catch(() => undefined);
      if (st && st.isDirectory()) throw new IoError(`${path}: is a directory`, { path });
      fh = await open(path, flags, 0o644);
      const dev = new FileDevice(path, opts.readOnly, fh);
      dev.ignoreFlush = opts.unsafe === true;
      const permissions = opts.lock ?? imagePermissions({ readOnly: opts.readOnly });
      if (permissions) {
        const id = await fh.stat();
        dev.lock = HeldLock.acquire(fh.fd, `${id.dev}:${id.ino}`, path, permissions);
      }
      // Only a file with something in it is cut, as QEMU's raw create cuts it: ext4 takes a cut to
      // size 0 for a file about to be replaced and writes the file's dirty pages back when it is
      // closed (auto_da_alloc), which made a 1 GiB convert's close wait 0.6 s for the disk.
      if (opts.create && (await fh.stat()).size > 0) await fh.truncate(0);
      return dev;
    } catch (e) {
      await fh?.close().catch(() => undefined);
      if (e instanceof QledgerError) throw e;
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') throw new NotFoundError(`${path}: no such file`, { path });
      if (code === 'EACCES' || code === 'EPERM') throw new IoError(`${path}: permission denied`, { path, errno: code });
      throw new IoError(`${path}: cannot open (${code ?? String(e)})`, { path, errno: code });
    }
  }

  async size(): Promise<number> {
    if (controlInline()) return fstatSync(this.fh.fd).size;
    return (await this.fh.stat()).size;
  }

  async allocatedBytes(): Promise<number | undefined> {
    return (await this.fh.stat()).blocks * 512;
  }

  async readInto(buf: Uint8Array, offset: number): Promise<void> {
    // Node reads from the file's current position when given a position that
    // is not a safe integer (it would return the header for a table "at"
    // 2^53); no file reaches that far, so such a read is past the end: zeros.
    if (!Number.isSafeInteger(offset + buf.length) || offset < 0) {
      if (offset < 0) throw new QledgerError('E_RANGE', `${this.name}: read at negative offset -0x${hexDigits(-offset)}`, { offset });
      buf.fill(0);
      return;
    }
    let done = 0;
    if (inlineNow(buf.length)) {
      const t0 = inlineStart();
      try {
        while (done < buf.length) {
          const n = readSync(this.fh.fd, buf, done, buf.length - done, offset + done);
          if (n === 0) {
            buf.fill(0, done);
            return;
          }
          done += n;
        }
      } catch (e) {
        throw deviceError(this.name, `read at 0x${hexDigits(offset + done)}`, e);
      } finally {
        inlineDone(t0);
      }
      return;
    }
    while (done < buf.length) {
      const { bytesRead } = await this.fh.read(buf, done, buf.length - done, offset + done).catch((e: unknown) => {
        throw deviceError(this.name, `read at 0x${hexDigits(offset + done)}`, e);
      });
      if (bytesRead === 0) {
        buf.fill(0, done);
        return;
      }
      done += bytesRead;
    }
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.assertWritable();
    // never let Node turn an impossible position into "the current position"
    if (!Number.isSafeInteger(offset + data.length) || offset < 0) throw new QledgerError('E_RANGE', `${this.name}: write at offset 0x${hexDigits(offset)} is outside any file`, { offset });
    let done = 0;
    if (inlineNow(data.length)) {
      const t0 = inlineStart();
      try {
        while (done < data.length) done += writeSync(this.fh.fd, data, done, data.length - done, offset + done);
      } catch (e) {
        throw deviceError(this.name, `write of ${data.length - done} bytes at 0x${hexDigits(offset + done)}`, e);
      } finally {
        inlineDone(t0);
      }
      this.behind(offset, data.length);
      return;
    }
    while (done < data.length) {
      const { bytesWritten } = await this.fh.write(data, done, data.length - done, offset + done).catch((e: unknown) => {
        throw deviceError(this.name, `write of ${data.length - done} bytes at 0x${hexDigits(offset + done)}`, e);
      });
      done += bytesWritten;
    }
    this.behind(offset, data.length);
  }

  /** the contiguous run of writes not yet handed to write-behind: [behindFrom, behindTo) */
  private behindFrom = 0;
  private behindTo = -1;

  /**
   * Write-behind (setWriteBehind) of a range just written: writes that
   * continue one another gather into a run, and each time the run reaches
   * the threshold its write-back is started and a new run begins. A write
   * elsewhere starts a new run, so scattered small writes never get one.
   */
  private behind(offset: number, length: number): void {
    if (writeBehindFrom === 0 || this.ignoreFlush || !native?.writeBehind) return;
    if (offset !== this.behindTo) this.behindFrom = offset;
    this.behindTo = offset + length;
    if (this.behindTo - this.behindFrom >= writeBehindFrom) {
      native.writeBehind(this.fh.fd, this.behindFrom, this.behindTo - this.behindFrom);
      this.behindFrom = this.behindTo;
    }
  }

  async flush(): Promise<void> {
    if (!this.readOnly && !this.ignoreFlush) {
      if (controlInline()) {
        try {
          fdatasyncSync(this.fh.fd);
        } catch (e) {
          throw deviceError(this.name, 'flush', e);
        }
        return;
      }
      await this.fh.datasync().catch((e: unknown) => {
        throw deviceError(this.name, 'flush', e);
      });
    }
  }

  async truncate(size: number): Promise<void> {
    this.assertWritable();
    this.dataRun = undefined;
    if (controlInline()) {
      try {
        ftruncateSync(this.fh.fd, size);
      } catch (e) {
        throw deviceError(this.name, `truncate to ${size} bytes`, e);
      }
      return;
    }
    await this.fh.truncate(size).catch((e: unknown) => {
      throw deviceError(this.name, `truncate to ${size} bytes`, e);
    });
  }

  /**
   * Make a range read as zero without writing zero buffers where the file
   * system can: fallocate(ZERO_RANGE), or PUNCH_HOLE when unmapping is
   * allowed, through the native helper (as QEMU's file driver does).
   * Without the helper, zeros are written; past the end of the file,
   * extending leaves a sparse hole either way.
   */
  async writeZeroes(offset: number, length: number, unmap: boolean): Promise<void> {
    this.assertWritable();
    this.dataRun = undefined;
    if (length <= 0) return;
    const size = await this.size();
    const end = offset + length;
    const inFile = Math.max(0, Math.min(end, size) - offset);
    if (inFile > 0 && !(native && this.tryFallocate(unmap ? 1 : 2, offset, inFile))) {
      for (let done = 0; done < inFile; done += ZERO_CHUNK.length) {
        await this.write(offset + done, ZERO_CHUNK.subarray(0, Math.min(ZERO_CHUNK.length, inFile - done)));
      }
    }
    if (end > size) await this.truncate(end);
  }

  /** The file system's free bytes for an unprivileged writer (statfs), undefined where it cannot tell. */
  async available(): Promise<number | undefined> {
    try {
      const s = await statfs(this.name);
      return s.bavail * s.bsize;
    } catch {
      return undefined;
    }
  }

  /** fallocate(mode 0): reserve blocks, extending the file; false where unsupported. */
  async allocate(offset: number, length: number): Promise<boolean> {
    this.assertWritable();
    return native !== undefined && this.tryFallocate(0, offset, length);
  }

  private tryFallocate(mode: 0 | 1 | 2, offset: number, length: number): boolean {
    try {
      native!.fallocate(this.fh.fd, mode, offset, length);
      return true;
    } catch {
      return false; // not supported by this file system: write zeros instead
    }
  }

  /**
   * Whether the file holds data or a hole at `offset`, and for how long (at
   * most `bytes`), from SEEK_DATA/SEEK_HOLE as QEMU's file driver asks it.
   * Undefined without the native helper.
   */
  holeRun(offset: number, bytes: number): { zero: boolean; length: number } | undefined {
    if (!native) return undefined;
    const c = this.dataRun;
    if (c && offset >= c.from && offset < c.to) return { zero: false, length: Math.min(bytes, c.to - offset) };
    try {
      const data = native.seekData(this.fh.fd, offset);
      if (data === -1) return { zero: true, length: bytes };
      if (data > offset) return { zero: true, length: Math.min(bytes, data - offset) };
      const hole = native.seekHole(this.fh.fd, offset);
      this.dataRun = { from: offset, to: hole };
      return { zero: false, length: Math.min(bytes, Math.max(1, hole - offset)) };
    } catch {
      return undefined;
    }
  }

  /**
   * copy_file_range from another file device: the kernel moves the bytes
   * from page cache to page cache (or shares extents where the file system
   * can), about 40% less system time than a read and a write through a
   * buffer. Only in the plain inline mode (the CLI's, one request at a time),
   * since the call blocks the thread for as long as the copy takes; 0 (the
   * caller copies) without the helper, between file systems the kernel cannot
   * copy across, or for any other device.
   */
  async copyFrom(src: BlockDevice, srcOffset: number, offset: number, length: number): Promise<number> {
    this.assertWritable();
    const copy = native?.copyRange;
    if (!copy || !(src instanceof FileDevice) || !controlInline() || src.closed) return 0;
    if (!Number.isSafeInteger(srcOffset + length) || !Number.isSafeInteger(offset + length) || srcOffset < 0 || offset < 0) return 0;
    let done = 0;
    try {
      while (done < length) {
        const n = copy(src.fh.fd, srcOffset + done, this.fh.fd, offset + done, Math.min(length - done, COPY_STEP));
        if (n <= 0) break; // cannot (-1), or the source ends (0): the caller reads the rest as zeros
        this.behind(offset + done, n);
        done += n;
      }
    } catch (e) {
      throw deviceError(this.name, `copy of ${length - done} bytes to 0x${hexDigits(offset + done)} from ${src.name}`, e);
    }
    return done;
  }

  /** Punch a hole (fallocate PUNCH_HOLE through the native helper); a no-op without it, as discard is only a hint. */
  async discard(offset: number, length: number): Promise<void> {
    this.assertWritable();
    this.dataRun = undefined;
    if (native && length > 0) this.tryFallocate(1, offset, length);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.lock?.release();
    await this.fh.close();
  }

  private assertWritable(): void {
    if (this.readOnly) throw new QledgerError('E_READ_ONLY', `${this.name}: opened read-only`);
  }
}
