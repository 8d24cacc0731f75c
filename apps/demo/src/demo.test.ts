import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect, it } from 'vitest';

it('runs the demo end to end, and every check passes', () => {
  const main = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'main.js');
  const r = spawnSync(process.execPath, [main], { encoding: 'utf8', timeout: 240_000 });
  if (r.status !== 0) console.error(r.stdout, r.stderr);
  expect(r.status).toBe(0);
  expect(r.stdout).toMatch(/all checks passed/);
  expect(r.stdout).toMatch(/backup 2: incremental/);
});
