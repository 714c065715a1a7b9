/** Guest reads through a chain of layers. */

import { RangeRequestError, hex } from '../errors.ts';
import { guest, type GuestOffset, type Layer } from './layer.ts';

/** Fill `out` with the guest bytes at `offset` as seen through `layer` and its backing chain. */
export async function readGuest(layer: Layer, offset: GuestOffset, out: Uint8Array): Promise<void> {
  if (!Number.isSafeInteger(offset) || offset < 0) throw new RangeRequestError(`read at offset ${offset}: offsets are non-negative integers`, { offset, length: out.length });
  if (offset + out.length > layer.size) {
    throw new RangeRequestError(`read of ${out.length} bytes at ${hex(offset)} is outside the ${layer.size}-byte disk`, { offset, length: out.length });
  }
  let pos = 0;
  while (pos < out.length) {
    const at = guest(offset + pos);
    const st = await layer.status(at, out.length - pos);
    const sub = out.subarray(pos, pos + st.length);
    switch (st.type) {
      case 'normal':
      case 'compressed':
      case 'raw-data':
        await layer.readOwn(st, at, sub);
        break;
      case 'zero-plain':
      case 'zero-alloc':
        sub.fill(0);
        break;
      case 'unallocated-plain':
      case 'unallocated-alloc': {
        const b = layer.backing;
        const inBacking = b ? Math.max(0, Math.min(sub.length, b.size - at)) : 0;
        if (b && inBacking > 0) await readGuest(b, at, sub.subarray(0, inBacking));
        sub.fill(0, inBacking);
        break;
      }
      case 'invalid':
        throw new Error('unreachable: invalid entries throw in status()');
    }
    pos += st.length;
  }
}
