import { defineConfig } from 'tsup';
import { packageConfig } from '../../tooling/tsup.base.ts';

// splitting: the ./testing entry shares one copy of the block layer with the main entry (its
// writeMbr submits bios, and submitBio's state and the filter hook must be the ones in use).
// external: @blkfilter/native is an optional dependency, imported at run time where installed,
// never bundled (tsup leaves out only dependencies and peerDependencies by itself).
export default defineConfig(packageConfig({ entry: ['src/index.ts', 'src/testing.ts'], splitting: true, external: ['@blkfilter/native'] }));
