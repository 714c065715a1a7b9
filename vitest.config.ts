import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // interop tests shell out to qemu-img; two workers match the CI machine
    maxWorkers: 2,
  },
});
