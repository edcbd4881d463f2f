import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Each file starts its own registry; running them one at a time keeps timing-based
    // assertions (the 250 ms push bound) honest on a loaded CI machine.
    fileParallelism: false,
  },
});
