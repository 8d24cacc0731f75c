// The system calls blkfilter needs and Node.js does not expose, in one small N-API addon built
// from source at install (node-gyp; Node's headers and a C compiler). Loaded lazily: where it
// did not build, `nativeLoadError()` says why and the callers fall back (a file reports every
// range as data), so nothing is ever wrong, only slower.
import { createRequire } from 'node:module';

/** The addon's raw functions (src/*.c). */
interface Addon {
  seek(fd: number, offset: number, whence: 0 | 1): number;
  preadNowait(fd: number, buf: Uint8Array, offset: number, length: number, position: number): number;
  pwriteNowait(fd: number, buf: Uint8Array, offset: number, length: number, position: number): number;
}

let addon: Addon | null | undefined;
let loadError: string | null = null;

function load(): Addon | null {
  if (addon !== undefined) return addon;
  try {
    // build/ sits beside src/ and dist/, so one relative path serves the tests and the build.
    addon = createRequire(import.meta.url)('../build/Release/blkfilter_native.node') as Addon;
  } catch (err) {
    addon = null;
    loadError = `the native addon of @blkfilter/native did not load (${(err as Error).message}); rebuild it with \`npm rebuild @blkfilter/native\` (needs python3, make and a C compiler)`;
  }
  return addon;
}

/** Why the addon is not available, or null when it is. */
export function nativeLoadError(): string | null {
  load();
  return loadError;
}

/** Is the addon loaded (seekData/seekHole usable)? */
export function nativeAvailable(): boolean {
  return load() !== null;
}

/** Thrown when a function of the addon is called where it did not load. */
export class NativeUnavailableError extends Error {
  readonly code = 'ENOSYS';
  constructor(what: string) {
    super(`${what}: ${nativeLoadError() ?? 'unavailable'}`);
    this.name = 'NativeUnavailableError';
  }
}

function required(what: string): Addon {
  const a = load();
  if (a === null) throw new NativeUnavailableError(what);
  return a;
}

/**
 * `lseek(fd, offset, SEEK_DATA)`: the first offset at or after `offset` that holds data, or
 * -1 when none does (ENXIO: only a hole up to the end, or `offset` at or past the end). Other
 * errors throw with the errno's name in `code`. Filesystems without extent maps report the
 * whole file as data, which is always correct.
 */
export function seekData(fd: number, offset: number): number {
  return required('seekData').seek(fd, offset, 0);
}

/**
 * `lseek(fd, offset, SEEK_HOLE)`: the first offset at or after `offset` in a hole (the end of
 * the file counts as a hole), or -1 when `offset` is at or past the end (ENXIO).
 */
export function seekHole(fd: number, offset: number): number {
  return required('seekHole').seek(fd, offset, 1);
}

/** One run of a file's map: `length` bytes from `offset`, data or hole. */
export interface FileExtent {
  offset: number;
  length: number;
  hole: boolean;
}

/**
 * The data and hole runs of `[offset, offset + length)` of an open file of `size` bytes, in
 * order and covering the range (bytes past the end of the file are reported as a hole). Two
 * lseeks per data run: cheap, but a caller maps what it is about to read, not a whole disk.
 * A file written while it is mapped may report a hole that has just been written: callers
 * that need a stable answer map a file nobody writes, or hold off its writers.
 */
export function fileExtents(fd: number, offset: number, length: number, size: number): FileExtent[] {
  const a = required('fileExtents');
  const end = offset + length;
  const out: FileExtent[] = [];
  const push = (o: number, n: number, hole: boolean): void => {
    if (n <= 0) return;
    const last = out[out.length - 1];
    if (last !== undefined && last.hole === hole && last.offset + last.length === o) last.length += n;
    else out.push({ offset: o, length: n, hole });
  };
  let pos = offset;
  const dataEnd = Math.min(end, size);
  while (pos < dataEnd) {
    const data = a.seek(fd, pos, 0);
    if (data < 0 || data >= dataEnd) {
      push(pos, dataEnd - pos, true);
      pos = dataEnd;
      break;
    }
    push(pos, data - pos, true);
    const hole = a.seek(fd, data, 1);
    const stop = hole < 0 ? dataEnd : Math.min(hole, dataEnd);
    push(data, stop - data, false);
    pos = stop;
  }
  push(pos, end - pos, true);
  return out;
}

/** `-EAGAIN`: a NOWAIT call that would have waited. */
export const NOWAIT_AGAIN = -11;
/** `-EOPNOTSUPP`: the file or filesystem does not take RWF_NOWAIT for this kind of I/O. */
export const NOWAIT_UNSUPPORTED = -95;

/**
 * `preadv2(fd, [buf[offset, offset + length)], position, RWF_NOWAIT)`: bytes read (0 at the end
 * of the file), or -errno: {@link NOWAIT_AGAIN} when the data is not all in the page cache
 * (nothing waited), {@link NOWAIT_UNSUPPORTED} where NOWAIT is not offered. Never throws for
 * I/O; throws TypeError for bad arguments, and NativeUnavailableError without the addon.
 */
export function preadNowait(fd: number, buf: Uint8Array, offset: number, length: number, position: number): number {
  return required('preadNowait').preadNowait(fd, buf, offset, length, position);
}

/**
 * `pwritev2(..., RWF_NOWAIT)`: bytes written or -errno, as {@link preadNowait}. Buffered writes
 * take NOWAIT only on some filesystems (ext4 on Linux 6.x answers EOPNOTSUPP).
 */
export function pwriteNowait(fd: number, buf: Uint8Array, offset: number, length: number, position: number): number {
  return required('pwriteNowait').pwriteNowait(fd, buf, offset, length, position);
}
