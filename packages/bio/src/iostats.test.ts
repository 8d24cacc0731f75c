import { afterEach, describe, expect, it } from 'vitest';
import { MemoryBackend } from './backends/memory.js';
import { createDiskSync, type Disk } from './device.js';
import { blkdevRead, blkdevWrite } from './io.js';
import { IO_LATENCY_BUCKETS, IoClass, IoStats } from './iostats.js';
import { ReqOp } from './op.js';
import { BlkStatus } from './status.js';

let disk: Disk | null = null;
afterEach(async () => {
  await disk?.remove();
  disk = null;
});

describe('IoStats', () => {
  it('puts a latency in the log2 bucket whose bounds hold it', () => {
    const s = new IoStats();
    const at = (ms: number): number => {
      s.latency.fill(0);
      s.account(ReqOp.READ, 0, 0, ms);
      return s.latency.indexOf(1);
    };
    expect(at(0.0005)).toBe(0); // 0.5 µs: under 1 µs
    expect(at(0.001)).toBe(1); // 1 µs in [1, 2)
    expect(at(0.003)).toBe(2); // 3 µs in [2, 4)
    expect(at(1)).toBe(10); // 1000 µs in [512, 1024)
    expect(at(1e9)).toBe(IO_LATENCY_BUCKETS - 1);
    expect(IoStats.bucketUpperSeconds(10)).toBeCloseTo(1.024e-3);
    s.latency.fill(0);
    s.account(ReqOp.WRITE_ZEROES, 4096, BlkStatus.IOERR, 0.002);
    expect(s.latency[IoClass.WRITE * IO_LATENCY_BUCKETS + 2]).toBe(1);
    expect(s.errors[BlkStatus.IOERR]).toBe(1);
    expect(s.bytes[ReqOp.WRITE_ZEROES]).toBe(0); // failed: no bytes
  });

  it('counts completed bios on the device, off until enabled', async () => {
    disk = createDiskSync({ name: 'iostat0', backend: new MemoryBackend({ sizeBytes: 1 << 20 }) });
    const dev = disk.part0;
    await blkdevWrite(dev, 0, Buffer.alloc(8192, 1));
    expect(dev.stats).toBe(null);
    const s = dev.enableStats();
    expect(dev.enableStats()).toBe(s);
    await blkdevWrite(dev, 4096, Buffer.alloc(4096, 2));
    await blkdevWrite(dev, 8192, Buffer.alloc(12288, 3));
    await blkdevRead(dev, 0, 4096);
    expect(s.ops[ReqOp.WRITE]).toBe(2);
    expect(s.bytes[ReqOp.WRITE]).toBe(16384);
    expect(s.ops[ReqOp.READ]).toBe(1);
    expect(s.bytes[ReqOp.READ]).toBe(4096);
    const timed = s.latency.reduce((a, b) => a + b, 0);
    expect(timed).toBe(3);
  });
});
