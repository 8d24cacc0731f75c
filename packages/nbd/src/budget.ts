/** A connection waiting for room in the server's {@link BufferBudget}. */
export interface BudgetWaiter {
  /** There may be room now: parse what is buffered and resume reading if it fits. */
  budgetWake(): void;
}

/**
 * The server-wide cap on bytes held for requests: payload buffers (WRITE data arriving or
 * being written, READ data being read or waiting for a slow client to take it) and reply
 * batches. The per-connection limits bound one client; this bounds them all together, so many
 * clients that send large READs and never read the replies (or die in the middle of a WRITE)
 * cannot make the server hold more than `limit` bytes.
 *
 * A connection asks {@link BufferBudget.fits} before it parses a request. When the request
 * does not fit it stops reading its socket and waits here; bytes given back wake the waiters
 * (from a `setImmediate`, once per wake, not once per request). The last `reserve` bytes are
 * kept for connections with nothing in flight, so a well-behaved client's small requests are
 * still served while bulk clients hold the rest.
 */
export class BufferBudget {
  readonly limit: number;
  readonly reserve: number;
  /** Bytes held now. */
  used = 0;
  /** Most bytes ever held at once. */
  peak = 0;
  private waiters: BudgetWaiter[] = [];
  private spare: BudgetWaiter[] = [];
  private wakeScheduled = false;
  private readonly onWake = (): void => this.wake();

  constructor(limit: number, reserve: number) {
    this.limit = limit;
    this.reserve = reserve;
  }

  /**
   * True when a request that will hold `bytes` may start now: within the shared part of the
   * budget, or within the reserve too when it is small (at most the reserve) and its connection
   * has nothing in flight: bulk requests cannot eat the reserve, one small request per idle
   * connection at a time can.
   */
  fits(bytes: number, idle: boolean): boolean {
    const after = this.used + bytes;
    return after <= this.limit - this.reserve || (idle && bytes <= this.reserve && after <= this.limit);
  }

  take(bytes: number): void {
    const used = this.used + bytes;
    this.used = used;
    if (used > this.peak) this.peak = used;
  }

  give(bytes: number): void {
    this.used -= bytes;
    if (this.waiters.length > 0 && !this.wakeScheduled) {
      this.wakeScheduled = true;
      setImmediate(this.onWake);
    }
  }

  /** Queues `w` to be woken once bytes come back (a waiter is queued at most once). */
  wait(w: BudgetWaiter): void {
    if (!this.waiters.includes(w)) this.waiters.push(w);
  }

  /** Forgets `w` (its connection closed). */
  forget(w: BudgetWaiter): void {
    const i = this.waiters.indexOf(w);
    if (i >= 0) this.waiters.splice(i, 1);
  }

  /** Connections waiting for room. */
  get waiting(): number {
    return this.waiters.length;
  }

  private wake(): void {
    this.wakeScheduled = false;
    // In arrival order; one that still does not fit queues itself again.
    const list = this.waiters;
    this.waiters = this.spare;
    this.spare = list;
    for (let i = 0; i < list.length; i++) (list[i] as BudgetWaiter).budgetWake();
    list.length = 0;
  }
}
