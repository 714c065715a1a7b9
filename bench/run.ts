/**
 * npm run bench: every benchmark, each against QEMU in the same run.
 * BENCH_ONLY=read|write|state|check|crash|seed|journal runs one; BENCH_RUNS sets the repetitions.
 */

const only = process.env['BENCH_ONLY'];
const all = ['state', 'write', 'read', 'check', 'crash', 'seed', 'journal'];
for (const name of all) {
  if (only && only !== name) continue;
  console.log(`\n=== ${name} ===`);
  await import(`./${name}.ts`);
}
