import { defineConfig } from 'tsup';
import { packageConfig } from '../../tooling/tsup.base.ts';

// Two entries: the library, and the test doubles at `@blkfilter/nbd/testing`.
export default defineConfig(packageConfig({ entry: ['src/index.ts', 'src/testing.ts'] }));
