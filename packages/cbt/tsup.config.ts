import { defineConfig } from 'tsup';
import { packageConfig } from '../../tooling/tsup.base.ts';

// splitting: ./testing shares the event names and types with the main entry.
export default defineConfig(packageConfig({ entry: ['src/index.ts', 'src/testing.ts'], splitting: true }));
