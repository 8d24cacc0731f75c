import { defineConfig } from 'vitest/config';

export default defineConfig({ test: { include: ['src/**/*.test.ts'], globalSetup: ['../../tooling/vitest.tmpdir.ts'], testTimeout: 60_000 } });
