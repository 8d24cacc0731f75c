import { afterEach, describe, expect, it } from 'vitest';
import { Bio, BioVec, bioEndio, BLK_QC_T_NONE, disableBioDebug, enableBioDebug } from './bio.js';
import { LinearBackend } from './backends/linear.js';
import { MemoryBackend } from './backends/memory.js';
import { createDiskSync, getBlockDevice, type Disk, type DiskOptions } from './device.js';
import { DeviceExistsError, InvalidArgumentError, NoSuchDeviceError } from './errors.js';
import { blkdevRead, blkdevWrite, submitBioWait } from './io.js';
import { ReqFlag, ReqOp } from './op.js';
import { bioPoll } from './queue.js';
import { BlkStatus } from './status.js';
import { bioSplitToLimits, submitBio } from './submit.js';
import { FaultBackend } from './testing.js';

let n = 0;
const disks: Disk[] = [];
function disk(sizeBytes = 1 << 20, options: Partial<DiskOptions> = {}): Disk {
  const d = createDiskSync({ name: `sub${n++}`, backend: new MemoryBackend({ sizeBytes }), ...options });
  disks.push(d);
  return d;
}
afterEach(async () => {
  disableBioDebug();
  for (const d of disks.splice(0).reverse()) await d.remove();
});

/** Submits and returns the status the bio completed with (synchronously, on a memory disk). */
function run(bio: Bio): BlkStatus {
  let status: BlkStatus | undefined;
  bio.endIo = (b) => (status = b.status);
  submitBio(bio);
  if (status === undefined) throw new Error('bio did not complete synchronously');
  return status;
}

describe('submitBio validation', () => {
  it('completes a bio past the end with INVAL and a message that says so', () => {
    const d = disk(1 << 20);
    const bio = Bio.read(d.part0, 2048, Buffer.alloc(512));
    expect(run(bio)).toBe(BlkStatus.INVAL);
    expect(bio.error?.code).toBe('EINVAL');
    expect(bio.error?.message).toBe(`bio sector 2048 + 1 sectors is past the end of "${d.name}" (capacity 2048 sectors)`);
  });

  it('refuses misaligned bios on a 4096-byte device', () => {
    const d = disk(1 << 20, { logicalBlockSize: 4096 });
    expect(run(Bio.read(d.part0, 1, Buffer.alloc(4096)))).toBe(BlkStatus.INVAL);
    expect(run(Bio.read(d.part0, 8, Buffer.alloc(512)))).toBe(BlkStatus.INVAL);
    expect(run(Bio.read(d.part0, 8, Buffer.alloc(4096)))).toBe(BlkStatus.OK);
  });

  it('refuses bios over the queue limits and splits them with bioSplitToLimits', async () => {
    const d = disk(1 << 20, { limits: { maxSectors: 16, maxSegments: 2 } });
    expect(run(Bio.write(d.part0, 0, Buffer.alloc(16 * 512 + 512)))).toBe(BlkStatus.INVAL);
    const vecs = [0, 1, 2].map((i) => new BioVec(Buffer.alloc(512, i + 1)));
    const many = new Bio(ReqOp.WRITE, d.part0, 0, 1536, vecs);
    expect(run(many)).toBe(BlkStatus.INVAL);
    expect(many.error?.message).toMatch(/3 segments .* limit of 2 segments/);

    const data = Buffer.alloc(40 * 512);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    const big = Bio.write(d.part0, 4, data);
    let pieces = 0;
    const done = new Promise<BlkStatus>((resolve) => (big.endIo = (b) => resolve(b.status)));
    for (let s = bioSplitToLimits(big); s !== null; s = bioSplitToLimits(big)) {
      pieces++;
      submitBio(s);
    }
    submitBio(big);
    expect(pieces).toBe(2);
    expect(await done).toBe(BlkStatus.OK);
    expect(Buffer.compare(await blkdevRead(d.part0, 2048, data.length), data)).toBe(0);
  });

  it('refuses writes, discards and write-zeroes to a read-only device, but not reads or flushes', () => {
    const d = disk(1 << 20, { readOnly: true });
    const w = Bio.write(d.part0, 0, Buffer.alloc(512));
    expect(run(w)).toBe(BlkStatus.IOERR);
    expect(w.error?.code).toBe('EROFS');
    expect(run(new Bio(ReqOp.DISCARD, d.part0, 0, 512))).toBe(BlkStatus.IOERR);
    expect(run(new Bio(ReqOp.WRITE_ZEROES, d.part0, 0, 512))).toBe(BlkStatus.IOERR);
    expect(run(Bio.read(d.part0, 0, Buffer.alloc(512)))).toBe(BlkStatus.OK);
    expect(run(new Bio(ReqOp.FLUSH, d.part0, 0, 0))).toBe(BlkStatus.OK);
    d.setReadOnly(false);
    expect(run(Bio.write(d.part0, 0, Buffer.alloc(512)))).toBe(BlkStatus.OK);
  });

  it('refuses sizes that disagree with the segments, data on a flush, unknown ops', () => {
    const d = disk();
    expect(run(new Bio(ReqOp.WRITE, d.part0, 0, 1024, [new BioVec(Buffer.alloc(512))]))).toBe(BlkStatus.INVAL);
    expect(run(new Bio(ReqOp.WRITE, d.part0, 0, 512, [new BioVec(Buffer.alloc(512), 256, 512)]))).toBe(BlkStatus.INVAL);
    expect(run(new Bio(ReqOp.FLUSH, d.part0, 0, 512))).toBe(BlkStatus.INVAL);
    expect(run(new Bio(ReqOp.READ, d.part0, 0, 0))).toBe(BlkStatus.INVAL);
    expect(run(new Bio(ReqOp.DISCARD, d.part0, 0, 512, [new BioVec(Buffer.alloc(512))]))).toBe(BlkStatus.INVAL);
    expect(run(new Bio(42 as ReqOp, d.part0, 0, 512))).toBe(BlkStatus.NOTSUPP);
    expect(run(new Bio(ReqOp.READ, d.part0, 0.5, 512, [new BioVec(Buffer.alloc(512))]))).toBe(BlkStatus.INVAL);
  });

  it('completes bios to a removed disk with OFFLINE', async () => {
    const d = disk();
    await d.remove();
    const bio = Bio.read(d.part0, 0, Buffer.alloc(512));
    expect(run(bio)).toBe(BlkStatus.OFFLINE);
    expect(bio.error?.code).toBe('ENODEV');
    expect(() => getBlockDevice(d.name)).toThrow(NoSuchDeviceError);
  });

  it('waits for in-flight bios before a removal closes the backend', async () => {
    const backend = new FaultBackend(new MemoryBackend({ sizeBytes: 1 << 20 }), { rules: [{ delayMs: 20 }] });
    const d = createDiskSync({ name: `sub${n++}`, backend });
    const inflight = submitBioWait(Bio.write(d.part0, 0, Buffer.alloc(512, 9)));
    const removed = d.remove();
    const late = Bio.read(d.part0, 0, Buffer.alloc(512));
    expect(run(late)).toBe(BlkStatus.OFFLINE);
    await inflight;
    await removed;
    expect(d.inflight).toBe(0);
  });

  it('rejects duplicate names and bad geometry with typed errors', () => {
    const d = disk();
    expect(() => createDiskSync({ name: d.name, backend: new MemoryBackend({ sizeBytes: 4096 }) })).toThrow(DeviceExistsError);
    expect(() => createDiskSync({ name: 'bad name', backend: new MemoryBackend({ sizeBytes: 4096 }) })).toThrow(InvalidArgumentError);
    expect(() =>
      createDiskSync({ name: `sub${n++}`, backend: new MemoryBackend({ sizeBytes: 4096 }), logicalBlockSize: 1024 as 512 }),
    ).toThrow(/512 or 4096/);
    expect(() => createDiskSync({ name: `sub${n++}`, backend: new MemoryBackend({ sizeBytes: 4096 }), limits: { maxSectors: 0 } })).toThrow(
      InvalidArgumentError,
    );
  });
});

describe('flush without a write cache', () => {
  it('completes FLUSH at once and strips FUA/PREFLUSH before the backend', () => {
    const seen: number[] = [];
    const mem = new MemoryBackend({ sizeBytes: 1 << 20 });
    const spy = new FaultBackend(mem);
    const orig = spy.queueBio.bind(spy);
    spy.queueBio = (bio, sink) => {
      seen.push(bio.flags);
      orig(bio, sink);
    };
    const d = createDiskSync({ name: `sub${n++}`, backend: spy });
    disks.push(d);
    expect(run(new Bio(ReqOp.FLUSH, d.part0, 0, 0))).toBe(BlkStatus.OK);
    expect(run(Bio.write(d.part0, 0, Buffer.alloc(512), ReqFlag.FUA | ReqFlag.PREFLUSH | ReqFlag.SYNC))).toBe(BlkStatus.OK);
    expect(seen).toEqual([ReqFlag.SYNC]);
  });
});

describe('queues and polling', () => {
  it('holds a polled completion until someone polls with the cookie', () => {
    const d = disk(1 << 20, { queues: { interrupt: 2, poll: 2 } });
    const bio = Bio.write(d.part0, 0, Buffer.alloc(512, 5), ReqFlag.POLLED);
    let done = 0;
    bio.endIo = () => done++;
    submitBio(bio);
    expect(bio.cookie).toBeGreaterThanOrEqual(2);
    expect(d.queues[bio.cookie]?.polled).toBe(true);
    expect(done).toBe(0);
    expect(d.queues[bio.cookie]?.pending).toBe(1);
    expect(bioPoll(bio)).toBe(1);
    expect(done).toBe(1);
    expect(bioPoll(bio)).toBe(0);
  });

  it('completes POLLED bios by interrupt when the disk has no poll queue', () => {
    const d = disk(1 << 20, { queues: { poll: 0 } });
    const bio = Bio.read(d.part0, 0, Buffer.alloc(512), ReqFlag.POLLED);
    expect(run(bio)).toBe(BlkStatus.OK);
    expect(bio.cookie).toBe(BLK_QC_T_NONE);
    expect(bio.flags & ReqFlag.POLLED).toBe(0);
  });

  it('completes a split polled bio by interrupt: no completion is stranded on a ring', async () => {
    const d = disk(1 << 20, { limits: { maxSectors: 8 } });
    const data = Buffer.alloc(8192, 3);
    const bio = Bio.write(d.part0, 0, data, ReqFlag.POLLED);
    const done = new Promise<BlkStatus>((resolve) => (bio.endIo = (b) => resolve(b.status)));
    for (let s = bioSplitToLimits(bio); s !== null; s = bioSplitToLimits(bio)) submitBio(s);
    submitBio(bio);
    expect(await done).toBe(BlkStatus.OK);
    for (const q of d.queues) expect(q.pending).toBe(0);
  });
});

describe('iterative submission', () => {
  it('survives a 10,000-deep stack of remapping devices, both ways', async () => {
    enableBioDebug({ captureStacks: false });
    const bottom = disk(32 << 20);
    let top = bottom;
    const stack: Disk[] = [];
    for (let i = 0; i < 10_000; i++) {
      top = createDiskSync({ name: `lin${n}-${i}`, backend: new LinearBackend(top.part0, { startSect: i % 2 === 0 ? 0 : 8 }) });
      stack.push(top);
    }
    const data = Buffer.alloc(4096, 0xab);
    await blkdevWrite(top.part0, 0, data);
    // 5,000 of the layers shift by 8 sectors.
    expect(Buffer.compare(await blkdevRead(bottom.part0, 5000 * 8 * 512, 4096), data)).toBe(0);
    expect(Buffer.compare(await blkdevRead(top.part0, 0, 4096), data)).toBe(0);
    for (const d of stack.reverse()) await d.remove();
  });

  it('queues bios submitted from end-io and runs them after the current one', () => {
    const d = disk();
    const order: string[] = [];
    const first = Bio.write(d.part0, 0, Buffer.alloc(512, 1));
    first.endIo = () => {
      order.push('first done');
      const second = Bio.read(d.part0, 0, Buffer.alloc(512));
      second.endIo = (b) => order.push(`second done ${b.vecs[0]?.buffer[0]}`);
      submitBio(second);
      order.push('second submitted');
    };
    submitBio(first);
    expect(order).toEqual(['first done', 'second submitted', 'second done 1']);
  });
});

describe('filter hook', () => {
  it('lets a hook take a bio and complete it later, or pass it on', async () => {
    const d = disk();
    const taken: Bio[] = [];
    d.part0.filter = {
      submitBio(bio) {
        if (bio.op !== ReqOp.WRITE || bio.filterDepth > 0) return false;
        taken.push(bio);
        return true;
      },
    };
    const w = Bio.write(d.part0, 0, Buffer.alloc(512, 7));
    const done = submitBioWait(w);
    expect(taken).toEqual([w]);
    expect(d.part0.inflight).toBe(1); // held by the filter: still in flight on the device
    // Resubmit from "later", marked as already seen by this filter.
    setImmediate(() => {
      w.filterDepth = 1;
      submitBio(w);
    });
    await done;
    expect(d.part0.inflight).toBe(0);
    expect((await blkdevRead(d.part0, 0, 512))[0]).toBe(7);
  });

  it('shows a partition filter and then the disk filter each partition bio', async () => {
    const d = disk(1 << 20);
    // Fake a partition table: partitions are normally read from the disk.
    const { BlockDev } = await import('./device.js');
    const part = new BlockDev(d, 1, `${d.name}p1`, 64, 128, null);
    const seen: string[] = [];
    part.filter = { submitBio: (b) => (seen.push(`part ${b.bdev.name} ${b.sector}`), false) };
    d.part0.filter = { submitBio: (b) => (seen.push(`disk ${b.bdev.name} ${b.sector}`), false) };
    expect(run(Bio.write(part, 8, Buffer.alloc(512, 1)))).toBe(BlkStatus.OK);
    expect(seen).toEqual([`part ${part.name} 8`, `disk ${d.name} 72`]);
    expect([part.inflight, d.part0.inflight]).toEqual([0, 0]);
    const held: Bio[] = [];
    d.part0.filter = { submitBio: (b) => (held.push(b), true) };
    submitBio(Bio.write(part, 0, Buffer.alloc(512)));
    expect([part.inflight, d.part0.inflight]).toEqual([1, 1]);
    bioEndio(held[0] as Bio);
    expect([part.inflight, d.part0.inflight]).toEqual([0, 0]);
    expect(run(Bio.write(part, 128, Buffer.alloc(512)))).toBe(BlkStatus.INVAL);
  });
});

describe('debug tracker', () => {
  it('counts every bio and finds the ones never completed', () => {
    const tracker = enableBioDebug();
    const d = disk();
    const held: Bio[] = [];
    d.part0.filter = { submitBio: (b) => (held.push(b), true) };
    submitBio(Bio.read(d.part0, 0, Buffer.alloc(512)));
    expect(tracker.inFlight).toBe(1);
    expect(() => tracker.assertAllCompleted()).toThrow(/never completed: READ 512 bytes at sector 0/);
    bioEndio(held[0] as Bio);
    expect(() => tracker.assertAllCompleted()).not.toThrow();
    expect([tracker.submitted, tracker.completed]).toEqual([1, 1]);
  });
});

describe('validate once', () => {
  it('checks a bio once per device: a filter resubmitting to the same device is trusted, a remap to another device is checked there', () => {
    const a = disk(1 << 20);
    const b = disk(1 << 20);
    const held: Bio[] = [];
    a.part0.filter = {
      submitBio(bio) {
        if (bio.filterDepth > 0) return false;
        held.push(bio);
        return true;
      },
    };
    const w = Bio.write(a.part0, 0, Buffer.alloc(512, 3));
    let status: BlkStatus | undefined;
    w.endIo = (x) => (status = x.status);
    submitBio(w);
    expect(held).toEqual([w]);
    // The device turned read-only while the filter held the bio: a bio admitted before that is
    // not refused on its way down (as in the kernel, checks happen once, at submission).
    a.setReadOnly(true);
    w.filterDepth = 1;
    submitBio(w);
    expect(status).toBe(BlkStatus.OK);
    // Aimed at another device, a bio is validated against that device.
    b.setReadOnly(true);
    const r = Bio.write(a.part0, 0, Buffer.alloc(512, 4));
    r.endIo = (x) => (status = x.status);
    a.setReadOnly(false);
    a.part0.filter = {
      submitBio(bio) {
        if (bio.bdev !== a.part0) return false;
        bio.bdev = b.part0;
        submitBio(bio);
        return true;
      },
    };
    submitBio(r);
    expect(status).toBe(BlkStatus.IOERR);
    expect(r.error?.code).toBe('EROFS');
  });
});
