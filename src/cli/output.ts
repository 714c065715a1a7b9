/**
 * Where a subcommand prints (standard output and error) and reads lines
 * from (standard input), or in tests a capture. Every subcommand module
 * takes one; none imports another.
 */

export interface Output {
  out(s: string): void;
  err(s: string): void;
  /** lines of standard input, for commands that read them (qemu-io without -c) */
  lines?(): AsyncIterable<string>;
}

export const stdio: Output = {
  out: (s) => process.stdout.write(s),
  err: (s) => process.stderr.write(s),
  lines: async function* () {
    // loaded only by the one command that reads standard input
    const { createInterface } = await import('node:readline');
    yield* createInterface({ input: process.stdin, crlfDelay: Infinity });
  },
};
