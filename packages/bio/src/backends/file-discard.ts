import { createRequire } from 'node:module';
import { allocIoBuffer } from '../aligned.js';

// DISCARD and WRITE_ZEROES of a FileBackend: hole punching through a native addon, and the
// shared zero buffer for the filesystems (and NOUNMAP requests) where a hole will not do.

/** Zeros are written in chunks of this many bytes, from one shared buffer. */
export const ZERO_CHUNK = 1 << 20;

/** The part of `fs-native-extensions` we use. */
export interface FsNativeExtensions {
  trim(fd: number, offset: number, length: number): Promise<void>;
}

// Loaded on first DISCARD/WRITE_ZEROES, not at import: it is a native addon, and a platform
// where it did not build still gets discard by writing zeros.
let fsExt: FsNativeExtensions | null = null;
let fsExtTried = false;

/** The hole-punching addon, or null where it did not build (loaded once, on first use). */
export function loadFsExt(): FsNativeExtensions | null {
  if (!fsExtTried) {
    fsExtTried = true;
    try {
      fsExt = createRequire(import.meta.url)('fs-native-extensions') as FsNativeExtensions;
    } catch {
      fsExt = null;
    }
  }
  return fsExt;
}

// One zero buffer for every backend: it is only ever written from, never into. Aligned to
// 4096 so that it also serves O_DIRECT backends of either minIoSize.
let zeroBuffer: Buffer | null = null;

/** The shared zero buffer ({@link ZERO_CHUNK} bytes, 4096-aligned): write from it, never into it. */
export function zeros(): Buffer {
  return (zeroBuffer ??= allocIoBuffer(ZERO_CHUNK, 4096));
}

/** Error codes of a filesystem that cannot punch holes (libuv names EOPNOTSUPP `ENOTSUP`). */
export function isPunchUnsupported(code: string | undefined): boolean {
  return code === 'ENOTSUP' || code === 'EOPNOTSUPP' || code === 'ENOSYS';
}
