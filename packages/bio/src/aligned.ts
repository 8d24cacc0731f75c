import { createRequire } from 'node:module';
import { InvalidArgumentError, NotSupportedError } from './errors.js';

/** The part of `@ronomon/direct-io` (CommonJS, native addon, untyped) that we use. */
interface DirectIoAddon {
  getAlignedBuffer(size: number, alignment: number): Buffer;
  getBlockDevice(
    fd: number,
    callback: (error: Error | undefined | null, device: { logicalSectorSize: number; physicalSectorSize: number; size: number }) => void,
  ): void;
}

// The addon is loaded on first use, not at import: importing the package must work on a
// platform where it did not build; only O_DIRECT (and block device sizing) needs it.
let addon: DirectIoAddon | null = null;
let addonError: unknown = null;
let addonTried = false;

/** @internal the loaded addon, or null when it did not load ({@link directIoLoadError} says why). */
export function loadDirectIo(): DirectIoAddon | null {
  if (!addonTried) {
    addonTried = true;
    try {
      addon = createRequire(import.meta.url)('@ronomon/direct-io') as DirectIoAddon;
    } catch (err) {
      addonError = err;
    }
  }
  return addon;
}

/** @internal why the addon did not load (null when it did, or was not tried yet). */
export function directIoLoadError(): unknown {
  return addonError;
}

/**
 * @internal Returns the addon or throws {@link NotSupportedError} saying what to do: called
 * when O_DIRECT is actually asked for, never at import.
 */
export function requireDirectIo(what: string): DirectIoAddon {
  const a = loadDirectIo();
  if (a !== null) return a;
  const reason = addonError instanceof Error ? addonError.message : String(addonError);
  throw new NotSupportedError(
    `${what} needs aligned buffers from @ronomon/direct-io, whose native addon did not load on this platform (${reason}); ` +
      'rebuild it with `npm rebuild @ronomon/direct-io`, or open without `direct: true`',
  );
}

// Buffers handed out by allocIoBuffer, by their ArrayBuffer: a subarray shares the ArrayBuffer,
// so one entry answers for every view of it. The value is the byteOffset of the aligned
// address inside the ArrayBuffer (0 for the addon's buffers) and the alignment it was made
// with. A WeakMap (not a WeakSet) so a buffer made with 512 is not taken for 4096-aligned.
interface AlignedBase {
  readonly base: number;
  readonly alignment: number;
}
const aligned = new WeakMap<ArrayBufferLike, AlignedBase>();

const MAX_SIZE = 2 ** 31 - 1;
const MAX_ALIGNMENT = 4 * 1024 * 1024;

/**
 * Allocates a zero-filled buffer of `size` bytes whose memory address is a multiple of
 * `alignment` (a power of two from 8 to 4 MiB; 4096 by default), as O_DIRECT needs; it is
 * freed by the garbage collector. Uses `@ronomon/direct-io`'s `posix_memalign`; where that
 * addon did not build, returns an ordinary zero-filled buffer, which
 * {@link isIoBufferAligned} then reports as unaligned (O_DIRECT backends bounce it).
 * Allocation is a native call plus a memset: pool these buffers, do not make one per bio.
 * Throws {@link InvalidArgumentError} for a bad size or alignment.
 */
export function allocIoBuffer(size: number, alignment = 4096): Buffer {
  if (!Number.isSafeInteger(size) || size < 0 || size > MAX_SIZE) {
    throw new InvalidArgumentError(`I/O buffer size ${size} must be a whole number of bytes from 0 to ${MAX_SIZE}`);
  }
  if (!Number.isInteger(alignment) || alignment < 8 || alignment > MAX_ALIGNMENT || (alignment & (alignment - 1)) !== 0) {
    throw new InvalidArgumentError(`I/O buffer alignment ${alignment} must be a power of two from 8 to ${MAX_ALIGNMENT}`);
  }
  const a = loadDirectIo();
  if (a === null) return Buffer.alloc(size);
  // The addon refuses size 0; a 0-byte view of a real allocation keeps the answer uniform.
  const buf = a.getAlignedBuffer(Math.max(size, 1), alignment);
  aligned.set(buf.buffer, { base: buf.byteOffset, alignment });
  return size === buf.length ? buf : buf.subarray(0, size);
}

/**
 * True when `length` bytes of `buffer` from `offset` can go to an O_DIRECT read or write as
 * they are: the buffer came from {@link allocIoBuffer} (or is a view of one) with at least
 * `alignment`, and both the address of byte `offset` and `length` are multiples of
 * `alignment`. False means "not known to be aligned": copy through a bounce buffer.
 */
export function isIoBufferAligned(buffer: Uint8Array, offset: number, length: number, alignment: number): boolean {
  const info = aligned.get(buffer.buffer);
  if (info === undefined || alignment > info.alignment) return false;
  return (buffer.byteOffset - info.base + offset) % alignment === 0 && length % alignment === 0;
}
