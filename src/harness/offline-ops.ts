/**
 * The crash workloads' operations that run outside a plain guest session:
 * amend (a rewrite between sessions, as qemu-img amend) and the two halves
 * of a rebase onto no backing file (qemu-img rebase -b ''): the copy of the
 * backing file's differences through the session, and the test of whether
 * a header still names a backing file.
 */

import { QledgerError } from '../errors.ts';
import { u64big } from '../format/bytes.ts';
import type { RecordingDevice } from '../io/crash-device.ts';
import { downgradeRefusal, downgradeToV2, upgradeToV3 } from '../engine/amend.ts';
import { changeRefcountOrder } from '../engine/refcount-order.ts';
import type { FaultPlan } from '../engine/faults.ts';
import { allocatedHere, guest, type Layer } from '../engine/layer.ts';
import { copyBackingDifferences } from '../engine/rebase.ts';
import { openWriterOnDevice } from '../engine/writable.ts';
import type { Qcow2Writer } from '../engine/writer.ts';
import type { GuestOp } from './workload.ts';

/** The header (bytes from offset 0) names a backing file: its backing_file_offset (bytes 8-15) is not 0. */
export function namesBacking(image: Uint8Array): boolean {
  return image.length >= 16 && u64big(image, 8) !== 0n;
}

/**
 * Safe rebase's copy onto no backing file, through session `w`: every
 * range the image does not allocate where its chain reads other than zeros,
 * written into it (engine/rebase.ts, as qledger rebase does it). With
 * `hold` (the fault 'rebase-switch-early') nothing is written: the writes
 * come back, for the caller to make after the header switch.
 */
export async function flattenCopy(w: Qcow2Writer, hold: boolean): Promise<Array<[number, Uint8Array]>> {
  const held: Array<[number, Uint8Array]> = [];
  await copyBackingDifferences(
    {
      size: w.size,
      readInto: (out, offset) => w.read(offset, out),
      topStatus: async (offset, length) => {
        const st = await w.layer.status(guest(offset), length);
        return { allocated: allocatedHere(st), length: st.length };
      },
      write: async (offset, data) => {
        if (hold) held.push([offset, data.slice()]);
        else await w.write(offset, data);
      },
    },
    undefined,
  );
  return held;
}

/**
 * An amend of the workload on the recording device: compat=1.1 or 0.10,
 * refcount_bits=N, as `qledger amend` does them. False when the image
 * cannot take it (qemu-img refuses it too: an extended-L2 image made v2,
 * a width too narrow), having changed nothing.
 */
export async function amendDevice(dev: RecordingDevice, op: Extract<GuestOp, { op: 'amend' }>, backing: () => Promise<Layer | undefined>, faults: FaultPlan | undefined): Promise<boolean> {
  try {
    if (op.option === 'refcount_bits') return await changeRefcountOrder(dev, Math.log2(Number(op.value)), { switchEarly: faults?.refcountSwitchEarly });
    if (op.value === '1.1') return await upgradeToV3(dev);
    if (await downgradeRefusal(dev)) return false;
    const w = await openWriterOnDevice(dev, dev.name, { backing: await backing(), cacheBytes: 0, journal: false });
    await w.expandZeroClusters();
    await w.setLazyRefcounts(false);
    await w.close();
    return await downgradeToV2(dev);
  } catch (e) {
    if (e instanceof QledgerError && (e.code === 'E_USAGE' || e.code === 'E_UNSUPPORTED')) return false;
    throw e;
  }
}

