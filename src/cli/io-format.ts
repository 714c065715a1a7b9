/**
 * qemu-io's printing: sizes (cvtstr), the statistics line of a request in
 * its human and its machine form (-C), and the hex dump of `read -v`; and
 * qemu-img's progress line (-p).
 */

import type { Output } from './output.ts';

/**
 * printf's "%.Nf" of the exact binary value of `v`: the nearest N-decimal
 * number, a tie to the even one (glibc rounds the exact value; JavaScript's
 * toFixed breaks ties upwards, so 1.0625 would print as 1.063 where qemu-io
 * prints 1.062, and 3.125 as 3.13 where qemu-img's progress prints 3.12).
 */
export function printfFixed(v: number, digits: number): string {
  const exact = v.toFixed(20); // exact for the magnitudes printed here
  const dot = exact.indexOf('.');
  const tail = exact.slice(dot + 1 + digits);
  if (!/^50*$/.test(tail)) return v.toFixed(digits);
  const kept = exact.slice(0, dot) + exact.slice(dot + 1, dot + 1 + digits);
  const even = Number(kept.at(-1)) % 2 === 0;
  const n = BigInt(kept) + (even ? 0n : 1n);
  const s = n.toString().padStart(digits + 1, '0');
  return digits ? `${s.slice(0, -digits)}.${s.slice(-digits)}` : s;
}

export const fixed3 = (v: number): string => printfFixed(v, 3);

/** qemu-io's cvtstr(): "%.3f" with ".000" trimmed, binary units. */
export function cvtstr(v: number): string {
  const units: Array<[number, string]> = [
    [2 ** 60, ' EiB'],
    [2 ** 50, ' PiB'],
    [2 ** 40, ' TiB'],
    [2 ** 30, ' GiB'],
    [2 ** 20, ' MiB'],
    [2 ** 10, ' KiB'],
  ];
  let suffix = ' bytes';
  for (const [u, s] of units) {
    if (v >= u) {
      v /= u;
      suffix = s;
      break;
    }
  }
  const t = fixed3(v);
  return (t.endsWith('.000') ? t.slice(0, -4) : t) + suffix;
}

/** The statistics of one request: its line in qemu-io's human form, or with -C its machine form. */
export function report(io: Output, verb: string, bytes: number, offset: number, secs: number, machine = false): void {
  const s = Math.max(secs, 1e-9);
  if (machine) {
    // bytes,ops,h:mm:ss.cc,bytes per second,ops per second
    const cs = Math.floor(secs * 100);
    const h = Math.floor(cs / 360000);
    const m = Math.floor(cs / 6000) % 60;
    const sec = Math.floor(cs / 100) % 60;
    const ts = `${h}:${String(m).padStart(2, '0')}:${String(sec).padStart(2, '0')}.${String(cs % 100).padStart(2, '0')}`;
    io.out(`${bytes},1,${ts},${(bytes / s).toFixed(3)},${(1 / s).toFixed(3)}\n`);
    return;
  }
  io.out(`${verb} ${bytes}/${bytes} bytes at offset ${offset}\n`);
  const whole = Math.floor(secs);
  const ts = `${String(whole).padStart(2, '0')}.${String(Math.floor((secs - whole) * 100)).padStart(2, '0')} sec`;
  io.out(`${cvtstr(bytes)}, 1 ops; ${ts} (${cvtstr(bytes / s)}/sec and ${(1 / s).toFixed(4)} ops/sec)\n`);
}

function isalnum(c: number): boolean {
  return (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122);
}

/** `read -v`: sixteen bytes a line, hex then the printable ones. */
export function dump(io: Output, buf: Uint8Array, offset: number): void {
  for (let i = 0; i < buf.length; i += 16) {
    const row = buf.subarray(i, Math.min(buf.length, i + 16));
    let line = (offset + i).toString(16).padStart(8, '0') + ':  ';
    for (const b of row) line += b.toString(16).padStart(2, '0') + ' ';
    line += ' ';
    for (const b of row) line += isalnum(b) ? String.fromCharCode(b) : '.';
    io.out(line + '\n');
  }
}

/**
 * qemu-img's -p progress: "    (NN.NN/100%)\r", printed at the start, at
 * each whole percent and at the end (the caller prints the final newline).
 */
export function progressPrinter(io: Output): (done: number, total: number) => void {
  let shown = -Infinity;
  return (done, total) => {
    const pct = total ? (100 * done) / total : 100;
    if (pct - shown < 1 && !(pct === 100 && shown !== 100)) return;
    shown = pct;
    io.out(`    (${printfFixed(pct, 2)}/100%)\r`);
  };
}
