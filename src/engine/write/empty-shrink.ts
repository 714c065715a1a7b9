/**
 * make_empty's last step (write/make-empty.ts does the emptying): the file
 * shrinks to what remains in use, as QEMU's fast path leaves it, by steps
 * that are each valid at every instant and each written back before the
 * next:
 *   1. the new L1 table moves down into the clusters the emptying freed
 *      (the emptying had to place it past them: a cluster freed in a
 *      transaction is not handed out before the transaction is durable);
 *   2. refcount blocks that count nothing but themselves leave the refcount
 *      table, in passes (a block that counted a dropped one is idle only
 *      once that count is durable), and the refcount table moves down, cut
 *      to the entries still in use; again until it stays where it is;
 *   3. a journal area that alone keeps the file long leaves the image
 *      (journal-session.ts retire: checkpoint, bit, extension, each
 *      durable); the session's next write-back with metadata starts a new
 *      one past what is in use;
 *   4. the file is cut after its last cluster in use.
 */

import type { HeaderState } from '../../state/state.ts';
import type { FaultPlan } from '../faults.ts';
import { OL_JOURNAL } from './overlap.ts';
import type { Rooms } from './rooms.ts';

/** Run `fn` as one journal transaction named `op` (the writer's run). */
type Run = (op: string, fn: () => Promise<void>) => Promise<void>;

/** `durableHeader`: the header as on disk at the moment of asking (the steps move tables it names). */
export async function shrinkAfterEmpty(r: Rooms, run: Run, durableHeader: () => HeaderState, faults: FaultPlan | undefined): Promise<void> {
  // a step that changed nothing needs no write-back (the emptying's was the caller's)
  let lowered = false;
  await run('make empty (L1 table moved down)', async () => void (lowered = await r.makeEmpty.lowerL1()));
  if (lowered) await r.writeback.flush();
  for (let moved = true; moved; ) {
    for (let dropped = 1; dropped > 0; ) {
      await run('make empty (idle refcount blocks dropped)', async () => void (dropped = await r.makeEmpty.dropIdleRefblocks()));
      if (dropped) await r.writeback.flush();
    }
    // the table's old clusters are free once this is durable: the blocks that counted them may be idle now
    await run('make empty (refcount table moved down)', async () => void (moved = await r.makeEmpty.lowerReftable()));
    if (moved) await r.writeback.flush();
  }
  const area = r.journal.area;
  let alone = false;
  await run('make empty (what keeps the file long)', async () => void (alone = area !== undefined && area.offset + area.size > (await r.alloc.inUseEnd(OL_JOURNAL))));
  const shrink = () => run('shrink file', async () => void (await r.alloc.shrinkToUse()));
  if (alone) await r.journal.retire(durableHeader(), { cut: faults?.cutBeforeJournalRetired ? shrink : undefined, noCheckpoint: faults?.retireBeforeCheckpoint ?? false });
  await shrink();
}
