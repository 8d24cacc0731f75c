import { defineConfig } from 'vitest/config';

// --expose-gc: prefault.test.ts checks that destroy leaves no diff storage behind after a collection.

export default defineConfig({ test: { include: ['src/**/*.test.ts'], globalSetup: ['../../tooling/vitest.tmpdir.ts'], testTimeout: 60_000, execArgv: ['--expose-gc'] } });
