/**
 * Guest reads through a chain of layers: the status of each run, its bytes
 * read from the layer that holds them (several device reads in flight for
 * long runs), zeros and backing reads where the layer has none.
 */

import { RangeRequestError, hex } from '../errors.ts';
import { guest, host, type GuestOffset, type Layer } from './layer.ts';

/**
 * Device reads of one guest read are at most this long, and at most
 * IN_FLIGHT of them wait at once: a long contiguous run becomes several
 * concurrent reads (libuv's pool has four threads), as QEMU keeps several
 * requests in flight, instead of one read that a single thread copies.
 */
const PIECE = 1 << 20;
const IN_FLIGHT = 4;

/**
 * Fill `out` with the guest bytes at `offset` as seen through `layer` and its
 * backing chain. `zeroed`: `out` already holds zeros (a fresh allocation), so
 * ranges that read as zero are not written: a 1 GiB read of a half-empty
 * image then never touches the pages of its empty half.
 */
export async function readGuest(layer: Layer, offset: GuestOffset, out: Uint8Array, zeroed = false): Promise<void> {
  if (!Number.isSafeInteger(offset) || offset < 0) throw new RangeRequestError(`read at offset ${offset}: offsets are non-negative integers`, { offset, length: out.length });
  if (offset + out.length > layer.size) {
    throw new RangeRequestError(`read of ${out.length} bytes at ${hex(offset)} is outside the ${layer.size}-byte disk`, { offset, length: out.length });
  }
  const pending = new Set<Promise<void>>();
  let failure: { error: unknown } | undefined;
  const start = (p: Promise<void>): void => {
    const tracked: Promise<void> = p.then(
      () => void pending.delete(tracked),
      (e: unknown) => {
        pending.delete(tracked);
        failure ??= { error: e };
      },
    );
    pending.add(tracked);
  };
  const room = async (): Promise<void> => {
    while (pending.size >= IN_FLIGHT) await Promise.race(pending);
  };
  try {
    let pos = 0;
    while (pos < out.length && !failure) {
      const at = guest(offset + pos);
      const st = await layer.status(at, out.length - pos);
      const sub = out.subarray(pos, pos + st.length);
      switch (st.type) {
        case 'normal':
        case 'raw-data':
          // cut into pieces read concurrently (the host bytes of a run are contiguous)
          for (let k = 0; k < sub.length && !failure; k += PIECE) {
            await room();
            const n = Math.min(PIECE, sub.length - k);
            start(layer.readOwn({ length: n, type: st.type, hostOffset: host(st.hostOffset! + k) }, guest(at + k), sub.subarray(k, k + n)));
          }
          break;
        case 'compressed':
          await room();
          start(layer.readOwn(st, at, sub));
          break;
        case 'zero-plain':
        case 'zero-alloc':
          if (!zeroed) sub.fill(0);
          break;
        case 'unallocated-plain':
        case 'unallocated-alloc': {
          const b = layer.backing;
          const inBacking = b ? Math.max(0, Math.min(sub.length, b.size - at)) : 0;
          if (!zeroed) sub.fill(0, inBacking);
          if (b && inBacking > 0) {
            await room();
            start(readGuest(b, at, sub.subarray(0, inBacking), zeroed));
          }
          break;
        }
        case 'invalid':
          throw new Error('unreachable: invalid entries throw in status()');
      }
      pos += st.length;
    }
  } finally {
    // nothing may still write into `out` once the caller has it back, even after a failure
    while (pending.size) await Promise.race(pending);
  }
  if (failure) throw failure.error;
}
