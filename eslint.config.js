import js from '@eslint/js';
import { createTypeScriptImportResolver } from 'eslint-import-resolver-typescript';
import { importX } from 'eslint-plugin-import-x';
import tseslint from 'typescript-eslint';
import { FOLDERS, forbiddenFor } from './tooling/layers.js';

/** no-restricted-imports for one workspace: nothing upward or sideways, no deep imports. */
function layerRule(name) {
  const forbidden = forbiddenFor(name);
  return {
    files: [`${FOLDERS[name]}/**/*.ts`],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          paths: forbidden.map((n) => ({
            name: n,
            message: `${name} may not import ${n}: arrows point down (ARCHITECTURE.md, "Packages and the direction of dependencies").`,
          })),
          patterns: [
            {
              group: forbidden.map((n) => `${n}/*`),
              message: 'arrows point down: this package may not import that one at all.',
            },
            {
              regex: '^@blkfilter/[^/]+/(?!testing$|package\\.json$).+',
              message: "import only a package's public entry ('@blkfilter/x' or '@blkfilter/x/testing'), never its internals.",
            },
            {
              regex: '^(\\.\\./)+(packages|apps)/|^(\\.\\./){2,}(?!tooling/)[^.]',
              message: "no relative imports across workspaces: import the other package by name through its public entry.",
            },
          ],
        },
      ],
    },
  };
}

export default tseslint.config(
  { ignores: ['**/dist/**', '**/node_modules/**', '**/.turbo/**', '**/coverage/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: { globals: { process: 'readonly', console: 'readonly', Buffer: 'readonly' } },
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      '@typescript-eslint/consistent-type-imports': 'error',
      'no-restricted-syntax': [
        'error',
        { selector: 'TSEnumDeclaration', message: 'use an `as const` object instead of an enum (STYLE.md).' },
        { selector: 'ExportDefaultDeclaration', message: 'named exports only (STYLE.md).' },
      ],
    },
  },
  ...Object.keys(FOLDERS).map(layerRule),
  {
    // No import circle across files: a module graph that is a tree of layers inside each package
    // too (narrow interfaces cut what would call back up). Type-only imports count: a circle of
    // types still ties the files together.
    files: ['packages/*/src/**/*.ts', 'apps/*/src/**/*.ts'],
    plugins: { 'import-x': importX },
    settings: {
      ...importX.flatConfigs.typescript.settings,
      'import-x/resolver-next': [
        createTypeScriptImportResolver({ project: ['packages/*/tsconfig.json', 'apps/*/tsconfig.json'], noWarnOnMultipleProjects: true }),
      ],
    },
    rules: { 'import-x/no-cycle': ['error', { ignoreExternal: true }] },
  },
  {
    // Config files are loaded by their tools and must default-export.
    files: ['**/*.config.ts', '**/*.config.js', 'eslint.config.js'],
    rules: { 'no-restricted-syntax': 'off' },
  },
);
