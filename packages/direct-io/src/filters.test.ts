import { randomBytes } from 'node:crypto';
import { allocIoBuffer, blkdevRead, blkdevWrite, BlkError, createDiskSync, disableBioDebug, enableBioDebug, MemoryBackend, type Disk } from '@blkfilter/bio';
import { cbtInfo, changedExtents, registerCbtFilter } from '@blkfilter/cbt';
import { attachFilter, detachFilter, listFilters } from '@blkfilter/registry';
import { createSnapshot, type Snapshot } from '@blkfilter/snapshot';
import { afterEach, describe, expect, it } from 'vitest';
import { openDirect } from './direct.js';

// Direct I/O must not bypass the filters: the seed review's first hole, closed.

const MiB = 1 << 20;
let n = 0;
const disks: Disk[] = [];
const snaps: Snapshot[] = [];
function disk(size = 16 * MiB): Disk {
  const d = createDiskSync({ name: `diof${n++}`, backend: new MemoryBackend({ sizeBytes: size }), scanPartitions: false, limits: { maxSectors: 256 } });
  disks.push(d);
  return d;
}
afterEach(async () => {
  disableBioDebug();
  for (const s of snaps.splice(0)) await s.destroy();
  for (const d of disks.splice(0)) {
    for (const f of listFilters(d.part0)) await detachFilter(d.part0, f.name);
    await d.remove();
  }
});

function aligned(data: Buffer): Buffer {
  const b = allocIoBuffer(data.length, 4096);
  data.copy(b);
  return b;
}

describe('direct I/O through the filters', () => {
  it('is recorded by CBT, polled or not', async () => {
    registerCbtFilter();
    const d = disk();
    await attachFilter(d.part0, 'cbt', { options: { stateFile: false, blockSize: 65536 } });
    const s1 = await createSnapshot({ storage: { kind: 'memory', limitBytes: 32 * MiB } });
    snaps.push(s1);
    await s1.addDevice(d.part0);
    await s1.take();
    const base = await cbtInfo(d.part0);
    await s1.destroy();
    const h = await openDirect(d.part0, { poll: true, dsync: true });
    await h.write(aligned(randomBytes(4096)), 3 * 65536 + 8192);
    await h.writev([aligned(randomBytes(65536)), aligned(randomBytes(65536))], 10 * 65536);
    const s2 = await createSnapshot({ storage: { kind: 'memory', limitBytes: 32 * MiB } });
    snaps.push(s2);
    await s2.addDevice(d.part0);
    await s2.take();
    const changed = await changedExtents(d.part0, { since: base.snapNumber, generationId: base.generationId });
    expect(changed.kind).toBe('extents');
    if (changed.kind === 'extents') {
      expect(changed.extents).toEqual([
        { sector: (3 * 65536) / 512, sectors: 128 },
        { sector: (10 * 65536) / 512, sectors: 256 },
      ]);
    }
  });

  it('keeps a snapshot image intact under direct writes', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    const d = disk();
    await blkdevWrite(d.part0, 0, randomBytes(16 * MiB));
    const before = await blkdevRead(d.part0, 0, 16 * MiB);
    const s = await createSnapshot({ storage: { kind: 'memory', limitBytes: 32 * MiB }, chunkSize: 65536 });
    snaps.push(s);
    await s.addDevice(d.part0);
    await s.take();
    const h = await openDirect(d.part0, { poll: true });
    await Promise.all(
      Array.from({ length: 64 }, (_, i) => h.write(aligned(randomBytes(i % 4 === 0 ? 256 * 1024 : 4096)), ((i * 37) % 60) * 256 * 1024 + (i % 3) * 4096)),
    );
    expect(Buffer.compare(await blkdevRead(s.image(d.part0), 0, 16 * MiB), before)).toBe(0);
    expect(Buffer.compare(await blkdevRead(d.part0, 0, 16 * MiB), before)).not.toBe(0);
    tracker.assertAllCompleted();
  });

  it('neither deadlocks nor bypasses a snapshot on a swap device when diff storage runs short', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    const d = disk();
    d.part0.swap = true;
    await blkdevWrite(d.part0, 0, randomBytes(16 * MiB));
    const before = await blkdevRead(d.part0, 0, 16 * MiB);
    // Memory pressure: storage grows in small steps, so swap writes soon find no reserve.
    const s = await createSnapshot({ storage: { kind: 'memory', limitBytes: 32 * MiB, stepBytes: 4 * 65536 }, chunkSize: 65536 });
    snaps.push(s);
    await s.addDevice(d.part0);
    await s.take();
    const h = await openDirect(d.part0, { swap: true });
    let resource = 0;
    const writeRetrying = async (buf: Buffer, off: number): Promise<void> => {
      for (let attempt = 0; ; attempt++) {
        try {
          await h.write(buf, off);
          return;
        } catch (err) {
          // ENOMEM (BlkStatus.RESOURCE) is the retryable answer of the no-I/O path.
          if (!BlkError.isInstance(err) || err.code !== 'ENOMEM' || attempt > 100) throw err;
          resource++;
          await new Promise((r) => setImmediate(r));
        }
      }
    };
    await Promise.all(Array.from({ length: 128 }, (_, i) => writeRetrying(aligned(randomBytes(4096)), (i * 2 + 1) * 65536 - 4096 * (i % 2) - 4096 * 2 * (i % 3 === 0 ? 1 : 0))));
    expect(resource).toBeGreaterThan(0);
    expect(s.info().state).toBe('taken');
    expect(Buffer.compare(await blkdevRead(s.image(d.part0), 0, 16 * MiB), before)).toBe(0);
    tracker.assertAllCompleted();
  });
});
