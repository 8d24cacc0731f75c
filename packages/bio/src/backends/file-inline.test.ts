import { describe, expect, it } from 'vitest';
import { INLINE_BACKOFF_MAX_MS, INLINE_BACKOFF_MS, INLINE_READ_MAX, INLINE_TURN_BYTES, InlineReads, type InlineCompletion } from './file-inline.js';

// The inline-read heuristic on a clock the test turns by hand: no read is really timed, so the
// outcome never depends on how busy the machine is.

const SLOW = 1; // ms: a disk read
const FAST = 0.001; // ms: a page-cache hit

function setup(allowed = true) {
  const clock = { t: 1000 };
  const counters = { inlineReads: 0, inlineMisses: 0, inlineWrites: 0, inlineWriteMisses: 0 };
  const inline = new InlineReads<InlineCompletion>(allowed, () => clock.t, counters);
  const completed: number[] = [];
  let n = 0;
  const read = (ms: number, bytes = 4096): void => {
    const id = n++;
    inline.done({ completeInline: () => completed.push(id) }, bytes, ms);
  };
  return { clock, counters, inline, completed, read };
}

describe('InlineReads', () => {
  it('pauses after two slow reads in a row, not after one', () => {
    const { clock, counters, inline, read } = setup();
    read(SLOW);
    read(FAST); // the streak is broken
    read(SLOW);
    expect(counters.inlineMisses).toBe(0);
    expect(inline.mayRead(4096)).toBe(true);
    read(SLOW);
    expect(counters.inlineMisses).toBe(1);
    expect(inline.mayRead(4096)).toBe(false);
    clock.t += INLINE_BACKOFF_MS - 0.01;
    expect(inline.mayRead(4096)).toBe(false);
    clock.t += 0.02;
    expect(inline.mayRead(4096)).toBe(true);
  });

  it('doubles the pause on each miss up to the maximum, and a fast probe resets it', () => {
    const { clock, inline, read } = setup();
    read(SLOW);
    read(SLOW);
    let pause = INLINE_BACKOFF_MS;
    for (let i = 0; i < 8; i++) {
      clock.t += pause - 0.01;
      expect(inline.mayRead(4096)).toBe(false);
      clock.t += 0.01;
      expect(inline.mayRead(4096)).toBe(true);
      read(SLOW); // the probe misses: the next pause is twice as long
      pause = Math.min(pause * 2, INLINE_BACKOFF_MAX_MS);
    }
    expect(pause).toBe(INLINE_BACKOFF_MAX_MS);
    clock.t += pause;
    expect(inline.mayRead(4096)).toBe(true);
    read(FAST); // a hit: back to the first pause length on the next two misses
    read(SLOW);
    read(SLOW);
    clock.t += INLINE_BACKOFF_MS;
    expect(inline.mayRead(4096)).toBe(true);
  });

  it('reads at most INLINE_READ_MAX per read and INLINE_TURN_BYTES per turn; completes once the callback returns', async () => {
    const { inline, completed, read } = setup();
    expect(inline.mayRead(INLINE_READ_MAX)).toBe(true);
    expect(inline.mayRead(INLINE_READ_MAX + 512)).toBe(false);
    for (let b = 0; b < INLINE_TURN_BYTES; b += INLINE_READ_MAX) read(FAST, INLINE_READ_MAX);
    expect(inline.mayRead(512)).toBe(false);
    // Never while the reads are being issued (inside queueBio)...
    expect(completed).toEqual([]);
    // ...but before the next event-loop turn: a microtask after the current callback.
    await Promise.resolve();
    expect(completed).toHaveLength(INLINE_TURN_BYTES / INLINE_READ_MAX);
    // The budget is the turn's, not the drain's: reads the completions lead to wait for the next
    // turn (or go to the threadpool), so inline reads cannot keep the loop from polling I/O.
    expect(inline.mayRead(512)).toBe(false);
    await new Promise((r) => setImmediate(r));
    expect(inline.mayRead(INLINE_READ_MAX)).toBe(true);
  });

  it('never reads inline when not allowed (O_DIRECT, or inlineReads: false)', () => {
    expect(setup(false).inline.mayRead(512)).toBe(false);
  });
});
