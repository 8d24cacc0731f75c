import { afterEach, describe, expect, it } from 'vitest';
import { Bio } from '../bio.js';
import { createDiskSync, type Disk } from '../device.js';
import { BioIoError, InvalidArgumentError } from '../errors.js';
import { blkdevDiscard, blkdevRead, blkdevWrite, blkdevZeroout, submitBioWait } from '../io.js';
import { BlkStatus } from '../status.js';
import { MemoryBackend } from './memory.js';

const TiB = 1024 ** 4;
let n = 0;
const disks: Disk[] = [];
function disk(backend: MemoryBackend): Disk {
  const d = createDiskSync({ name: `mem${n++}`, backend });
  disks.push(d);
  return d;
}
afterEach(async () => {
  for (const d of disks.splice(0)) await d.remove();
});

describe('MemoryBackend', () => {
  it('keeps a 1 TiB device with 1 MiB written in about 1 MiB', async () => {
    const backend = new MemoryBackend({ sizeBytes: TiB });
    const d = disk(backend);
    const before = process.memoryUsage().arrayBuffers;
    const data = Buffer.alloc(1 << 20, 0x11);
    await blkdevWrite(d.part0, TiB - (1 << 20), data); // the last MiB: offsets past 2^32
    await blkdevWrite(d.part0, 0, data.subarray(0, 4096));
    expect(backend.allocatedBytes).toBe((1 << 20) + 4096);
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(4 << 20);
    expect(Buffer.compare(await blkdevRead(d.part0, TiB - (1 << 20), 1 << 20), data)).toBe(0);
    expect((await blkdevRead(d.part0, TiB / 2, 4096)).every((b) => b === 0)).toBe(true);
    // Discarding the whole device frees every page (that it walks the allocated pages, not 2^28
    // page numbers, is timed by npm run bench: bench-memory.ts).
    await blkdevDiscard(d.part0, 0, TiB);
    expect(backend.allocatedBytes).toBe(0);
  });

  it('zeroes partial pages and frees whole ones on discard and write-zeroes', async () => {
    const backend = new MemoryBackend({ sizeBytes: 1 << 20, pageSize: 4096 });
    const d = disk(backend);
    await blkdevWrite(d.part0, 0, Buffer.alloc(16384, 0xff));
    await blkdevDiscard(d.part0, 3072, 2048); // tail of page 0, head of page 1
    await blkdevZeroout(d.part0, 8192, 4096); // all of page 2
    const back = await blkdevRead(d.part0, 0, 16384);
    const expected = Buffer.alloc(16384, 0xff);
    expected.fill(0, 3072, 5120);
    expected.fill(0, 8192, 12288);
    expect(Buffer.compare(back, expected)).toBe(0);
    expect(backend.allocatedBytes).toBe(3 * 4096);
  });

  it('completes writes past its limit with NOSPC and keeps what fit', async () => {
    const backend = new MemoryBackend({ sizeBytes: 1 << 20, limitBytes: 8192 });
    const d = disk(backend);
    await blkdevWrite(d.part0, 0, Buffer.alloc(8192, 1));
    const bio = Bio.write(d.part0, 64, Buffer.alloc(4096, 2));
    const err = await submitBioWait(bio).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BioIoError);
    expect((err as BioIoError).code).toBe('ENOSPC');
    expect(bio.status).toBe(BlkStatus.NOSPC);
    expect((await blkdevRead(d.part0, 0, 8192)).every((b) => b === 1)).toBe(true);
    // Overwriting allocated pages still works at the limit.
    await blkdevWrite(d.part0, 0, Buffer.alloc(4096, 3));
  });

  it('rejects bad options with typed errors', () => {
    expect(() => new MemoryBackend({ sizeBytes: 1000 })).toThrow(InvalidArgumentError);
    expect(() => new MemoryBackend({ sizeBytes: 4096, pageSize: 3000 })).toThrow(/power of two/);
  });
});

describe('MemoryBackend WRITE_ZEROES with NOUNMAP', () => {
  it('keeps the range allocated (reported as data) and reads zeros', async () => {
    const backend = new MemoryBackend({ sizeBytes: 1 << 20, pageSize: 4096 });
    const d = createDiskSync({ name: `mem-nounmap${n++}`, backend });
    disks.push(d);
    await blkdevWrite(d.part0, 0, Buffer.alloc(4096, 9));
    await blkdevZeroout(d.part0, 0, 16384, { noUnmap: true });
    expect(backend.allocatedBytes).toBe(16384);
    expect((await blkdevRead(d.part0, 0, 16384)).every((b) => b === 0)).toBe(true);
    expect(backend.blockStatus?.(0, 16384)).toEqual([{ length: 16384, hole: false }]);
    await blkdevZeroout(d.part0, 0, 16384);
    expect(backend.allocatedBytes).toBe(0);
  });
});
