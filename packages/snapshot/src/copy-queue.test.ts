// The cap on chunk copies in flight (maxConcurrentCopies): a burst of first writes, or one huge
// discard after take, starts at most that many copies; the rest wait in FIFO order, and every
// held bio still completes exactly once, in order per chunk, with the image still exact.
import {
  Bio,
  BioVec,
  blkdevRead,
  BlkStatus,
  disableBioDebug,
  enableBioDebug,
  InvalidArgumentError,
  memallocNoioRestore,
  memallocNoioSave,
  ReqFlag,
  ReqOp,
  SECTOR_SIZE,
  submitBio,
  submitBioWait,
  type Disk,
} from '@blkfilter/bio';
import { afterEach, describe, expect, it } from 'vitest';
import { SnapshotCorruptedError } from './errors.js';
import { createSnapshot, type Snapshot } from './snapshot.js';
import { cleanup, fillDevice, firstDiff, holdDisk, memDisk, rng, stamp, track, type HoldReadsBackend } from './test-util.js';
import type { DiffStorageOptions } from './types.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const CHUNK = 16 * KiB;

afterEach(async () => {
  disableBioDebug();
  await cleanup();
});

/** A taken snapshot of a filled device whose reads are held from now on, and counters of the test's bios. */
interface Held {
  readonly d: Disk;
  readonly backend: HoldReadsBackend;
  readonly before: Buffer;
  readonly s: Snapshot;
  /** Completions of the i-th bio submitted with {@link submitCounted} (a second one is a bug). */
  readonly ends: number[];
  readonly statuses: number[];
}

async function heldSnapshot(chunks: number, storage: DiffStorageOptions, maxConcurrentCopies: number): Promise<Held> {
  const { disk: d, backend } = holdDisk(chunks * CHUNK);
  const before = await fillDevice(d);
  const s = track(await createSnapshot({ storage, chunkSize: CHUNK, maxConcurrentCopies }));
  await s.addDevice(d.name);
  await s.take();
  backend.holding = true;
  return { d, backend, before, s, ends: [], statuses: [] };
}

/** Submits `bio` as the test's i-th, counting its completions. */
function submitCounted(h: Held, bio: Bio, i: number): void {
  bio.endIo = (b) => {
    h.ends[i] = (h.ends[i] ?? 0) + 1;
    h.statuses[i] = b.status;
  };
  submitBio(bio);
}

/** A 4 KiB write of `data` (or of bytes `data`) at byte `off` of the test's device, submitted as the i-th. */
function write4k(h: Held, off: number, data: Buffer | number, i: number): Bio {
  const bio = new Bio(ReqOp.WRITE, h.d.part0, off / SECTOR_SIZE, 4096, [new BioVec(typeof data === 'number' ? Buffer.alloc(4096, data) : data)]);
  submitCounted(h, bio, i);
  return bio;
}

const completed = (h: Held): number => h.ends.filter((n) => n > 0).length;

/**
 * Performs held reads one at a time until `finished()` holds, checking after each that no more
 * than `cap` copies read at once; with `noio`, each inside a no-I/O scope (a completion on the
 * swap path). Every read here completes synchronously (memory backend), and so do the writes
 * and copies it lets go on; a copy that waits for a diff-storage slot resumes from the event
 * loop, so an empty hold waits a turn.
 */
async function releaseUntil(h: Held, cap: number, finished: () => boolean, noio = false): Promise<void> {
  for (let turns = 0; !finished(); ) {
    if (h.backend.held.length > 0) {
      const token = noio ? memallocNoioSave() : -1;
      try {
        h.backend.releaseOne();
      } finally {
        if (token >= 0) memallocNoioRestore(token);
      }
      expect(h.backend.held.length).toBeLessThanOrEqual(cap);
      continue;
    }
    if (++turns > 10_000) throw new Error(`gave up: bios completed ${JSON.stringify(h.ends)}, nothing held`);
    await new Promise((r) => setImmediate(r));
  }
}

describe('maxConcurrentCopies', () => {
  it('starts at most the cap of copies; the rest start in FIFO order, each write completes once', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    const chunks = 64;
    const h = await heldSnapshot(chunks, { kind: 'memory', limitBytes: 4 * MiB, stepBytes: MiB }, 4);
    // 40 first writes to 40 distinct chunks, in a shuffled order.
    const r = rng(99);
    const order = Array.from({ length: chunks }, (_, c) => c);
    for (let i = order.length - 1; i > 0; i--) {
      const j = r(i + 1);
      [order[i], order[j]] = [order[j] as number, order[i] as number];
    }
    const touched = order.slice(0, 40);
    const model = Buffer.from(h.before);
    touched.forEach((c, i) => {
      const off = c * CHUNK + (i % 4) * 4096;
      const data = stamp(Buffer.alloc(4096), off, i + 1, 3);
      data.copy(model, off);
      write4k(h, off, data, i);
    });
    expect(h.backend.held.length).toBeLessThanOrEqual(4);
    expect(completed(h)).toBe(0);
    await releaseUntil(h, 4, () => completed(h) === touched.length);
    h.backend.releaseAll();
    expect(h.backend.maxHeld).toBe(4);
    expect(h.ends).toEqual(touched.map(() => 1));
    expect(h.statuses).toEqual(touched.map(() => BlkStatus.OK));
    // The copies read their chunks in the order the writes asked for them.
    expect(h.backend.heldSectors).toEqual(touched.map((c) => (c * CHUNK) / SECTOR_SIZE));
    const image = await blkdevRead(h.s.image(h.d.name), 0, chunks * CHUNK);
    expect(Buffer.compare(image, h.before), `image differs from the instant of take at byte ${firstDiff(image, h.before)}`).toBe(0);
    const orig = await blkdevRead(h.d.part0, 0, chunks * CHUNK);
    expect(Buffer.compare(orig, model), `original differs from the model at byte ${firstDiff(orig, model)}`).toBe(0);
    expect(h.s.info()).toMatchObject({ state: 'taken', devices: [{ copiedChunks: 40 }], storage: { usedBytes: 40 * CHUNK } });
    tracker.assertAllCompleted();
  });

  it('keeps the order of writes to one chunk whose copy waits in the queue', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    const h = await heldSnapshot(16, { kind: 'memory', limitBytes: MiB, stepBytes: 256 * KiB }, 1);
    // Chunk 0's copy takes the only place; chunk 5's waits behind it, with three writes to the
    // same 4 KiB and one beside them held on it.
    write4k(h, 0, 0xa0, 0);
    const at = 5 * CHUNK + 8 * KiB;
    for (let i = 1; i <= 3; i++) write4k(h, at, 0xb0 + i, i);
    write4k(h, at + 4096, 0xc0, 4);
    expect(h.backend.held.length).toBe(1);
    await releaseUntil(h, 1, () => completed(h) === 5);
    h.backend.releaseAll();
    expect(h.ends).toEqual([1, 1, 1, 1, 1]);
    expect(h.statuses.every((st) => st === BlkStatus.OK)).toBe(true);
    const got = await blkdevRead(h.d.part0, at, 8192);
    expect(got.subarray(0, 4096).every((b) => b === 0xb3), 'the last of the three writes to one place wins').toBe(true);
    expect(got.subarray(4096).every((b) => b === 0xc0)).toBe(true);
    expect(Buffer.compare(await blkdevRead(h.s.image(h.d.name), 0, 16 * CHUNK), h.before)).toBe(0);
    tracker.assertAllCompleted();
  });

  it('copies the chunks of one huge discard after take at most the cap at a time', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    const chunks = 64;
    const h = await heldSnapshot(chunks, { kind: 'memory', limitBytes: 2 * MiB, stepBytes: MiB }, 8);
    // Everything but the first and last chunk.
    submitCounted(h, new Bio(ReqOp.DISCARD, h.d.part0, CHUNK / SECTOR_SIZE, (chunks - 2) * CHUNK), 0);
    expect(h.backend.held.length).toBeLessThanOrEqual(8);
    await releaseUntil(h, 8, () => completed(h) === 1);
    h.backend.releaseAll();
    expect(h.backend.maxHeld).toBe(8);
    expect(h.backend.heldSectors).toHaveLength(chunks - 2);
    expect(h.ends).toEqual([1]);
    expect(h.statuses).toEqual([BlkStatus.OK]);
    expect(Buffer.compare(await blkdevRead(h.s.image(h.d.name), 0, chunks * CHUNK), h.before)).toBe(0);
    const orig = await blkdevRead(h.d.part0, 0, chunks * CHUNK);
    expect(orig.subarray(CHUNK, (chunks - 1) * CHUNK).every((b) => b === 0)).toBe(true);
    expect(Buffer.compare(orig.subarray(0, CHUNK), h.before.subarray(0, CHUNK))).toBe(0);
    expect(h.s.info().devices[0]?.copiedChunks).toBe(chunks - 2);
    tracker.assertAllCompleted();
  });

  it('copies 8192 chunks of one discard one at a time on a backend that completes at once', async () => {
    // Every copy completes inside the submission that started it, and starts the next one.
    const tracker = enableBioDebug({ captureStacks: false });
    const size = 4 * MiB;
    const d = memDisk(size);
    const before = await fillDevice(d);
    const s = track(await createSnapshot({ storage: { kind: 'memory', limitBytes: size, stepBytes: MiB }, chunkSize: 512, maxConcurrentCopies: 1 }));
    await s.addDevice(d.name);
    await s.take();
    await submitBioWait(new Bio(ReqOp.DISCARD, d.part0, 0, size));
    expect(s.info().devices[0]?.copiedChunks).toBe(size / 512);
    expect(Buffer.compare(await blkdevRead(s.image(d.name), 0, size), before)).toBe(0);
    expect((await blkdevRead(d.part0, 0, size)).every((b) => b === 0)).toBe(true);
    tracker.assertAllCompleted();
  });

  it('completes every held write once when the storage overflows with copies queued', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    // Room for 4 chunks; 10 are written.
    const h = await heldSnapshot(16, { kind: 'memory', limitBytes: 4 * CHUNK, stepBytes: 4 * CHUNK }, 2);
    const img = h.s.image(h.d.name);
    const model = Buffer.from(h.before);
    for (let i = 0; i < 10; i++) {
      const off = (i + 3) * CHUNK;
      const data = stamp(Buffer.alloc(4096), off, i + 1, 5);
      data.copy(model, off);
      write4k(h, off, data, i);
    }
    await releaseUntil(h, 2, () => completed(h) === 10);
    // Copies still in flight at the corruption finish now: none may complete a write again.
    h.backend.releaseAll();
    expect(h.ends).toEqual(Array.from({ length: 10 }, () => 1));
    expect(h.statuses.every((st) => st === BlkStatus.OK), 'writes to the original never fail because of a snapshot').toBe(true);
    const ev = await h.s.waitEvent({ timeoutMs: 0 });
    expect(ev).toMatchObject({ type: 'corrupted', device: h.d.name });
    expect(h.s.info().state).toBe('corrupted');
    expect(Buffer.compare(await blkdevRead(h.d.part0, 0, 16 * CHUNK), model)).toBe(0);
    await expect(blkdevRead(img, 0, 4096)).rejects.toBeInstanceOf(SnapshotCorruptedError);
    await h.s.destroy();
    tracker.assertAllCompleted();
  });

  it('starts a queued copy in a no-I/O scope once the step it waits for is added outside it', async () => {
    // A queued copy starts when another finishes, maybe inside a no-I/O scope (a completion on
    // the swap path). If the storage is full then, the step is added from a fresh macrotask,
    // and the copy must get its slot then: nothing else would hand it one.
    const tracker = enableBioDebug({ captureStacks: false });
    const h = await heldSnapshot(16, { kind: 'memory', limitBytes: MiB, stepBytes: 2 * CHUNK }, 1);
    // Copies of chunks 0 (running), 1 and 2 (queued; chunk 2 for a swap write) take the two
    // slots of the first step and need a third.
    write4k(h, 0, 1, 0);
    write4k(h, CHUNK, 2, 1);
    const swap = new Bio(ReqOp.WRITE, h.d.part0, (2 * CHUNK) / SECTOR_SIZE, 4096, [new BioVec(Buffer.alloc(4096, 3))]);
    swap.flags |= ReqFlag.SWAP;
    submitCounted(h, swap, 2);
    await releaseUntil(h, 1, () => completed(h) === 3, true);
    expect(h.ends).toEqual([1, 1, 1]);
    expect(h.statuses).toEqual([BlkStatus.OK, BlkStatus.OK, BlkStatus.OK]);
    expect(h.s.info()).toMatchObject({ state: 'taken', devices: [{ copiedChunks: 3 }] });
    h.backend.holding = false;
    expect(Buffer.compare(await blkdevRead(h.s.image(h.d.name), 0, 16 * CHUNK), h.before)).toBe(0);
    tracker.assertAllCompleted();
  });

  it('refuses a cap that is not a whole number from 1 to 4096', async () => {
    for (const bad of [0, -1, 1.5, 4097, Number.NaN]) {
      await expect(createSnapshot({ storage: { kind: 'memory', limitBytes: MiB }, maxConcurrentCopies: bad })).rejects.toThrow(InvalidArgumentError);
    }
    await expect(createSnapshot({ storage: { kind: 'memory', limitBytes: MiB }, maxConcurrentCopies: 0 })).rejects.toThrow(
      /maxConcurrentCopies 0 is not valid: expected a whole number from 1 to 4096/,
    );
    const s = track(await createSnapshot({ storage: { kind: 'memory', limitBytes: MiB }, maxConcurrentCopies: 4096 }));
    expect(s.state).toBe('created');
  });
});
