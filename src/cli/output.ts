/**
 * Where a subcommand prints (standard output and error) and reads lines
 * from (standard input), or in tests a capture. Every subcommand module
 * takes one; none imports another.
 */

import { createRequire } from 'node:module';

export interface Output {
  out(s: string): void;
  /** bytes for standard output (long outputs built as bytes); without it, they go to out() as Latin-1 text */
  outBytes?(b: Uint8Array): void;
  err(s: string): void;
  /** lines of standard input, for commands that read them (qemu-io without -c) */
  lines?(): AsyncIterable<string>;
}

export const stdio: Output = {
  out: (s) => process.stdout.write(s),
  outBytes: (b) => process.stdout.write(b),
  err: (s) => process.stderr.write(s),
  lines: async function* () {
    // loaded only by the one command that reads standard input; require, not import(): the
    // bundled program runs in a vm.Script, which has no dynamic import (tools/build-cli.mjs)
    const { createInterface } = createRequire(import.meta.url)('node:readline') as typeof import('node:readline');
    yield* createInterface({ input: process.stdin, crlfDelay: Infinity });
  },
};

/**
 * Fail as qemu-img does: each of `lines` on standard error after
 * "qledger: " (a line may carry its own unprefixed continuation after a
 * newline, as qemu-img's "Try ... --help" does), exit status 1.
 */
export function fail(io: Output, ...lines: string[]): 1 {
  io.err(lines.map((l) => `qledger: ${l}\n`).join(''));
  return 1;
}
