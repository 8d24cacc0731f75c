import fs from 'node:fs';
import { createRequire } from 'node:module';
import { BlkError } from '@blkfilter/bio';

/** The part of `fs-native-extensions` used here: OFD byte-range locks (`F_OFD_SETLK`) on Linux. */
interface FsLocks {
  tryLock(fd: number, offset: number, length: number, opts: { shared?: boolean }): boolean;
  unlock(fd: number, offset: number, length: number): void;
}

let fsLocks: FsLocks | null = null;
function locks(): FsLocks {
  fsLocks ??= createRequire(import.meta.url)('fs-native-extensions') as FsLocks;
  return fsLocks;
}

/** Another process holds the lock: a second blkfilter, or qemu, or a VM. */
export class LockedError extends BlkError {
  constructor(message: string) {
    super('EBUSY', message);
  }
}

// qemu locks bytes of the image itself (block/file-posix.c): byte 100 + n while it holds
// permission n, byte 200 + n while it refuses to share permission n (0 consistent read, 1 write,
// 2 write unchanged, 3 resize). Holding "consistent read, write, resize" and sharing neither
// write nor resize makes qemu-img, qemu-io and qemu-nbd refuse the image while we serve it, and
// us see theirs. Our own exclusive lock lies far past any image's end, where qemu never looks.
const QEMU_HELD = [100, 101, 103];
const QEMU_UNSHARED = [201, 203];
const OWN_BYTE = 2 ** 40;

/**
 * An exclusive hold on a file (an image, a state file, a folder's lock file) for as long as this
 * process serves it: an OFD lock on a descriptor of its own, released by {@link release} or by
 * the process's death (so kill -9 never leaves a stale lock).
 */
export class FileLock {
  private fd: number;
  readonly path: string;

  private constructor(path: string, fd: number) {
    this.path = path;
    this.fd = fd;
  }

  /**
   * Takes the lock on `file` or throws {@link LockedError} saying who holds it (`holder()` gives
   * what is known: a blkfilter daemon's PID from its state). With `qemu`, also takes qemu's
   * byte locks so that qemu programs refuse the file, and refuses a file qemu holds.
   */
  static acquire(file: string, what: string, options: { qemu?: boolean; holder?: () => string | null } = {}): FileLock {
    let fd: number;
    let writable = true;
    try {
      fd = fs.openSync(file, 'r+');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'EACCES' && code !== 'EROFS' && code !== 'EPERM') throw err;
      // A file we may only read can only be locked shared: nothing we do can change it anyway.
      fd = fs.openSync(file, 'r');
      writable = false;
    }
    const l = locks();
    try {
      if (!l.tryLock(fd, OWN_BYTE, 1, { shared: !writable })) {
        const who = options.holder?.() ?? null;
        throw new LockedError(
          `${what} "${file}" is in use by another blkfilter${who !== null ? ` (${who})` : ''}: two daemons on one image would each miss the other's writes in their changed-block tracking. Stop the other one, or serve a copy`,
        );
      }
      if (options.qemu === true && writable) {
        // An exclusive try tells whether anyone else holds a byte; then keep it shared (qemu's
        // own convention) or give it back.
        const busy = (b: number): boolean => !l.tryLock(fd, b, 1, {});
        if (busy(101) || busy(103)) throw new LockedError(`${what} "${file}" is open for writing in a qemu program (qemu-nbd, qemu-io, a VM); close that first`);
        if (busy(200) || busy(201) || busy(203)) throw new LockedError(`${what} "${file}" is open in a qemu program (qemu-img, a VM) that forbids others to write it; close that first`);
        l.unlock(fd, 200, 1);
        for (const b of [...QEMU_HELD, ...QEMU_UNSHARED]) l.tryLock(fd, b, 1, { shared: true });
      }
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
    return new FileLock(file, fd);
  }

  /** Gives the lock back (idempotent). */
  release(): void {
    if (this.fd < 0) return;
    fs.closeSync(this.fd);
    this.fd = -1;
  }
}
