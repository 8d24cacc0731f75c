import { readdirSync, readFileSync, existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ESLint } from 'eslint';
import { describe, expect, it } from 'vitest';
import { FOLDERS, LAYERS } from './layers.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const eslint = new ESLint({ cwd: root });

async function importErrors(file: string, code: string): Promise<string[]> {
  const [result] = await eslint.lintText(code, { filePath: join(root, file) });
  return (result?.messages ?? []).filter((m) => m.ruleId === 'no-restricted-imports').map((m) => m.message);
}

describe('arrows point down (ARCHITECTURE.md)', () => {
  it('refuses an upward import', async () => {
    expect(await importErrors('packages/bio/src/x.ts', "import { attach } from '@blkfilter/registry';\nvoid attach;\n")).toHaveLength(1);
    expect(await importErrors('packages/registry/src/x.ts', "import { x } from '@blkfilter/cbt';\nvoid x;\n")).toHaveLength(1);
  });

  it('refuses a sideways import between filters', async () => {
    expect(await importErrors('packages/cbt/src/x.ts', "import { x } from '@blkfilter/snapshot';\nvoid x;\n")).toHaveLength(1);
    expect(await importErrors('packages/nbd/src/x.ts', "import { x } from '@blkfilter/direct-io';\nvoid x;\n")).toHaveLength(1);
    // The backup repository never imports the NBD front end (ARCHITECTURE.md, "Wave 2 additions").
    expect(await importErrors('packages/backup/src/x.ts', "import { x } from '@blkfilter/nbd';\nvoid x;\n")).toHaveLength(1);
    expect(await importErrors('packages/backup/src/x.ts', "import { x } from '@blkfilter/cli';\nvoid x;\n")).toHaveLength(1);
  });

  it("refuses a deep import of another package's internals, even from an app", async () => {
    expect(await importErrors('apps/harness/src/x.ts', "import { x } from '@blkfilter/bio/src/bio.js';\nvoid x;\n")).toHaveLength(1);
    expect(await importErrors('apps/harness/src/x.ts', "import { x } from '@blkfilter/bio/dist/index.js';\nvoid x;\n")).toHaveLength(1);
    expect(await importErrors('packages/registry/src/x.ts', "import { x } from '../../bio/src/bio.js';\nvoid x;\n")).toHaveLength(1);
  });

  it('allows downward imports through public entries', async () => {
    expect(await importErrors('packages/registry/src/x.ts', "import { Bio } from '@blkfilter/bio';\nvoid Bio;\n")).toEqual([]);
    expect(await importErrors('apps/harness/src/x.ts', "import { FaultBackend } from '@blkfilter/bio/testing';\nvoid FaultBackend;\n")).toEqual([]);
    expect(await importErrors('packages/bio/src/x.ts', "import { Bio } from './bio.js';\nvoid Bio;\n")).toEqual([]);
    expect(await importErrors('packages/backup/src/x.ts', "import { listSnapshots } from '@blkfilter/snapshot';\nvoid listSnapshots;\n")).toEqual([]);
    expect(await importErrors('packages/cli/src/x.ts', "import { restore } from '@blkfilter/backup';\nvoid restore;\n")).toEqual([]);
  });

  it('every workspace package.json depends only on lower layers', () => {
    for (const base of ['packages', 'apps']) {
      const dir = join(root, base);
      if (!existsSync(dir)) continue;
      for (const name of readdirSync(dir)) {
        const file = join(dir, name, 'package.json');
        if (!existsSync(file)) continue;
        const pkg = JSON.parse(readFileSync(file, 'utf8')) as { name: string; dependencies?: Record<string, string>; peerDependencies?: Record<string, string> };
        const mine = LAYERS[pkg.name];
        expect(mine, `${pkg.name} must be listed in tooling/layers.js`).toBeDefined();
        expect(FOLDERS[pkg.name as keyof typeof FOLDERS]).toBe(`${base}/${name}`);
        for (const dep of Object.keys({ ...pkg.dependencies, ...pkg.peerDependencies })) {
          if (!dep.startsWith('@blkfilter/')) continue;
          expect(LAYERS[dep], `${pkg.name} depends on ${dep}, which is not below it`).toBeLessThan(mine as number);
          expect(pkg.peerDependencies?.[dep], 'internal packages are dependencies, never peerDependencies').toBeUndefined();
        }
      }
    }
  });
});
