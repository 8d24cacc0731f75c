import { afterEach, describe, expect, it } from 'vitest';
import {
  Bio,
  copyFromBioVecs,
  copyToBioVecs,
  zeroBioVecs,
  bioChain,
  bioClone,
  bioEndio,
  bioSplit,
  BioVec,
  BLK_QC_T_NONE,
  disableBioDebug,
  enableBioDebug,
} from './bio.js';
import { createDiskSync, type Disk } from './device.js';
import { BioCompletedTwiceError, BlkError, InvalidArgumentError } from './errors.js';
import { MemoryBackend } from './backends/memory.js';
import { ReqFlag, ReqOp } from './op.js';
import { BlkStatus, blkStatusName, blkStatusToErrno, isRetryable } from './status.js';

let n = 0;
const disks: Disk[] = [];
function disk(): Disk {
  const d = createDiskSync({ name: `biot${n++}`, backend: new MemoryBackend({ sizeBytes: 1 << 20 }) });
  disks.push(d);
  return d;
}
afterEach(async () => {
  disableBioDebug();
  for (const d of disks.splice(0)) await d.remove();
});

describe('BlkStatus', () => {
  it('names every status with its errno', () => {
    expect(blkStatusName(BlkStatus.IOERR)).toBe('IOERR');
    expect(blkStatusToErrno(BlkStatus.IOERR)).toBe('EIO');
    expect(blkStatusToErrno(BlkStatus.NOSPC)).toBe('ENOSPC');
    expect(blkStatusToErrno(BlkStatus.AGAIN)).toBe('EAGAIN');
    expect(blkStatusToErrno(BlkStatus.NOTSUPP)).toBe('EOPNOTSUPP');
    expect(blkStatusToErrno(BlkStatus.TIMEOUT)).toBe('ETIMEDOUT');
    expect(blkStatusToErrno(BlkStatus.RESOURCE)).toBe('ENOMEM');
    expect(blkStatusToErrno(BlkStatus.OFFLINE)).toBe('ENODEV');
    expect(blkStatusName(999)).toBe('UNKNOWN');
    expect(isRetryable(BlkStatus.AGAIN)).toBe(true);
    expect(isRetryable(BlkStatus.IOERR)).toBe(false);
  });

  it('puts the direction of an op in its low bit', () => {
    expect(ReqOp.WRITE & 1).toBe(1);
    expect(ReqOp.DISCARD & 1).toBe(1);
    expect(ReqOp.WRITE_ZEROES & 1).toBe(1);
    expect(ReqOp.READ & 1).toBe(0);
    expect(ReqOp.FLUSH & 1).toBe(0);
  });
});

describe('completion', () => {
  it('runs end-io once and refuses a second completion loudly', () => {
    const d = disk();
    const bio = Bio.read(d.part0, 0, Buffer.alloc(512));
    let calls = 0;
    bio.endIo = () => calls++;
    bioEndio(bio, BlkStatus.IOERR);
    expect(calls).toBe(1);
    expect(bio.status).toBe(BlkStatus.IOERR);
    expect(() => bioEndio(bio)).toThrow(BioCompletedTwiceError);
    expect(calls).toBe(1);
  });

  it('in debug mode names where the first completion happened', () => {
    enableBioDebug();
    const d = disk();
    const bio = Bio.read(d.part0, 0, Buffer.alloc(512));
    bioEndio(bio);
    try {
      bioEndio(bio);
      expect.unreachable();
    } catch (err) {
      expect(BlkError.isInstance(err)).toBe(true);
      expect((err as Error).message).toMatch(/first completion/);
    }
  });

  it('completes a parent after all chained children, first error wins', () => {
    const d = disk();
    const parent = Bio.read(d.part0, 0, Buffer.alloc(512));
    const done: BlkStatus[] = [];
    parent.endIo = (b) => done.push(b.status);
    const kids = [0, 1, 2].map(() => Bio.read(d.part0, 0, Buffer.alloc(512)));
    for (const k of kids) bioChain(k, parent);
    bioEndio(parent);
    expect(done).toEqual([]);
    bioEndio(kids[1] as Bio, BlkStatus.NOSPC);
    bioEndio(kids[0] as Bio, BlkStatus.IOERR);
    expect(done).toEqual([]);
    bioEndio(kids[2] as Bio);
    expect(done).toEqual([BlkStatus.NOSPC]);
  });

  it('completes a chain of 100,000 bios without recursion', () => {
    const d = disk();
    const root = Bio.read(d.part0, 0, Buffer.alloc(512));
    let calls = 0;
    root.endIo = () => calls++;
    let parent = root;
    const all: Bio[] = [];
    for (let i = 0; i < 100_000; i++) {
      const child = Bio.read(d.part0, 0, Buffer.alloc(0));
      bioChain(child, parent);
      all.push(parent);
      parent = child;
    }
    for (const b of all) bioEndio(b); // each drops its own reference
    expect(calls).toBe(0);
    bioEndio(parent); // the leaf completes the whole chain
    expect(calls).toBe(1);
  });

  it('rethrows an end-io exception outside the block layer, after bookkeeping', async () => {
    const d = disk();
    const bio = Bio.read(d.part0, 0, Buffer.alloc(512));
    bio.endIo = () => {
      throw new Error('user bug');
    };
    const seen = new Promise<unknown>((resolve) => {
      const listeners = process.listeners('uncaughtException');
      process.removeAllListeners('uncaughtException');
      process.once('uncaughtException', (e) => {
        for (const l of listeners) process.on('uncaughtException', l);
        resolve(e);
      });
    });
    bioEndio(bio);
    expect(bio.completed).toBe(true);
    expect(((await seen) as Error).message).toBe('user bug');
  });
});

describe('split and clone', () => {
  it('splits data segments at any byte and shares the buffers', () => {
    const d = disk();
    const a = Buffer.alloc(1024, 1);
    const b = Buffer.alloc(2048, 2);
    const bio = new Bio(ReqOp.WRITE, d.part0, 10, 3072, [new BioVec(a), new BioVec(b)]);
    bio.flags = ReqFlag.POLLED | ReqFlag.FUA;
    bio.cookie = 3;
    const split = bioSplit(bio, 3);
    expect(split.sector).toBe(10);
    expect(split.size).toBe(1536);
    expect(split.vecs.map((v) => [v.buffer === a || v.buffer === b, v.offset, v.length])).toEqual([
      [true, 0, 1024],
      [true, 0, 512],
    ]);
    expect(bio.sector).toBe(13);
    expect(bio.size).toBe(1536);
    expect(bio.vecs.map((v) => [v.offset, v.length])).toEqual([[512, 1536]]);
    expect(split.flags & ReqFlag.POLLED).toBe(0);
    expect(bio.flags & ReqFlag.POLLED).toBe(0);
    expect(bio.cookie).toBe(BLK_QC_T_NONE);
    expect(split.flags & ReqFlag.FUA).toBe(ReqFlag.FUA);
    expect(() => bioSplit(bio, 3)).toThrow(InvalidArgumentError);
    expect(() => bioSplit(bio, 0)).toThrow(InvalidArgumentError);
  });

  it('splits a discard without data', () => {
    const d = disk();
    const bio = new Bio(ReqOp.DISCARD, d.part0, 0, 8192);
    const split = bioSplit(bio, 8);
    expect([split.sector, split.size, bio.sector, bio.size]).toEqual([0, 4096, 8, 4096]);
  });

  it('clones without end-io, parent or POLLED', () => {
    const d = disk();
    const bio = Bio.write(d.part0, 8, Buffer.alloc(512), ReqFlag.POLLED | ReqFlag.SYNC);
    bio.endIo = () => {};
    const clone = bioClone(bio);
    expect(clone.endIo).toBeNull();
    expect(clone.flags).toBe(ReqFlag.SYNC);
    expect(clone.vecs).not.toBe(bio.vecs);
    expect(clone.vecs[0]).toBe(bio.vecs[0]);
    expect(() => bioChain(bio, clone)).toThrow(InvalidArgumentError);
  });
});

describe('bio data helpers', () => {
  it('copy into, out of and zero bio data at any position across segments', () => {
    const a = Buffer.alloc(5, 0xaa);
    const b = Buffer.alloc(7, 0xbb);
    const vecs = [new BioVec(a, 1, 3), new BioVec(b, 2, 4)]; // 7 bytes of data
    copyToBioVecs(vecs, 2, Buffer.from([1, 2, 3, 4]), 0, 4);
    expect([...a]).toEqual([0xaa, 0xaa, 0xaa, 1, 0xaa]);
    expect([...b]).toEqual([0xbb, 0xbb, 2, 3, 4, 0xbb, 0xbb]);
    const out = Buffer.alloc(6);
    copyFromBioVecs(vecs, 1, out, 1, 5);
    expect([...out]).toEqual([0, 0xaa, 1, 2, 3, 4]);
    zeroBioVecs(vecs, 3, 3);
    expect([...b]).toEqual([0xbb, 0xbb, 0, 0, 0, 0xbb, 0xbb]);
  });
});
