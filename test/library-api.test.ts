/**
 * The library's Node-style contract: every failure of an async method is a
 * rejected promise (never a synchronous throw), a closed image says
 * E_CLOSED, bad offsets say E_RANGE in words, and `await using` closes.
 */

import { describe, it, expect, afterAll } from 'vitest';
import { join } from 'node:path';
import { Image, QledgerError } from '../src/index.ts';
import { tempDir } from './helpers/qemu.ts';

const t = tempDir();
afterAll(() => t.cleanup());

async function fresh(name: string): Promise<string> {
  const p = join(t.dir, name);
  await Image.create(p, { size: 4 << 20 });
  return p;
}

/** The call must return a promise that rejects with a QledgerError of `code`; a synchronous throw fails the test. */
async function rejects(call: () => Promise<unknown>, code: string): Promise<QledgerError> {
  let p: Promise<unknown>;
  try {
    p = call();
  } catch (e) {
    throw new Error(`threw synchronously instead of rejecting: ${(e as Error).message}`);
  }
  const e = await p.then(
    () => undefined,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(QledgerError);
  expect((e as QledgerError).code).toBe(code);
  return e as QledgerError;
}

describe('library contract', () => {
  it('writes to a read-only image reject with E_READ_ONLY', async () => {
    const img = await Image.open(await fresh('ro.qcow2'));
    await rejects(() => img.write(0, new Uint8Array(512)), 'E_READ_ONLY');
    await rejects(() => img.writeZeroes(0, 512), 'E_READ_ONLY');
    await rejects(() => img.discard(0, 65536), 'E_READ_ONLY');
    await rejects(() => img.flush(), 'E_READ_ONLY');
    await rejects(() => img.truncate(8 << 20), 'E_READ_ONLY');
    await img.close();
  });

  it('using a closed image is E_CLOSED, for reads, writes, map and info; closing twice is harmless', async () => {
    for (const write of [false, true]) {
      const img = await Image.open(await fresh(`closed-${write}.qcow2`), { write });
      await img.close();
      await img.close();
      await rejects(() => img.read(0, 512), 'E_CLOSED');
      await rejects(() => img.write(0, new Uint8Array(512)), 'E_CLOSED');
      await rejects(() => img.info(), 'E_CLOSED');
      await rejects(() => img.status(0, 512), 'E_CLOSED');
      await rejects(async () => {
        for await (const _ of img.map()) void _;
      }, 'E_CLOSED');
    }
  });

  it('a negative offset or length is E_RANGE with a readable message', async () => {
    const img = await Image.open(await fresh('range.qcow2'), { write: true });
    const e = await rejects(() => img.read(-1, 512), 'E_RANGE');
    expect(e.message).toMatch(/offset -1/);
    expect(e.message).not.toMatch(/0x-/);
    await rejects(() => img.read(0, -5), 'E_RANGE');
    await rejects(() => img.write(-512, new Uint8Array(512)), 'E_RANGE');
    await img.close();
  });

  it('await using closes the image at the end of the scope', async () => {
    const p = await fresh('using.qcow2');
    let escaped: Image | undefined;
    {
      await using img = await Image.open(p, { write: true });
      await img.write(0, new Uint8Array(512).fill(7));
      escaped = img;
    }
    await rejects(() => escaped!.read(0, 512), 'E_CLOSED');
    const again = await Image.open(p);
    expect((await again.read(0, 512))[0]).toBe(7);
    await again.close();
  });
});
