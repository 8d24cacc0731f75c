import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect, it } from 'vitest';
import { fsStoryPrerequisites } from './fs-story.js';

const MAIN = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'main.js');
const demo = (args: string[] = []): SpawnSyncReturns<string> => {
  const r = spawnSync(process.execPath, [MAIN, ...args], { encoding: 'utf8', timeout: 240_000 });
  if (r.status !== 0) console.error(r.stdout, r.stderr);
  return r;
};
const pre = fsStoryPrerequisites();

it(`npm run demo: ${pre.ok ? 'the ext4 story (this machine allows a kernel filesystem)' : `the raw-image story (${pre.reason})`}, and every check passes`, () => {
  const r = demo();
  expect(r.status).toBe(0);
  expect(r.stdout).toMatch(/all checks passed/);
  expect(r.stdout).not.toMatch(/FAIL/);
  if (!pre.ok) {
    expect(r.stdout).toContain(`the raw-image story: no kernel filesystem here, because ${pre.reason}`);
    return;
  }
  expect(r.stdout).toMatch(/the ext4 story/);
  for (const at of [1, 2]) {
    expect(r.stdout).toMatch(new RegExp(`ok   snapshot ${at} was taken frozen`));
    expect(r.stdout).toMatch(new RegExp(`ok   point ${at}: e2fsck -fn is clean`));
    expect(r.stdout).toMatch(new RegExp(`ok   point ${at}: mounted -o ro,norecovery, its \\d+ files equal the files at freeze ${at}`));
  }
  expect(r.stdout).toMatch(/backup 2: incremental/);
  expect(r.stdout).toMatch(/ok {3}backup 2 read about what changed, not the disk/);
  expect(r.stdout).toMatch(/ok {3}nothing left behind/);
  // And from outside: nothing of its folder in the mount table or among the loop devices.
  const dir = /working in (\S+);/.exec(r.stdout)?.[1] ?? '';
  expect(dir).not.toBe('');
  expect(fs.readFileSync('/proc/mounts', 'utf8')).not.toContain(dir);
  expect(spawnSync('losetup', ['-a'], { encoding: 'utf8' }).stdout).not.toContain(dir);
  expect(fs.existsSync(dir)).toBe(false);
});

it('npm run demo -- --raw: the raw-image story, and every check passes', () => {
  const r = demo(['--raw']);
  expect(r.status).toBe(0);
  expect(r.stdout).toMatch(/the raw-image story \(--raw\)/);
  expect(r.stdout).toMatch(/all checks passed/);
  expect(r.stdout).toMatch(/backup 2: incremental/);
});

it('an unknown argument is a usage error', () => {
  const r = demo(['--bogus']);
  expect(r.status).toBe(2);
  expect(r.stderr).toMatch(/usage: npm run demo/);
});
