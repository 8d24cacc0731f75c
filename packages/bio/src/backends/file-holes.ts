import { fileExtents, nativeAvailable } from '@blkfilter/native';
import type { BlockStatusExtent } from '../backend.js';

// Holes of a FileBackend: lseek(SEEK_DATA/SEEK_HOLE) through @blkfilter/native (a native addon
// built at install, whose failed build leaves the package installed without it). Where the
// addon did not load, a file backend has no blockStatus at all: every range is data, correct.

/** The part of `@blkfilter/native` a file backend uses (a parameter, so tests can hand in their own). */
export interface NativeHoles {
  fileExtents(fd: number, offset: number, length: number, size: number): ReadonlyArray<{ readonly length: number; readonly hole: boolean }>;
}

/** `@blkfilter/native` where its addon loaded, else null (every range is then data). */
export function nativeHoles(): NativeHoles | null {
  return nativeAvailable() ? { fileExtents } : null;
}

/**
 * The holes and data of `[offset, offset + length)` of the open file `fd` of `size` bytes, as
 * the filesystem's extent map has them now, or null when it cannot tell (the backend is closed,
 * lseek failed). A hole is what the filesystem will read as zeros: never allocated, punched, or
 * allocated but unwritten (fallocate). Bytes past `size` are a hole (they read as zeros).
 */
export function fileBlockStatus(native: NativeHoles, fd: number, offset: number, length: number, size: number): BlockStatusExtent[] | null {
  if (fd < 0) return null;
  let runs: ReadonlyArray<{ readonly length: number; readonly hole: boolean }>;
  try {
    runs = native.fileExtents(fd, offset, length, size);
  } catch {
    return null;
  }
  const out: BlockStatusExtent[] = new Array<BlockStatusExtent>(runs.length);
  for (let i = 0; i < runs.length; i++) {
    const r = runs[i] as { readonly length: number; readonly hole: boolean };
    out[i] = { length: r.length, hole: r.hole };
  }
  return out;
}
