import { defineConfig } from 'tsup';
import { packageConfig } from '../../tooling/tsup.base.ts';

// Two entries: the library, and the runnable `nbd-serve` program the CLI and tests spawn.
export default defineConfig(packageConfig({ entry: ['src/index.ts', 'src/nbd-serve.ts'] }));
