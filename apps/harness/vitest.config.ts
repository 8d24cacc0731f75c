import { defineConfig } from 'vitest/config';

// --expose-gc: the soak bounds the heap after a collection (forks pool: one node process per file).
export default defineConfig({ test: { include: ['src/**/*.test.ts'], globalSetup: ['../../tooling/vitest.tmpdir.ts'], testTimeout: 180_000, execArgv: ['--expose-gc'] } });
