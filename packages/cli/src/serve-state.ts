import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { FileLock, LockedError } from './locks.js';
import { sourceKey } from './paths.js';

/** Who holds a source or a control socket, as its daemon wrote it down. */
interface Owner {
  readonly pid: number;
  readonly control: string;
  readonly source?: string;
  readonly since: string;
}

function readOwner(file: string): string | null {
  try {
    const o = JSON.parse(fs.readFileSync(file, 'utf8')) as Owner;
    return `pid ${o.pid}, control socket ${o.control}`;
  } catch {
    return null;
  }
}

function writeOwner(file: string, owner: Owner): void {
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, `${JSON.stringify(owner)}\n`);
  fs.renameSync(tmp, file);
}

/** A source this daemon serves: its state folder and the lock that makes it ours alone. */
export interface ClaimedSource {
  /** `<state dir>/sources/<key>`: what outlives the daemon for this source. */
  readonly dir: string;
  /** Where CBT keeps its checkpoint and journal for this source. */
  readonly cbtStateFile: string;
  release(): void;
}

/**
 * Claims `source` for this daemon: an exclusive lock on the image itself (with qemu's byte
 * locks, so qemu-img, qemu-io and qemu-nbd refuse it while we serve it) or, for an NBD source,
 * on a lock file in its state folder. Throws {@link LockedError} naming the holder's PID.
 */
export function claimSource(stateDir: string, source: string, control: string): ClaimedSource {
  const dir = path.join(stateDir, 'sources', sourceKey(source));
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const ownerFile = path.join(dir, 'owner.json');
  const holder = (): string | null => readOwner(ownerFile);
  let lock: FileLock;
  if (/^nbds?(\+unix)?:\/\//.test(source)) {
    const lockFile = path.join(dir, 'lock');
    fs.closeSync(fs.openSync(lockFile, 'a'));
    lock = FileLock.acquire(lockFile, 'NBD source', { holder });
  } else {
    lock = FileLock.acquire(fs.realpathSync(source), 'image', { qemu: true, holder });
  }
  writeOwner(ownerFile, { pid: process.pid, control, source, since: new Date().toISOString() });
  return {
    dir,
    cbtStateFile: path.join(dir, 'cbt.state'),
    release: () => {
      fs.rmSync(ownerFile, { force: true });
      lock.release();
    },
  };
}

/**
 * This daemon's run folder, `<state dir>/run/<pid>`, for what must not outlive it (diff storage
 * of snapshots): held by a lock while the daemon lives, removed at exit, and removed at the next
 * start when a daemon died without removing it (kill -9: its lock is gone with it).
 */
export class RunDir {
  readonly dir: string;
  private readonly lock: FileLock;

  private constructor(dir: string, lock: FileLock) {
    this.dir = dir;
    this.lock = lock;
  }

  /** Creates ours and removes the run folders of daemons that died; returns what was removed. */
  static create(stateDir: string): { run: RunDir; removed: string[] } {
    const base = path.join(stateDir, 'run');
    fs.mkdirSync(base, { recursive: true, mode: 0o700 });
    const removed: string[] = [];
    for (const name of fs.readdirSync(base)) {
      const dir = path.join(base, name);
      const lockFile = path.join(dir, 'lock');
      let stale: FileLock;
      try {
        stale = FileLock.acquire(lockFile, 'run folder');
      } catch (err) {
        if (err instanceof LockedError) continue; // a live daemon's
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') continue;
        // No lock file: a folder half made, or not ours to judge by age; leave it.
        continue;
      }
      stale.release();
      fs.rmSync(dir, { recursive: true, force: true });
      removed.push(dir);
    }
    const dir = path.join(base, String(process.pid));
    fs.rmSync(dir, { recursive: true, force: true });
    fs.mkdirSync(dir, { mode: 0o700 });
    const lockFile = path.join(dir, 'lock');
    fs.writeFileSync(lockFile, `${process.pid}\n`);
    return { run: new RunDir(dir, FileLock.acquire(lockFile, 'run folder')), removed };
  }

  /** The default diff storage folder of this run's snapshots. */
  get diffDir(): string {
    return path.join(this.dir, 'diff');
  }

  /** Removes the folder (at exit, after the snapshots were destroyed). */
  remove(): void {
    fs.rmSync(this.dir, { recursive: true, force: true });
    this.lock.release();
  }
}

function answers(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/**
 * Makes `socketPath` ours to listen on: a lock file beside it (held for the daemon's life, so
 * two daemons starting together cannot both take the path), then a probe: a socket that a daemon
 * answers on is never removed; a stale one (its daemon died) is.
 */
export async function claimControlPath(socketPath: string): Promise<{ release(): void }> {
  fs.mkdirSync(path.dirname(socketPath), { recursive: true, mode: 0o700 });
  const lockFile = `${socketPath}.lock`;
  const ownerFile = `${socketPath}.owner.json`;
  fs.closeSync(fs.openSync(lockFile, 'a'));
  const what = 'control socket';
  let lock: FileLock;
  try {
    lock = FileLock.acquire(lockFile, what, { holder: () => readOwner(ownerFile) });
  } catch (err) {
    if (err instanceof LockedError) {
      throw new LockedError(
        `another blkfilter daemon${((h) => (h !== null ? ` (${h})` : ''))(readOwner(ownerFile))} uses the control socket ${socketPath}; stop it, or give this one its own: blkfilter --control PATH serve ...`,
      );
    }
    throw err;
  }
  if (fs.existsSync(socketPath)) {
    if (await answers(socketPath)) {
      lock.release();
      throw new LockedError(`a daemon answers on the control socket ${socketPath} (not one holding its lock: an older blkfilter?); stop it, or use --control PATH`);
    }
    fs.rmSync(socketPath, { force: true });
  }
  writeOwner(ownerFile, { pid: process.pid, control: socketPath, since: new Date().toISOString() });
  return {
    release: () => {
      fs.rmSync(socketPath, { force: true });
      fs.rmSync(ownerFile, { force: true });
      lock.release();
    },
  };
}
