/**
 * Test helpers around the real qemu-img / qemu-io. Interop tests need them:
 * in CI (QLEDGER_REQUIRE_QEMU=1) their absence fails the run; locally the
 * tests skip with a loud banner.
 */

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

function has(cmd: string): boolean {
  return spawnSync(cmd, ['--version'], { stdio: 'ignore' }).status === 0;
}

export const qemuAvailable = has('qemu-img') && has('qemu-io');

if (!qemuAvailable) {
  if (process.env['QLEDGER_REQUIRE_QEMU']) {
    throw new Error('qemu-img/qemu-io not found but QLEDGER_REQUIRE_QEMU is set: install qemu-utils');
  }
  console.warn('\n' + '!'.repeat(72) + '\n!!! qemu-img / qemu-io NOT FOUND: interop tests are SKIPPED.\n!!! Install qemu-utils (apt-get install qemu-utils) to run them.\n' + '!'.repeat(72) + '\n');
}

export function run(cmd: string, args: string[], cwd?: string): string {
  return execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 256 * 1024 * 1024 });
}

export const qemuImg = (args: string[], cwd?: string): string => run('qemu-img', args, cwd);

/** qemu-io with -c commands; returns stdout. */
export function qemuIo(file: string, cmds: string[], extra: string[] = [], cwd?: string): string {
  return run('qemu-io', [...extra, ...cmds.flatMap((c) => ['-c', c]), file], cwd);
}

export function tempDir(prefix = 'qledger-test-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** libnbd's tools and qemu-nbd, for the NBD server's interop tests (Debian: libnbd-bin, qemu-utils). */
export const nbdToolsAvailable = has('nbdinfo') && has('nbdcopy') && has('qemu-nbd');

if (!nbdToolsAvailable) {
  if (process.env['QLEDGER_REQUIRE_QEMU']) throw new Error('nbdinfo/nbdcopy/qemu-nbd not found but QLEDGER_REQUIRE_QEMU is set: install libnbd-bin and qemu-utils');
  console.warn('\n' + '!'.repeat(72) + '\n!!! nbdinfo / nbdcopy / qemu-nbd NOT FOUND: NBD interop tests are SKIPPED.\n!!! Install libnbd-bin and qemu-utils to run them.\n' + '!'.repeat(72) + '\n');
}
