import { defineConfig } from 'vitest/config';

// The fault matrix and the crash tests spawn qemu-img and child processes: give them time.
export default defineConfig({ test: { include: ['src/**/*.test.ts'], globalSetup: ['../../tooling/vitest.tmpdir.ts'], testTimeout: 120_000, hookTimeout: 60_000 } });
