import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
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

describe('no import circle across files', () => {
  it('refuses two modules that import each other (values), and lets a type-only reference back pass', async () => {
    const dir = join(root, 'packages/bio/src/__cycle_probe__');
    mkdirSync(dir, { recursive: true });
    try {
      writeFileSync(join(dir, 'a.ts'), "import { b } from './b.js';\nexport const a = (): unknown => b;\n");
      writeFileSync(join(dir, 'b.ts'), "import { a } from './a.js';\nexport const b = (): unknown => a;\n");
      writeFileSync(join(dir, 'c.ts'), "import type { D } from './d.js';\nexport interface C { d: D }\n");
      writeFileSync(join(dir, 'd.ts'), "import type { C } from './c.js';\nexport interface D { c: C }\n");
      const results = await eslint.lintFiles([join(dir, '*.ts')]);
      const cycles = (name: string): number =>
        results.find((r) => r.filePath.endsWith(`/${name}`))?.messages.filter((m) => m.ruleId === 'import-x/no-cycle').length ?? -1;
      expect([cycles('a.ts'), cycles('b.ts')]).toEqual([1, 1]);
      expect([cycles('c.ts'), cycles('d.ts')]).toEqual([0, 0]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
