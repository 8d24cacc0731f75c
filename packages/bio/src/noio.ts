import { ReqFlag } from './op.js';
import type { Bio } from './bio.js';

// The no-I/O allocation scope (the kernel's memalloc_noio_save/restore): code that runs on
// behalf of swap or reclaim marks its extent, and filters asked to allocate in it (diff storage
// growth, buffers that could need paging) must serve from a reserve or fail the bio, never
// start I/O and wait for it: that I/O may need the very memory being reclaimed. JavaScript has
// one thread, so the scope is a depth counter over a synchronous extent; bios carry
// ReqFlag.SWAP so the rule follows them into asynchronous continuations too.
let noioDepth = 0;

/**
 * Enters a no-I/O scope; returns the token for {@link memallocNoioRestore}. Scopes nest.
 * Runs no I/O and cannot fail.
 */
export function memallocNoioSave(): number {
  return noioDepth++;
}

/** Leaves the scope entered by the {@link memallocNoioSave} that returned `token`. */
export function memallocNoioRestore(token: number): void {
  noioDepth = token;
}

/** Runs `fn` in a no-I/O scope (synchronously; the scope ends when `fn` returns). */
export function withNoio<T>(fn: () => T): T {
  const token = memallocNoioSave();
  try {
    return fn();
  } finally {
    memallocNoioRestore(token);
  }
}

/** True inside a no-I/O scope. */
export function inNoioScope(): boolean {
  return noioDepth > 0;
}

/**
 * True when work for `bio` must not allocate in a way that needs I/O: the bio is swap I/O, goes
 * to a swap device, or is handled inside a no-I/O scope. Filters check this before growing
 * anything on the bio's behalf.
 */
export function bioNeedsNoio(bio: Bio): boolean {
  return noioDepth > 0 || (bio.flags & ReqFlag.SWAP) !== 0 || bio.bdev.swap || bio.bdev.disk.part0.swap;
}
