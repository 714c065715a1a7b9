/**
 * qemu-img resize: `resize [--shrink] [--preallocation=MODE] [-f FMT]
 * [--image-opts] [-q] IMG [+|-]SIZE`, with qemu-img's argument handling
 * (the size is taken from the end before options are parsed, so `-1G` is a
 * size), its checks in its order, its messages and exit codes. qcow2 images
 * go through the write engine's truncate (a journal transaction, written
 * back before "Image resized." is printed); raw images are the file's
 * length, preallocated as QEMU's file driver does.
 */

import { UsageError, UnsupportedError } from '../errors.ts';
import { FileDevice } from '../io/file-device.ts';
import { Image } from '../engine/image.ts';
import { probeFormat, type ImageFormat } from '../engine/open.ts';
import type { Qcow2Layer } from '../engine/qcow2-layer.ts';
import { getopt, parseSize } from './args.ts';
import { imageSpec } from './image-spec.ts';
import { fail, type Output } from './output.ts';

const MODES = ['off', 'metadata', 'falloc', 'full'] as const;
type Mode = (typeof MODES)[number];

const SIZE_HELP = "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";

export async function runResize(argv: string[], io: Output): Promise<number> {
  // qemu-img takes the size off the end first, so that a negative size is not an option
  if (argv.length < 2) return fail(io, "Not enough arguments\nTry 'qledger --help' for more information");
  const sizeText = argv[argv.length - 1]!;
  const p = getopt(argv.slice(0, -1), { withArg: 'f', flags: 'q', long: { shrink: false, preallocation: true, 'image-opts': false, object: true } }, 'resize');
  if (p.opts.some(([k]) => k === 'object')) throw new UnsupportedError('resize: --object is not supported (qledger has no secret or crypto objects)');
  if (p.positional.length !== 1) return fail(io, "Expecting image file name and size\nTry 'qledger --help' for more information");
  const quiet = p.opts.some(([k]) => k === 'q');
  const shrink = p.opts.some(([k]) => k === 'shrink');
  const modeArg = p.opts.filter(([k]) => k === 'preallocation').at(-1)?.[1];
  const mode = (modeArg === undefined ? 'off' : String(modeArg)) as Mode;
  if (!MODES.includes(mode)) return fail(io, `Invalid preallocation mode '${String(modeArg)}'`);
  const sign = sizeText[0] === '+' ? 1 : sizeText[0] === '-' ? -1 : 0;
  let n: number;
  try {
    n = parseSize(sign ? sizeText.slice(1) : sizeText);
  } catch {
    return fail(io, SIZE_HELP);
  }
  const spec = imageSpec(p.positional[0]!, p.opts.some(([k]) => k === 'image-opts'));
  const fArg = p.opts.filter(([k]) => k === 'f').at(-1)?.[1];
  if (fArg !== undefined && fArg !== 'qcow2' && fArg !== 'raw') throw new UsageError(`Unknown file format '${String(fArg)}'`);
  const format: ImageFormat | undefined = (fArg as ImageFormat | undefined) ?? spec.format;

  const dev = await FileDevice.open(spec.path, { readOnly: false });
  let probed: ImageFormat;
  try {
    probed = await probeFormat(dev);
  } finally {
    await dev.close();
  }
  if (format === 'qcow2' && probed !== 'qcow2') return fail(io, `Could not open '${spec.path}': Image is not in qcow2 format`);
  const fmt = format ?? probed;

  if (fmt === 'raw') {
    const raw = await FileDevice.open(spec.path, { readOnly: false });
    try {
      const current = await raw.size();
      const total = sign ? current + sign * n : n;
      const bad = checkSize(total, current, mode, shrink);
      if (bad) return fail(io, ...bad);
      if (mode === 'metadata') return fail(io, 'Unsupported preallocation mode: metadata');
      await raw.truncate(total);
      if (total > current && mode === 'falloc' && !(await raw.allocate?.(current, total - current))) await raw.writeZeroes(current, total - current, false);
      if (total > current && mode === 'full') {
        const zero = new Uint8Array(Math.min(1 << 20, total - current));
        for (let o = current; o < total; o += zero.length) await raw.write(o, zero.subarray(0, Math.min(zero.length, total - o)));
      }
      await raw.flush();
    } finally {
      await raw.close();
    }
  } else {
    const img = await Image.open(spec.path, { format: 'qcow2', write: true, onWarning: (m) => io.err(`qledger: warning: ${m}\n`) });
    try {
      const current = img.size;
      const total = sign ? current + sign * n : n;
      const bad = checkSize(total, current, mode, shrink);
      if (bad) return fail(io, ...bad);
      if (total % 512 !== 0) return fail(io, 'The new size must be a multiple of 512');
      const top = img.top as Qcow2Layer;
      if (top.parsed.header.version === 2 && img.snapshots.length) return fail(io, "Can't resize a v2 image which has snapshots");
      await img.truncate(total, mode);
    } finally {
      await img.close();
    }
  }
  if (!quiet) io.out('Image resized.\n');
  return 0;
}

/** qemu-img's own checks, in its order: the lines of its refusal, or undefined when the size may be set. */
function checkSize(total: number, current: number, mode: Mode, shrink: boolean): string[] | undefined {
  if (total <= 0) return ['New image size must be positive'];
  if (mode !== 'off' && total < current) return ['Preallocation can only be used for growing images'];
  if (total < current && !shrink) {
    return ['Use the --shrink option to perform a shrink operation.', "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there."];
  }
  return undefined;
}
