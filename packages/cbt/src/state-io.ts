import fs from 'node:fs';
import path from 'node:path';

/** An open file of the CBT state (checkpoint or journal). */
export interface CbtStateHandle {
  /** Writes all of `data` at byte `position`. */
  write(data: Uint8Array, position: number): Promise<void>;
  /** Makes every write so far durable (`fdatasync`). */
  sync(): Promise<void>;
  /**
   * Writes all of `data` at `position` and makes it (and every write before it) durable: one
   * `O_DSYNC` write where the handle was opened with `dsync`, else a write and a sync.
   */
  writeDurable(data: Uint8Array, position: number): Promise<void>;
  close(): Promise<void>;
}

/**
 * The file operations CBT's persistence uses, and nothing else: the default is `node:fs`; a
 * test or the harness injects one that records every write and sync, so that the state a power
 * cut could leave can be rebuilt and replayed (in the manner of dm-log-writes).
 */
export interface CbtStateIo {
  /** The whole file, or null when it does not exist. */
  readFile(file: string): Promise<Buffer | null>;
  /** Creates `file` (truncating an existing one) for writing. */
  create(file: string): Promise<CbtStateHandle>;
  /**
   * Opens an existing `file` for writing at chosen positions; with `dsync`, every write is
   * durable when it returns (`O_DSYNC`), so `writeDurable` costs one system call.
   */
  openForWrite(file: string, options?: { readonly dsync?: boolean }): Promise<CbtStateHandle>;
  /** Renames `from` over `to` (atomic; durable once the directory is synced). */
  rename(from: string, to: string): Promise<void>;
  /** Removes `file`; a missing file is not an error. */
  unlink(file: string): Promise<void>;
  /** Makes renames, creations and removals in `dir` durable (fsync of the directory). */
  syncDir(dir: string): Promise<void>;
}

class NodeHandle implements CbtStateHandle {
  constructor(
    private readonly fd: number,
    private readonly dsync = false,
  ) {}

  async writeDurable(data: Uint8Array, position: number): Promise<void> {
    await this.write(data, position);
    if (!this.dsync) await this.sync();
  }

  write(data: Uint8Array, position: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const step = (done: number): void => {
        if (done === data.length) {
          resolve();
          return;
        }
        fs.write(this.fd, data, done, data.length - done, position + done, (err, n) => {
          if (err !== null) reject(err);
          else if (n === 0) reject(new Error(`short write at ${position + done}`));
          else step(done + n);
        });
      };
      step(0);
    });
  }

  sync(): Promise<void> {
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (err) => (err !== null ? reject(err) : resolve())));
  }

  close(): Promise<void> {
    return new Promise((resolve, reject) => fs.close(this.fd, (err) => (err !== null ? reject(err) : resolve())));
  }
}

function openFd(file: string, flags: string | number): Promise<number> {
  return new Promise((resolve, reject) => fs.open(file, flags, 0o600, (err, fd) => (err !== null ? reject(err) : resolve(fd))));
}

/** {@link CbtStateIo} on the real file system (`node:fs`). */
export const nodeStateIo: CbtStateIo = Object.freeze({
  async readFile(file: string): Promise<Buffer | null> {
    try {
      return await fs.promises.readFile(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    }
  },
  async create(file: string): Promise<CbtStateHandle> {
    return new NodeHandle(await openFd(file, 'w'));
  },
  async openForWrite(file: string, options?: { readonly dsync?: boolean }): Promise<CbtStateHandle> {
    const dsync = options?.dsync === true && fs.constants.O_DSYNC !== undefined;
    return new NodeHandle(await openFd(file, dsync ? fs.constants.O_RDWR | fs.constants.O_DSYNC : 'r+'), dsync);
  },
  rename(from: string, to: string): Promise<void> {
    return fs.promises.rename(from, to);
  },
  unlink(file: string): Promise<void> {
    return fs.promises.rm(file, { force: true });
  },
  async syncDir(dir: string): Promise<void> {
    // Not every platform can open a directory for fsync; where it cannot, a rename may be lost
    // in a power cut, which brings back the previous checkpoint and its journal: still exact.
    let fd: number;
    try {
      fd = await openFd(dir, 'r');
    } catch {
      return;
    }
    const h = new NodeHandle(fd);
    try {
      await h.sync();
    } catch {
      // As above.
    } finally {
      await h.close();
    }
  },
});

/**
 * Replaces `file` with `data` so that a crash at any point leaves the old content or the new,
 * never a mix: a temporary file beside it, written and synced, renamed over, the directory synced.
 */
export async function replaceFileAtomic(io: CbtStateIo, file: string, data: Uint8Array, tmpSuffix: string): Promise<void> {
  const tmp = `${file}.${tmpSuffix}.tmp`;
  const h = await io.create(tmp);
  try {
    try {
      await h.write(data, 0);
      await h.sync();
    } finally {
      await h.close();
    }
    await io.rename(tmp, file);
  } catch (err) {
    await io.unlink(tmp).catch(() => {});
    throw err;
  }
  await io.syncDir(path.dirname(file));
}
