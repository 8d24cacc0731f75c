import { createRequire } from 'node:module';
import fs from 'node:fs/promises';
import path from 'node:path';
import { ImageFormatError } from './errors.js';
import { RepositoryBusyError } from './errors.js';

/**
 * Reads exactly `length` bytes at `position` or throws an {@link ImageFormatError} naming the
 * file and offset: a short read (a truncated file) must never turn into zeros, which a qcow2
 * reader would take for "unallocated".
 */
export async function readExact(fh: fs.FileHandle, file: string, into: Uint8Array, length: number, position: number, what: string): Promise<void> {
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(into, done, length - done, position + done);
    if (bytesRead === 0) {
      throw new ImageFormatError(file, position, `${what}: expected ${length} bytes, the file ends after ${done} (truncated?)`);
    }
    done += bytesRead;
  }
}

/**
 * Reads `parts.reduce(length)` bytes at `position` into `parts` in order (one `preadv` when the
 * file gives them all at once); a file that ends first is an {@link ImageFormatError}, as in
 * {@link readExact}.
 */
export async function readExactv(fh: fs.FileHandle, file: string, parts: readonly Uint8Array[], position: number, what: string): Promise<void> {
  const length = parts.reduce((n, p) => n + p.length, 0);
  let done = 0;
  const rest: Uint8Array[] = [...parts];
  while (done < length) {
    const { bytesRead } = await fh.readv(rest, position + done);
    if (bytesRead === 0) throw new ImageFormatError(file, position, `${what}: expected ${length} bytes, the file ends after ${done} (truncated?)`);
    done += bytesRead;
    // A short read: go on from where it stopped.
    let skip = bytesRead;
    while (rest.length > 0 && skip >= (rest[0] as Uint8Array).length) skip -= (rest.shift() as Uint8Array).length;
    if (skip > 0) rest[0] = (rest[0] as Uint8Array).subarray(skip);
  }
}

/** fsync of a folder, so that a rename or create in it is durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const fh = await fs.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Replaces `file` atomically and durably: write a temporary file, fsync it, rename it over
 * `file`, fsync the folder. A crash at any point leaves the old or the new content, never a mix.
 */
export async function atomicWriteFile(file: string, data: string | Uint8Array, step?: (name: string) => void): Promise<void> {
  const tmp = `${file}.tmp`;
  const fh = await fs.open(tmp, 'w');
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  step?.(`${path.basename(file)}:tmp-synced`);
  await fs.rename(tmp, file);
  await fsyncDir(path.dirname(file));
}

interface FsExt {
  tryLock(fd: number, offset?: number, length?: number, opts?: { shared?: boolean }): boolean;
}
let fsExt: FsExt | null | undefined;
function loadFsExt(): FsExt | null {
  if (fsExt === undefined) {
    try {
      fsExt = createRequire(import.meta.url)('fs-native-extensions') as FsExt;
    } catch {
      fsExt = null;
    }
  }
  return fsExt;
}

/** A held folder lock; `release` closes the lock file (which drops the OFD lock). */
export interface FolderLock {
  release(): Promise<void>;
}

export const LOCK_FILE = '.lock';
/** Notes of long-lived shared holders (a served point), so that a refused writer can name them. */
export const HOLDERS_DIR = '.holders';

/** Who holds a folder's shared lock for long (from the notes in {@link HOLDERS_DIR} of live processes). */
export async function lockHolders(dir: string): Promise<string[]> {
  const names = await fs.readdir(path.join(dir, HOLDERS_DIR)).catch(() => [] as string[]);
  const out: string[] = [];
  for (const n of names) {
    try {
      const note = JSON.parse(await fs.readFile(path.join(dir, HOLDERS_DIR, n), 'utf8')) as { pid: number; holder: string; since: string };
      process.kill(note.pid, 0); // throws ESRCH when the holder died without removing its note
      out.push(`${note.holder} (pid ${note.pid}, since ${note.since})`);
    } catch {
      // a dead holder's note, or one being written: not a holder
    }
  }
  return out;
}

/**
 * Takes the backup folder's lock: exclusive for writers (backup, prune), shared for readers
 * (restore, verify, a served point). Open-file-description locks, so two calls in one process
 * exclude each other too. A reader of a folder it cannot write, without a lock file, goes
 * unlocked. A long-lived reader passes `holder` (e.g. `blkfilter serve --backup`): it leaves a
 * note in {@link HOLDERS_DIR} while it holds the lock, so that a refused writer names it.
 */
export async function lockFolder(dir: string, mode: 'exclusive' | 'shared', holder?: string): Promise<FolderLock> {
  const file = path.join(dir, LOCK_FILE);
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(file, mode === 'exclusive' ? 'a+' : 'r');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (mode === 'shared' && (code === 'ENOENT' || code === 'EACCES' || code === 'EROFS')) return { release: async () => {} };
    throw err;
  }
  const ext = loadFsExt();
  if (ext !== null && !ext.tryLock(fh.fd, 0, 0, { shared: mode === 'shared' })) {
    await fh.close();
    const holders = mode === 'exclusive' ? await lockHolders(dir) : [];
    const who = holders.length > 0 ? `it is held by ${holders.join(', ')}; stop ${holders.length > 1 ? 'them' : 'it'} first` : `another backup, prune${mode === 'exclusive' ? ', restore or verify' : ''} holds ${file}; wait for it to finish and try again`;
    throw new RepositoryBusyError(`${dir} is in use: ${who}`);
  }
  if (holder === undefined) return { release: () => fh.close() };
  const note = path.join(dir, HOLDERS_DIR, `${process.pid}-${Math.random().toString(36).slice(2, 10)}.json`);
  try {
    await fs.mkdir(path.dirname(note), { recursive: true });
    await fs.writeFile(note, JSON.stringify({ pid: process.pid, holder, since: new Date().toISOString() }));
  } catch {
    // A read-only folder: the lock still holds, only the name of its holder is missing.
  }
  return {
    release: async () => {
      await fs.rm(note, { force: true }).catch(() => {});
      await fh.close();
    },
  };
}
