// I/O accounting of a device (the kernel's part_stat, what /proc/diskstats prints), kept in a
// few typed arrays so that counting a completion is some additions and one Math.clz32: no
// allocation, no closure, nothing per bio but a start time. Off (null on the device) unless
// someone asks for it.

/** Slots of the per-op arrays: indexed by the op's number ({@link ReqOp}; WRITE_ZEROES is 9). */
export const IO_STATS_OPS = 10;
/** Slots of the per-status error array: indexed by the {@link BlkStatus} number. */
export const IO_STATS_STATUSES = 32;
/**
 * Latency buckets: bucket 0 holds latencies under 1 µs, bucket k (k >= 1) those in
 * [2^(k-1), 2^k) µs, the last everything from 2^(IO_LATENCY_BUCKETS-2) µs (~34 s) up.
 */
export const IO_LATENCY_BUCKETS = 27;

/** Histogram classes: reads, writes (WRITE, DISCARD, WRITE_ZEROES), and flushes. */
export const IoClass = { READ: 0, WRITE: 1, FLUSH: 2 } as const;
/** One of {@link IoClass}. */
export type IoClass = (typeof IoClass)[keyof typeof IoClass];

/**
 * Completed-I/O counters of one device or one export: ops, bytes and errors per op, and a
 * log2 latency histogram per {@link IoClass}. Plain numbers, monotonic (counters never go
 * down); readers take differences between two reads for rates and percentiles.
 */
export class IoStats {
  /** Completed ops by op number (errors included). */
  readonly ops = new Float64Array(IO_STATS_OPS);
  /** Bytes of ops that completed OK, by op number (FLUSH counts 0). */
  readonly bytes = new Float64Array(IO_STATS_OPS);
  /** Failed completions by status number. */
  readonly errors = new Float64Array(IO_STATS_STATUSES);
  /** Latency histogram: `latency[cls * IO_LATENCY_BUCKETS + bucket]`, non-cumulative counts. */
  readonly latency = new Float64Array(3 * IO_LATENCY_BUCKETS);
  /** Sum of latencies in milliseconds, per {@link IoClass}. */
  readonly latencySumMs = new Float64Array(3);

  /**
   * Counts one completion: `op` (a ReqOp number), `size` bytes, `status` (a BlkStatus
   * number), `ms` from submission to completion (negative when unknown: not timed).
   */
  account(op: number, size: number, status: number, ms: number): void {
    // Typed arrays read 0 past their end, never undefined; the casts only tell the compiler.
    this.ops[op] = (this.ops[op] as number) + 1;
    if (status === 0) this.bytes[op] = (this.bytes[op] as number) + size;
    else this.errors[status & 31] = (this.errors[status & 31] as number) + 1;
    if (ms < 0) return;
    const cls = op === 2 ? 2 : op & 1;
    // 0 for < 1 µs, else 1 + floor(log2(µs)); clamped to the last bucket.
    const us = ms >= 2_000_000 ? 0x7fffffff : (ms * 1000) | 0;
    const b = us === 0 ? 0 : 32 - Math.clz32(us);
    const i = cls * IO_LATENCY_BUCKETS + (b < IO_LATENCY_BUCKETS ? b : IO_LATENCY_BUCKETS - 1);
    this.latency[i] = (this.latency[i] as number) + 1;
    this.latencySumMs[cls] = (this.latencySumMs[cls] as number) + ms;
  }

  /** The upper bound (exclusive) of latency bucket `b` in seconds; Infinity for the last. */
  static bucketUpperSeconds(b: number): number {
    return b >= IO_LATENCY_BUCKETS - 1 ? Infinity : 2 ** b / 1e6;
  }
}
