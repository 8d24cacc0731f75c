import { performance } from 'node:perf_hooks';

// Small reads skip the threadpool while the page cache answers them. Profiled under an NBD
// server doing 4 KiB random reads at QD32 on a cached image, the threadpool hop (queueing,
// waking a worker, the eventfd back, one context switch or more per read on 2 cores) took over
// half of the JavaScript thread and most of the workers' time; a pread of 4 KiB from the page
// cache takes a microsecond or two. So a single-vec READ of at most INLINE_READ_MAX bytes is
// read on this thread and completed from a microtask once the current callback returns (never
// inside queueBio: a microtask, not the next turn's setImmediate, so a QD1 request does not wait
// an event-loop iteration). At most INLINE_TURN_BYTES are read inline per event-loop turn (the
// count resets from a setImmediate), so reads that completions lead to cannot keep the loop
// from polling I/O: past the budget they go to the threadpool. A read that
// takes longer than INLINE_MISS_MS went to the disk: inline reads then stop for a while
// (doubling on each miss, up to INLINE_BACKOFF_MAX_MS), so a cold image costs the event loop
// one disk read per backoff period, not one per bio. Writes are done inline only where the
// kernel takes RWF_NOWAIT for buffered writes (XFS and btrfs do, ext4 does not as of Linux
// 6.18): a write into the page cache can block on dirty-page throttling or a lock for
// milliseconds, and NOWAIT refuses it instead (decision 0016). Refused writes go to the
// threadpool.

/** Largest read done inline when timing tells cached reads (a disk read would block this long). */
export const INLINE_READ_MAX = 64 * 1024;
/**
 * Largest read done inline when RWF_NOWAIT tells cached reads: one that would wait is refused,
 * so only the copy is paid here, ~140 us per MiB. Served by an NBD server on 2 cores, a 1 MiB
 * read through the threadpool cost its hand-off (the woken worker preempting this thread) on
 * top: nbdcopy of a cached export went from 0.62x of nbdkit to 0.99x with these inline in one
 * run (0.72-0.79x in busier ones).
 */
export const INLINE_READ_MAX_NOWAIT = 1024 * 1024;
/** Largest write done inline (NOWAIT only): as for reads, only the copy is paid here. */
export const INLINE_WRITE_MAX_NOWAIT = 1024 * 1024;
/**
 * Inline reads and writes between two event-loop turns, in bytes: bounds how long a burst of reads keeps
 * the JavaScript thread (the rest go to the threadpool).
 */
export const INLINE_TURN_BYTES = 2 * 1024 * 1024;
/**
 * A page-cache hit of 64 KiB takes ~10 us, an NVMe read ~80 us: a read slower than this went to
 * the disk, or this thread was preempted during it (on a busy machine that happens every few
 * thousand reads). Only INLINE_MISS_STREAK slow reads in a row count as a miss.
 */
export const INLINE_MISS_MS = 0.05;
export const INLINE_MISS_STREAK = 2;
/** After a miss inline reads pause this long, doubling on each miss that follows, up to the max. */
export const INLINE_BACKOFF_MS = 50;
export const INLINE_BACKOFF_MAX_MS = 2000;

/** A monotonic clock in milliseconds, like `performance.now`. */
export type Clock = () => number;

/** The default clock of the inline-read heuristic. */
export const defaultClock: Clock = () => performance.now();

/** A request whose inline read is done and waits for the drain to complete it. */
export interface InlineCompletion {
  completeInline(): void;
}

/** The counters the heuristic keeps (a FileBackend's stats). */
export interface InlineReadCounters {
  inlineReads: number;
  inlineMisses: number;
  inlineWrites: number;
  inlineWriteMisses: number;
}

/**
 * When a FileBackend may read (and, with NOWAIT, write) on the JavaScript thread, and the
 * queue that completes those transfers once the current callback returns. Time comes from `clock` only, so a test can drive the backoff with a
 * clock of its own instead of hoping the machine is fast or slow enough.
 */
export class InlineReads<R extends InlineCompletion> {
  /** Inline reads allowed at all (option, and never with O_DIRECT). */
  readonly allowed: boolean;
  /**
   * Probe with preadv2(RWF_NOWAIT) instead of timing reads: no backoff, a read the cache
   * cannot serve is refused and goes to the threadpool. Turned off if the file refuses NOWAIT.
   */
  nowait: boolean;
  /**
   * Try small writes inline with pwritev2(RWF_NOWAIT): the file is buffered, not O_DSYNC, and
   * the addon loaded. Turned off for good when the file refuses NOWAIT writes (EOPNOTSUPP).
   */
  nowaitWrites: boolean;
  readonly clock: Clock;
  private readonly counters: InlineReadCounters;
  /** `clock()` before which inline reads are paused after a miss; 0 when not paused. */
  private pausedUntil: number;
  private backoff: number;
  /** Slow inline reads in a row. */
  private slow: number;
  /** Inline bytes read since the last drain (one event-loop turn). */
  private turnBytes: number;
  /** Reads done, waiting for the drain; swapped with `spare` while draining. */
  private queue: R[];
  private spare: R[];
  private readonly onDrain: () => void;
  private readonly onTurn: () => void;

  constructor(allowed: boolean, clock: Clock, counters: InlineReadCounters, nowait = false, nowaitWrites = false) {
    this.allowed = allowed;
    this.nowait = allowed && nowait;
    this.nowaitWrites = nowaitWrites;
    this.clock = clock;
    this.counters = counters;
    this.pausedUntil = 0;
    this.backoff = INLINE_BACKOFF_MS;
    this.slow = 0;
    this.turnBytes = 0;
    this.queue = [];
    this.spare = [];
    this.onDrain = () => this.drain();
    this.onTurn = () => {
      this.turnBytes = 0;
    };
  }

  /** May a read of `size` bytes be done inline now? */
  mayRead(size: number): boolean {
    if (!this.allowed || size > (this.nowait ? INLINE_READ_MAX_NOWAIT : INLINE_READ_MAX) || this.turnBytes + size > INLINE_TURN_BYTES) return false;
    if (this.pausedUntil === 0 || this.nowait) return true;
    if (this.clock() < this.pausedUntil) return false;
    // The next inline read probes the cache; a hit resets the backoff, a miss doubles it.
    this.pausedUntil = 0;
    return true;
  }

  /** May a write of `size` bytes be tried inline now (RWF_NOWAIT)? */
  mayWrite(size: number): boolean {
    return this.nowaitWrites && size <= INLINE_WRITE_MAX_NOWAIT && this.turnBytes + size <= INLINE_TURN_BYTES;
  }

  /**
   * The kernel refused a NOWAIT write: it would have waited (EAGAIN: it goes to the threadpool),
   * or the file takes no NOWAIT writes (`unsupported`: none are tried again).
   */
  refusedWrite(unsupported: boolean): void {
    if (unsupported) this.nowaitWrites = false;
    else this.counters.inlineWriteMisses++;
  }

  /** Records an inline write of `n` bytes, and queues `req` for the drain. */
  wrote(req: R, n: number): void {
    this.counters.inlineWrites++;
    this.queueDone(req, n);
  }

  /**
   * A NOWAIT probe found the data not cached (it goes to the threadpool), or the file does not
   * take NOWAIT at all (`unsupported`: timing from now on).
   */
  refused(unsupported: boolean): void {
    this.counters.inlineMisses++;
    if (unsupported) this.nowait = false;
  }

  /** Records an inline read of `n` bytes that took `ms`, and queues `req` for the drain. */
  done(req: R, n: number, ms: number): void {
    this.counters.inlineReads++;
    this.queueDone(req, n);
    if (this.nowait) {
      // Nothing to time: a read that would have waited was refused, not done.
    } else if (ms > INLINE_MISS_MS) {
      if (++this.slow >= INLINE_MISS_STREAK) {
        this.counters.inlineMisses++;
        this.pausedUntil = this.clock() + this.backoff;
        this.backoff = Math.min(this.backoff * 2, INLINE_BACKOFF_MAX_MS);
        // The probe after the pause is the streak's next read: one more miss pauses again.
        this.slow = INLINE_MISS_STREAK - 1;
      }
    } else if (this.slow !== 0) {
      this.slow = 0;
      this.backoff = INLINE_BACKOFF_MS;
    }
  }

  /** Counts `n` bytes against the turn's budget and queues `req` for the drain. */
  private queueDone(req: R, n: number): void {
    // The turn's budget resets at the next turn (a short transfer counts at least one byte).
    if (this.turnBytes === 0) setImmediate(this.onTurn);
    this.turnBytes += Math.max(n, 1);
    const q = this.queue;
    q.push(req);
    if (q.length === 1) queueMicrotask(this.onDrain);
  }

  /**
   * Completes the inline reads queued so far. Reads they lead to (the next piece of a short
   * read, the next bio of an end-io) queue for another drain, within the turn's byte budget.
   */
  private drain(): void {
    const q = this.queue;
    this.queue = this.spare;
    this.spare = q;
    for (let i = 0; i < q.length; i++) (q[i] as R).completeInline();
    q.length = 0;
  }
}
