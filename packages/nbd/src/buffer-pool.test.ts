import { isIoBufferAligned } from '@blkfilter/bio';
import { describe, expect, it } from 'vitest';
import { getPayloadBuffer, lentPayloadBuffers, poolLimit, pooledPayloadBytes, putPayloadBuffer, raisePoolLimit, trimPayloadPool } from './buffer-pool.js';

describe('payload buffer pool', () => {
  it('holds at most its bound (64 MiB by default), however many buffers come back', () => {
    const before = pooledPayloadBytes();
    expect(poolLimit()).toBe(64 << 20);
    const bufs = Array.from({ length: 40 }, () => getPayloadBuffer(4 << 20));
    expect(lentPayloadBuffers()).toBe(40);
    for (const b of bufs) putPayloadBuffer(b);
    expect(lentPayloadBuffers()).toBe(0);
    // 160 MiB were given back: the pool kept 64 MiB of them (16 buffers) and let the rest go.
    expect(pooledPayloadBytes()).toBe(Math.max(before, 64 << 20));
    // Taken again, a pooled buffer is the same memory, not a new allocation.
    const again = getPayloadBuffer(3 << 20);
    expect(bufs.includes(again)).toBe(true);
    putPayloadBuffer(again);
  });

  it('gives back buffers that sat unused for a whole trim interval, and keeps those in use', () => {
    trimPayloadPool();
    trimPayloadPool(); // whatever earlier tests left is gone now
    expect(pooledPayloadBytes()).toBe(0);
    const bufs = Array.from({ length: 4 }, () => getPayloadBuffer(1 << 20));
    for (const b of bufs) putPayloadBuffer(b);
    expect(pooledPayloadBytes()).toBe(4 << 20);
    // Returned after the last look: they get one interval of grace.
    expect(trimPayloadPool()).toBe(0);
    // In the next interval two are taken and given back (the low-water mark is 2): two were never needed.
    const a = getPayloadBuffer(1 << 20);
    const b = getPayloadBuffer(1 << 20);
    putPayloadBuffer(a);
    putPayloadBuffer(b);
    expect(trimPayloadPool()).toBe(2 << 20);
    expect(pooledPayloadBytes()).toBe(2 << 20);
    // The ones kept are the most recently used.
    const again = getPayloadBuffer(1 << 20);
    expect(again === a || again === b).toBe(true);
    putPayloadBuffer(again);
    // Only one was needed in that interval: the other goes. Then the load goes, and so does the last.
    expect(trimPayloadPool()).toBe(1 << 20);
    expect(trimPayloadPool()).toBe(1 << 20);
    expect(pooledPayloadBytes()).toBe(0);
  });

  it('hands out page-aligned buffers, so O_DIRECT needs no bounce', () => {
    for (const size of [1, 4096, 5000, 1 << 20, (32 << 20) + 1]) {
      const b = getPayloadBuffer(size);
      expect(b.length).toBeGreaterThanOrEqual(size);
      // True only for buffers made by allocIoBuffer (false as well where its addon did not build).
      expect(isIoBufferAligned(b, 0, 4096, 4096)).toBe(true);
      putPayloadBuffer(b);
    }
  });

  it('holds as much as the largest server may have in flight, so swings at its cap do not churn', async () => {
    const { createNbdServer } = await import('./server.js');
    createNbdServer({ maxBufferedBytes: 100 << 20 });
    expect(poolLimit()).toBe(100 << 20);
    // A smaller server never lowers it.
    raisePoolLimit(40 << 20);
    expect(poolLimit()).toBe(100 << 20);
    trimPayloadPool();
    trimPayloadPool();
    const bufs = Array.from({ length: 25 }, () => getPayloadBuffer(4 << 20));
    for (const b of bufs) putPayloadBuffer(b);
    expect(pooledPayloadBytes()).toBe(100 << 20);
    trimPayloadPool();
    trimPayloadPool();
    expect(pooledPayloadBytes()).toBe(0);
  });
});
