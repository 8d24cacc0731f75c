import { bioEndio, BLK_QC_T_NONE, type Bio, type CompletionSink } from './bio.js';
import type { Disk } from './device.js';
import { BlkStatus } from './status.js';

/**
 * A hardware queue of a disk (the kernel's `blk_mq_hw_ctx`). An interrupt queue completes each
 * bio as soon as the backend does; a poll queue holds completions in a ring until someone polls
 * it with the cookie that dispatch wrote on the bio ({@link bioPoll}).
 */
export class HwQueue implements CompletionSink {
  readonly disk: Disk;
  /** Position in `disk.queues`: the cookie of bios dispatched here when polled. */
  readonly index: number;
  /** True for a poll queue. */
  readonly polled: boolean;
  /** Bios dispatched to the backend through this queue. */
  dispatched = 0;
  /** Bios the backend completed through this queue. */
  completedCount = 0;
  private readonly ring: Bio[] = [];
  private ringHead = 0;

  constructor(disk: Disk, index: number, polled: boolean) {
    this.disk = disk;
    this.index = index;
    this.polled = polled;
  }

  /** Takes the backend's completion: an interrupt queue ends the bio now, a poll queue rings it. */
  complete(bio: Bio, status: BlkStatus): void {
    this.completedCount++;
    this.disk.endInflight();
    if (status !== BlkStatus.OK && bio.status === BlkStatus.OK) bio.status = status;
    if (this.polled) this.ring.push(bio);
    else bioEndio(bio);
  }

  /** Completions waiting on the ring. */
  get pending(): number {
    return this.ring.length - this.ringHead;
  }

  /**
   * Reaps up to `max` completions from the ring (the kernel's `blk_mq_poll`), running their
   * end-io. Returns how many were reaped. On an interrupt queue, returns 0.
   */
  poll(max = Infinity): number {
    let n = 0;
    while (this.ringHead < this.ring.length && n < max) {
      const bio = this.ring[this.ringHead++] as Bio;
      n++;
      bioEndio(bio);
    }
    if (this.ringHead === this.ring.length) {
      this.ring.length = 0;
      this.ringHead = 0;
    }
    return n;
  }
}

/**
 * Polls the queue that `bio` was dispatched to (the kernel's `bio_poll`). Returns the number
 * of completions reaped (`bio`'s among them, if its backend has finished). Returns 0 when the
 * bio has no cookie: it was not polled, or it was split, cloned, deferred or remapped, and
 * completes by interrupt; the caller then just waits for its end-io.
 */
export function bioPoll(bio: Bio, max = Infinity): number {
  const cookie = bio.cookie;
  if (cookie === BLK_QC_T_NONE) return 0;
  return blkPoll(bio.bdev.disk, cookie, max);
}

/** Polls queue number `cookie` of `disk`; 0 for a cookie that names no poll queue. */
export function blkPoll(disk: Disk, cookie: number, max = Infinity): number {
  const q = disk.queues[cookie];
  if (q === undefined || !q.polled) return 0;
  return q.poll(max);
}
