import { defineConfig } from 'tsup';
import { packageConfig } from '../../tooling/tsup.base.ts';

export default defineConfig(packageConfig({ entry: ['src/bench.ts', 'src/soak.ts'], dts: false }));
