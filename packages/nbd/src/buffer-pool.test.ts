import { isIoBufferAligned } from '@blkfilter/bio';
import { describe, expect, it } from 'vitest';
import { getPayloadBuffer, lentPayloadBuffers, pooledPayloadBytes, putPayloadBuffer } from './buffer-pool.js';

describe('payload buffer pool', () => {
  it('holds at most 64 MiB, however many buffers come back', () => {
    const before = pooledPayloadBytes();
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

  it('hands out page-aligned buffers, so O_DIRECT needs no bounce', () => {
    for (const size of [1, 4096, 5000, 1 << 20, (32 << 20) + 1]) {
      const b = getPayloadBuffer(size);
      expect(b.length).toBeGreaterThanOrEqual(size);
      // True only for buffers made by allocIoBuffer (false as well where its addon did not build).
      expect(isIoBufferAligned(b, 0, 4096, 4096)).toBe(true);
      putPayloadBuffer(b);
    }
  });
});
