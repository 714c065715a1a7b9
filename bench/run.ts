/**
 * npm run bench: every benchmark, each against QEMU in the same run (dedup: qledger with
 * dedup off against on, QEMU having none).
 * BENCH_ONLY=state|startup|write|read|check|crash|seed|journal|overlap|snapshot|chain|empty|nbd|dedup|regression runs one; BENCH_RUNS sets the repetitions.
 * regression (this checkout against another, BENCH_BASE=/path) runs only when BENCH_BASE is set.
 */

const only = process.env['BENCH_ONLY'];
const all = ['state', 'startup', 'write', 'read', 'check', 'crash', 'seed', 'journal', 'overlap', 'snapshot', 'chain', 'empty', 'nbd', 'dedup', 'regression'];
for (const name of all) {
  if (only && only !== name) continue;
  if (name === 'regression' && !process.env['BENCH_BASE']) continue;
  console.log(`\n=== ${name} ===`);
  await import(`./${name}.ts`);
}
