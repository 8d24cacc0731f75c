import { BlkStatus, createDiskSync, MemoryBackend, ReqOp, type BackendCapabilities, type Bio, type BlockBackend, type CompletionSink } from '@blkfilter/bio';
import { onFilterEvent } from '@blkfilter/registry';
import { afterEach, describe, expect, it } from 'vitest';
import { createSnapshot } from './snapshot.js';
import { cleanup, track } from './test-util.js';

/** A memory disk with a volatile write cache that logs flushes and can fail them. */
class CachedBackend implements BlockBackend {
  readonly description = 'cached memory';
  readonly readOnly = false;
  readonly minIoSize = 512;
  readonly capabilities: BackendCapabilities = { writeCache: true, discard: true, writeZeroes: true };
  readonly log: string[] = [];
  failFlush = false;
  private readonly inner = new MemoryBackend({ sizeBytes: 1 << 20 });
  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  queueBio(bio: Bio, sink: CompletionSink): void {
    if (bio.op !== ReqOp.FLUSH) {
      this.inner.queueBio(bio, sink);
      return;
    }
    this.log.push('flush');
    sink.complete(bio, this.failFlush ? BlkStatus.IOERR : BlkStatus.OK);
  }
  async close(): Promise<void> {}
}

let n = 0;
afterEach(cleanup);

describe('take flushes the devices', () => {
  it('flushes every device while it is frozen, before the take event, so the image is on stable storage', async () => {
    const backends = [new CachedBackend(), new CachedBackend()];
    const disks = backends.map((backend) => createDiskSync({ name: `snflush${process.pid}x${n++}`, backend }));
    const s = track(await createSnapshot({ storage: { kind: 'memory', limitBytes: 1 << 20 }, chunkSize: 64 * 1024 }));
    for (const d of disks) await s.addDevice(d.part0);
    const order: string[] = [];
    for (const b of backends) b.log.length = 0;
    const off = onFilterEvent((e) => {
      if (e.type === 'frozen' || e.type === 'snapshot-taken') order.push(`${e.type}:${backends.map((b) => b.log.length).join('+')}`);
    });
    try {
      await s.take();
    } finally {
      off();
    }
    expect(backends.map((b) => b.log)).toEqual([['flush'], ['flush']]);
    // Both devices were frozen with no flush yet; the take event came after both flushes.
    expect(order).toEqual(['frozen:0+0', 'frozen:0+0', 'snapshot-taken:1+1']);
    await s.destroy();
    for (const d of disks) await d.remove();
  });

  it('fails the take with the flush error and leaves the snapshot untaken', async () => {
    const backend = new CachedBackend();
    const d = createDiskSync({ name: `snflush${process.pid}x${n++}`, backend });
    const s = track(await createSnapshot({ storage: { kind: 'memory', limitBytes: 1 << 20 }, chunkSize: 64 * 1024 }));
    await s.addDevice(d.part0);
    backend.failFlush = true;
    await expect(s.take()).rejects.toThrow(/flushing the write cache of ".*" failed \(EIO/);
    expect(s.info().state).toBe('created');
    expect(s.info().images).toEqual([]);
    await s.destroy();
    await d.remove();
  });
});
