// Memory diff storage is pre-faulted ahead of use (diff-storage.ts): at most a step ahead, never
// into a slot that is handed out, and nothing of it outlives destroy.
import fs from 'node:fs';
import { blkdevRead, blkdevWrite, disableBioDebug, enableBioDebug } from '@blkfilter/bio';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ALLOC_WAIT, DiffStorage, type DiffStorageOwner, type SlotWaiter } from './diff-storage.js';
import { createSnapshot } from './snapshot.js';
import { cleanup, fillDevice, firstDiff, memDisk, track, until } from './test-util.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const CHUNK = 64 * KiB;

const owner: DiffStorageOwner = { onLowSpace: () => {}, onExtended: () => {}, onFailed: () => {} };

afterEach(async () => {
  vi.restoreAllMocks();
  disableBioDebug();
  await cleanup();
});

/** A slot of `st`, waiting for one if need be. */
async function slotOf(st: DiffStorage): Promise<number> {
  const slot = st.alloc();
  if (slot !== ALLOC_WAIT) return slot;
  return new Promise((resolve) => {
    const waiter: SlotWaiter = { deviceName: 'test', slotReady: resolve };
    st.wait(waiter);
  });
}

/**
 * Makes every read of /dev/zero (a pre-fault job) wait until `release()`; others go on.
 * `forget()` drops the spy and the arguments it remembers (the steps read into among them).
 */
function holdPrefaultJobs(): { held: () => number; release: () => void; forget: () => void } {
  const original = fs.read;
  const waiting: Array<() => void> = [];
  let open = false;
  const spy = vi.spyOn(fs, 'read').mockImplementation(((fd: number, ...rest: unknown[]) => {
    const go = (): void => void (original as (...a: unknown[]) => void)(fd, ...rest);
    if (open || !fs.fstatSync(fd).isCharacterDevice()) go();
    else waiting.push(go);
  }) as typeof fs.read);
  return {
    held: () => waiting.length,
    release: () => {
      open = true;
      for (const go of waiting.splice(0)) go();
    },
    forget: () => {
      spy.mockReset();
      spy.mockRestore();
    },
  };
}

describe('pre-fault of memory diff storage', () => {
  it('touches the slots ahead of use, a step ahead at most, as the storage grows', async () => {
    const st = await DiffStorage.create({ kind: 'memory', limitBytes: 64 * MiB, stepBytes: 4 * MiB }, CHUNK, 'prefault-ahead', owner);
    try {
      // create() returns with the first step mapped.
      expect(st.prefaultedBytes).toBe(4 * MiB);
      expect(st.allocatedBytes).toBe(4 * MiB);
      // 40 chunks used (2.5 MiB): free space fell under half a step, so a step was added; the
      // pre-fault follows use into it, a step ahead and no further.
      for (let i = 0; i < 40; i++) expect(await slotOf(st)).toBeGreaterThanOrEqual(0);
      expect(st.allocatedBytes).toBe(8 * MiB);
      for (let turn = 0; st.prefaultedBytes !== 4 * MiB; turn++) {
        expect(st.prefaultedBytes, 'pre-faulted past a step ahead of use').toBeLessThanOrEqual(4 * MiB);
        if (turn > 100_000) throw new Error('gave up waiting for the pre-fault to catch up a step ahead');
        await new Promise((r) => setImmediate(r));
      }
      expect(st.usedBytes).toBe(40 * CHUNK);
    } finally {
      await st.close();
    }
  });

  it('never hands out a slot while a pre-fault job writes zeros into it', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    const chunks = 32;
    const d = memDisk(chunks * CHUNK);
    const before = await fillDevice(d);
    // Steps of 16 chunks, pre-faulted 4 chunks per job.
    const s = track(await createSnapshot({ storage: { kind: 'memory', limitBytes: 16 * MiB, stepBytes: MiB }, chunkSize: CHUNK }));
    await s.addDevice(d.name);
    await s.take();
    const jobs = holdPrefaultJobs();
    // The 9th first write leaves less than half a step free: a step is added, and the job that
    // pre-faults its first 4 slots is held. The writes after the first 16 step over it, at once.
    let written = 0;
    for (let c = 0; c < 20; c++) void blkdevWrite(d.part0, c * CHUNK, Buffer.alloc(4096, 0xe0 + c)).then(() => written++);
    await until(() => written === 20, 'first writes that need no slot of the held job', 1000);
    expect(jobs.held()).toBe(1);
    // The job writes its zeros now; then the next chunks take its slots.
    jobs.release();
    for (let c = 20; c < 28; c++) await blkdevWrite(d.part0, c * CHUNK, Buffer.alloc(4096, 0xe0 + c));
    const image = await blkdevRead(s.image(d.name), 0, chunks * CHUNK);
    expect(Buffer.compare(image, before), `image differs from the instant of take at byte ${firstDiff(image, before)}`).toBe(0);
    expect(s.info().storage.usedBytes).toBe(28 * CHUNK);
    tracker.assertAllCompleted();
  });

  it('destroy waits for a pre-fault job in flight and leaves no step behind', async () => {
    const gc = globalThis.gc;
    if (typeof gc !== 'function') throw new Error('run vitest with --expose-gc (vitest.config.ts)');
    gc();
    const baseline = process.memoryUsage().arrayBuffers;
    const d = memDisk(16 * MiB);
    // Steps of 16 chunks of 1 MiB; the 9th first write adds a second step, whose job is held.
    const s = await createSnapshot({ storage: { kind: 'memory', limitBytes: 64 * MiB, stepBytes: 16 * MiB }, chunkSize: MiB });
    await s.addDevice(d.name);
    await s.take();
    const jobs = holdPrefaultJobs();
    for (let c = 0; c < 9; c++) await blkdevWrite(d.part0, c * MiB, Buffer.alloc(4096, 1));
    await until(() => jobs.held() === 1, 'the pre-fault job of the second step');
    let destroyed = false;
    const destroying = s.destroy().then(() => (destroyed = true));
    // The job still writes into the second step: destroy must not return before it ends.
    for (let turn = 0; turn < 200 && !destroyed; turn++) await new Promise((r) => setImmediate(r));
    const destroyedBeforeJobEnded = destroyed;
    jobs.release();
    await destroying;
    expect(destroyedBeforeJobEnded, 'destroy returned while a pre-fault job still wrote into its storage').toBe(false);
    jobs.forget();
    gc();
    gc();
    expect(process.memoryUsage().arrayBuffers - baseline, 'the two 16 MiB steps outlived destroy').toBeLessThan(4 * MiB);
    // Used after the collection, so the snapshot object itself is alive: it must not hold its storage.
    expect(s.state).toBe('destroyed');
  });

  it('pre-faults on this thread where /dev/zero cannot be opened', async () => {
    const original = fs.open;
    vi.spyOn(fs, 'open').mockImplementation(((file: fs.PathLike, ...rest: unknown[]) => {
      const cb = rest[rest.length - 1] as (err: NodeJS.ErrnoException | null, fd?: number) => void;
      if (file === '/dev/zero') cb(Object.assign(new Error('ENOENT: no /dev/zero'), { code: 'ENOENT' }));
      else (original as (...a: unknown[]) => void)(file, ...rest);
    }) as typeof fs.open);
    const st = await DiffStorage.create({ kind: 'memory', limitBytes: 8 * MiB, stepBytes: 2 * MiB }, CHUNK, 'prefault-here', owner);
    try {
      expect(st.prefaultedBytes, 'the first step pre-faulted from setImmediate before create returned').toBe(2 * MiB);
      for (let i = 0; i < 8; i++) expect(await slotOf(st)).toBe(i);
      expect(st.prefaultedBytes).toBeLessThanOrEqual(2 * MiB);
    } finally {
      await st.close();
    }
  });
});
