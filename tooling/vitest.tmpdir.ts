// A vitest globalSetup that every workspace's vitest.config.ts lists: the run gets a temp
// folder of its own (TMPDIR, which os.tmpdir() and every child process read), and the run fails
// when a test left anything in it. Tests remove what they create (afterEach/afterAll); a folder
// per run also keeps parallel packages from seeing each other's files.
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** Points TMPDIR at a fresh folder; the returned teardown fails the run if it is not empty. */
export function setup(): () => void {
  const outer = tmpdir();
  const dir = mkdtempSync(join(outer, 'blkfilter-vitest-'));
  process.env.TMPDIR = dir;
  return () => {
    process.env.TMPDIR = outer;
    const left = readdirSync(dir).sort();
    try {
      rmSync(dir, { recursive: true, force: true });
    } catch {
      // a mount left behind cannot be removed: the error below names it
    }
    if (left.length > 0) {
      const shown = left.slice(0, 10).join(', ') + (left.length > 10 ? `, ... (${left.length} in all)` : '');
      // vitest reports an error thrown here but still exits 0: set the exit code as well.
      process.exitCode = 1;
      throw new Error(`the tests left ${left.length} entries in the temp folder: ${shown}. Remove what a test creates (afterEach/afterAll, close file handles).`);
    }
  };
}
