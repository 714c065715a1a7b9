/**
 * Where a subcommand prints: standard output and error, or (in tests) a
 * capture. Every subcommand module takes one; none imports another.
 */

export interface Output {
  out(s: string): void;
  err(s: string): void;
}

export const stdio: Output = {
  out: (s) => process.stdout.write(s),
  err: (s) => process.stderr.write(s),
};
