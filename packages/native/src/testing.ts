// Helpers for tests of code built on the addon (`@blkfilter/native/testing`).
import fs from 'node:fs';

/** What AIO contexts hold in the kernel for this process. */
export interface AioResources {
  /** Open file descriptors that are eventfds (a context has one; so does libuv). */
  readonly eventfds: number;
  /** AIO rings mapped into this process (one per context io_destroy has not freed). */
  readonly rings: number;
}

/**
 * Counts this process's eventfds and AIO rings from /proc/self (Linux): equal counts before
 * and after a piece of work mean it closed every context it opened. Other code of the process
 * may open eventfds meanwhile; compare around work that owns the process, as a test does.
 */
export function aioResources(): AioResources {
  let eventfds = 0;
  for (const f of fs.readdirSync('/proc/self/fd')) {
    try {
      if (fs.readlinkSync(`/proc/self/fd/${f}`) === 'anon_inode:[eventfd]') eventfds++;
    } catch {
      // closed meanwhile
    }
  }
  const rings = fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((l) => l.includes('/[aio]')).length;
  return { eventfds, rings };
}
