import { IO_LATENCY_BUCKETS, IoStats, ReqOp, type BlockDev } from '@blkfilter/bio';

/** What one device or export did over one interval: rates and latency percentiles. */
export interface IoSample {
  readonly readIops: number;
  readonly writeIops: number;
  readonly readBytesPerSec: number;
  readonly writeBytesPerSec: number;
  /** Latency percentiles of all ops completed in the interval, in milliseconds (null: none). */
  readonly p50Ms: number | null;
  readonly p99Ms: number | null;
}

interface Tracked {
  readonly stats: IoStats;
  /** The counters at the last sample: ops and bytes by class, then the histogram (all classes). */
  readonly last: Float64Array;
}

const LAST_LEN = 4 + 3 * IO_LATENCY_BUCKETS;

/**
 * The latency `q` quantile (0..1) of a log2 histogram `h` of `n` counts, in milliseconds,
 * interpolated inside its bucket (bucket k spans [2^(k-1), 2^k) µs).
 */
export function histogramQuantileMs(h: ArrayLike<number>, n: number, q: number): number | null {
  if (n <= 0) return null;
  const rank = q * n;
  let seen = 0;
  for (let b = 0; b < h.length; b++) {
    const c = h[b] as number;
    if (c > 0 && seen + c >= rank) {
      const lo = b === 0 ? 0 : 2 ** (b - 1);
      const hi = 2 ** b;
      return (lo + ((hi - lo) * (rank - seen)) / c) / 1000;
    }
    seen += c;
  }
  return 2 ** (h.length - 1) / 1000;
}

/**
 * The daemon's I/O accounting when `--http` is on: device counters (`BlockDev.enableStats`)
 * and one {@link IoStats} per NBD export, with one-second samples for the live charts. When
 * off, nothing is counted and every method is a no-op.
 */
export class DaemonIoStats {
  readonly enabled: boolean;
  readonly devices = new Map<string, BlockDev>();
  readonly exports = new Map<string, { readonly device: string; readonly stats: IoStats }>();
  private readonly tracked = new Map<string, Tracked>();
  private lastSampleAt = 0;

  constructor(enabled: boolean) {
    this.enabled = enabled;
  }

  /** Counts I/O of `dev` from now on (no-op when off). */
  trackDevice(dev: BlockDev): void {
    if (!this.enabled) return;
    dev.enableStats();
    this.devices.set(dev.name, dev);
  }

  /**
   * The `stats` part of an NBD export's config for export `name` of `dev` (`{}` when off);
   * also counts the device. Spread it into `addExport`'s config.
   */
  exportConfig(name: string, dev: BlockDev): { stats?: IoStats } {
    if (!this.enabled) return {};
    this.trackDevice(dev);
    const stats = new IoStats();
    this.exports.set(name, { device: dev.name, stats });
    return { stats };
  }

  /** Forgets an export that was removed (its counters go with it). */
  dropExport(name: string): void {
    this.exports.delete(name);
  }

  /** Forgets a device that went away (a destroyed snapshot's image). */
  dropDevice(name: string): void {
    this.devices.delete(name);
  }

  /**
   * Rates and percentiles since the previous call, per device (`device:NAME`) and export
   * (`export:NAME`). Counters only ever grow, so a sample is a difference of two reads.
   */
  sample(now = performance.now()): Record<string, IoSample> {
    const seconds = this.lastSampleAt === 0 ? 1 : Math.max((now - this.lastSampleAt) / 1000, 1e-3);
    this.lastSampleAt = now;
    const out: Record<string, IoSample> = {};
    const seen = new Set<string>();
    const one = (key: string, stats: IoStats | null): void => {
      if (stats === null) return;
      seen.add(key);
      let t = this.tracked.get(key);
      if (t === undefined || t.stats !== stats) {
        t = { stats, last: new Float64Array(LAST_LEN) };
        this.tracked.set(key, t);
        snapshotInto(stats, t.last);
      }
      const cur = new Float64Array(LAST_LEN);
      snapshotInto(stats, cur);
      const last = t.last;
      const h = new Float64Array(IO_LATENCY_BUCKETS);
      let n = 0;
      for (let c = 0; c < 3; c++) {
        for (let b = 0; b < IO_LATENCY_BUCKETS; b++) {
          const i = 4 + c * IO_LATENCY_BUCKETS + b;
          const d = (cur[i] as number) - (last[i] as number);
          h[b] = (h[b] as number) + d;
          n += d;
        }
      }
      out[key] = {
        readIops: ((cur[0] as number) - (last[0] as number)) / seconds,
        writeIops: ((cur[1] as number) - (last[1] as number)) / seconds,
        readBytesPerSec: ((cur[2] as number) - (last[2] as number)) / seconds,
        writeBytesPerSec: ((cur[3] as number) - (last[3] as number)) / seconds,
        p50Ms: histogramQuantileMs(h, n, 0.5),
        p99Ms: histogramQuantileMs(h, n, 0.99),
      };
      last.set(cur);
    };
    for (const [name, dev] of this.devices) one(`device:${name}`, dev.stats);
    for (const [name, e] of this.exports) one(`export:${name}`, e.stats);
    for (const key of this.tracked.keys()) if (!seen.has(key)) this.tracked.delete(key);
    return out;
  }
}

// Writes count WRITE, DISCARD and WRITE_ZEROES ops but only WRITE's bytes (data that moved).
function snapshotInto(s: IoStats, into: Float64Array): void {
  const ops = s.ops;
  into[0] = ops[ReqOp.READ] as number;
  into[1] = (ops[ReqOp.WRITE] as number) + (ops[ReqOp.DISCARD] as number) + (ops[ReqOp.WRITE_ZEROES] as number);
  into[2] = s.bytes[ReqOp.READ] as number;
  into[3] = s.bytes[ReqOp.WRITE] as number;
  into.set(s.latency, 4);
}
