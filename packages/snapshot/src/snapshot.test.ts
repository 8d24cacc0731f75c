import {
  Bio,
  blkdevRead,
  blkdevWrite,
  BlkStatus,
  disableBioDebug,
  enableBioDebug,
  ReqFlag,
  SECTOR_SIZE,
  submitBio,
  submitBioWait,
  type BlockDev,
} from '@blkfilter/bio';
import {
  FILTER_API_VERSION,
  FilterVerdict,
  attachFilter,
  detachFilter,
  filterCtl,
  listFilters,
  listRegisteredFilters,
  onFilterEvent,
  registerFilter,
  type FilterEvent,
  FilterEventType,
  type SnapshotTakenData,
} from '@blkfilter/registry';
import { writeMbr } from '@blkfilter/bio/testing';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { CowWouldBlockError, SnapshotBusyError, SnapshotCorruptedError, SnapshotNotFoundError, SnapshotStateError } from './errors.js';
import { createSnapshot, getSnapshot, listSnapshots } from './snapshot.js';
import { cleanup, fillDevice, firstDiff, memDisk, rng, stamp, track, until } from './test-util.js';
import { SNAPSHOT_DEFAULT_ALTITUDE, SNAPSHOT_FILTER_NAME } from './types.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const mem = (limitBytes = 16 * MiB, stepBytes = 4 * MiB) => ({ kind: 'memory' as const, limitBytes, stepBytes });

afterEach(async () => {
  disableBioDebug();
  await cleanup();
});

/** A filter at CBT's altitude that counts writes and snapshot-taken events for its device. */
function registerTracker(): string {
  const name = 'snap-test-tracker';
  if (!listRegisteredFilters().some((f) => f.name === name)) {
    registerFilter({
      name,
      apiVersion: FILTER_API_VERSION,
      defaultAltitude: 1000,
      attach: (ctx) => {
        const stats = { writes: 0, takes: 0 };
        return {
          write: () => (stats.writes++, FilterVerdict.PASS),
          onSnapshotTaken: (data: SnapshotTakenData) => {
            if (data.devices.includes(ctx.bdev.name)) stats.takes++;
          },
          ctl: { stats: () => ({ ...stats }) },
        };
      },
    });
  }
  return name;
}

describe('lifecycle', () => {
  it('creates, adds, takes, shows info, lists, and destroys', async () => {
    const d = memDisk(4 * MiB);
    const before = await fillDevice(d);
    const s = track(await createSnapshot({ storage: mem(), chunkSize: 64 * KiB }));
    expect(s.id).toMatch(/^[0-9a-f-]{36}$/);
    expect(s.info().state).toBe('created');
    await s.addDevice(d.name);
    expect(listFilters(d.part0)).toEqual([{ name: SNAPSHOT_FILTER_NAME, altitude: SNAPSHOT_DEFAULT_ALTITUDE, apiVersion: FILTER_API_VERSION }]);
    await s.take();
    const img = s.image(d.name);
    expect(img.name).toBe(`${d.name}-snap0`);
    expect(img.nrSects).toBe(d.capacity);
    await blkdevWrite(d.part0, 0, Buffer.alloc(4096, 0xee));
    const info = s.info();
    expect(info).toMatchObject({ state: 'taken', chunkSize: 64 * KiB, images: [img.name], error: null });
    expect(info.devices).toEqual([{ device: d.name, image: img.name, chunks: 64, copiedChunks: 1 }]);
    expect(info.storage).toMatchObject({ kind: 'memory', usedBytes: 64 * KiB, allocatedBytes: 4 * MiB, limitBytes: 16 * MiB });
    expect(listSnapshots().map((i) => i.id)).toContain(s.id);
    expect(getSnapshot(s.id)).toBe(s);
    expect(Buffer.compare(await blkdevRead(img, 0, 4 * MiB), before)).toBe(0);
    await s.destroy();
    expect(s.info().state).toBe('destroyed');
    expect(s.info().images).toEqual([]);
    expect(listFilters(d.part0)).toEqual([]);
    expect(() => getSnapshot(s.id)).toThrow(SnapshotNotFoundError);
    expect(await s.waitEvent({ timeoutMs: 10 })).toMatchObject({ type: 'destroyed' });
    await s.destroy(); // idempotent
  });

  it('refuses a device already in a snapshot (EBUSY), bad chunk sizes, and calls out of order', async () => {
    const d = memDisk(1 * MiB);
    const d4k = memDisk(1 * MiB, { logicalBlockSize: 4096 });
    const a = track(await createSnapshot({ storage: mem() }));
    const b = track(await createSnapshot({ storage: mem() }));
    await a.addDevice(d.part0);
    await expect(b.addDevice(d.name)).rejects.toBeInstanceOf(SnapshotBusyError);
    await expect(b.addDevice(d.name)).rejects.toMatchObject({ code: 'EBUSY', message: expect.stringMatching(/already in snapshot .* destroy that snapshot first/) });
    await expect(a.addDevice(d.name)).rejects.toThrow(/already in snapshot .*add each device once/);
    await expect(createSnapshot({ storage: mem(), chunkSize: 3000 })).rejects.toThrow(/power of two/);
    await expect(createSnapshot({ storage: { kind: 'memory', limitBytes: 1000 } })).rejects.toThrow(/limitBytes 1000 is too small/);
    await expect(createSnapshot({ storage: { kind: 'memory', limitBytes: MiB, stepBytes: 100 * KiB }, chunkSize: 64 * KiB })).rejects.toThrow(/multiple of the chunk size/);
    const small = track(await createSnapshot({ storage: mem(), chunkSize: 2048 }));
    await expect(small.addDevice(d4k.name)).rejects.toThrow(/smaller than the 4096-byte logical block size/);
    await expect(b.take()).rejects.toBeInstanceOf(SnapshotStateError);
    await expect(attachFilter(d4k.part0, SNAPSHOT_FILTER_NAME)).rejects.toThrow(/use createSnapshot\(\)/);
    await a.take();
    await expect(a.take()).rejects.toBeInstanceOf(SnapshotStateError);
    await expect(a.addDevice(d4k.name)).rejects.toThrow(/devices are added before take/);
    expect(() => b.image(d.name)).toThrow(/not in snapshot/);
    // After destroy the device is free for another snapshot.
    await a.destroy();
    await b.addDevice(d.name);
    await b.take();
    expect(b.image(d.name).name).toBe(`${d.name}-snap0`);
  });

  it('keeps several snapshots of different devices side by side', async () => {
    const d1 = memDisk(1 * MiB);
    const d2 = memDisk(1 * MiB);
    const c1 = await fillDevice(d1);
    const c2 = await fillDevice(d2);
    const s1 = track(await createSnapshot({ storage: mem() }));
    const s2 = track(await createSnapshot({ storage: mem() }));
    await s1.addDevice(d1.name);
    await s2.addDevice(d2.name, { imageName: `${d2.name}-backup` });
    await s1.take();
    await s2.take();
    await blkdevWrite(d1.part0, 0, Buffer.alloc(MiB, 1));
    await blkdevWrite(d2.part0, 0, Buffer.alloc(MiB, 2));
    expect(Buffer.compare(await blkdevRead(s1.image(d1.name), 0, MiB), c1)).toBe(0);
    expect(Buffer.compare(await blkdevRead(s2.image(d2.name), 0, MiB), c2)).toBe(0);
    expect(s2.image(d2.name).name).toBe(`${d2.name}-backup`);
  });
});

describe('NOWAIT', () => {
  it('completes a NOWAIT write to an uncopied chunk with AGAIN, and to a copied chunk with OK', async () => {
    const tracker = enableBioDebug();
    const d = memDisk(2 * MiB, { async: true });
    const before = await fillDevice(d);
    const s = track(await createSnapshot({ storage: mem(), chunkSize: 64 * KiB }));
    await s.addDevice(d.name);
    await s.take();
    const nw = Bio.write(d.part0, 0, Buffer.alloc(4096, 9), ReqFlag.NOWAIT);
    await expect(submitBioWait(nw)).rejects.toBeInstanceOf(CowWouldBlockError);
    expect(nw.status).toBe(BlkStatus.AGAIN);
    expect(nw.error?.message).toMatch(/must wait for copy-on-write.*retry/);
    // A blocking write copies chunk 1; a NOWAIT write to it then passes.
    await blkdevWrite(d.part0, 64 * KiB, Buffer.alloc(4096, 1));
    const ok = Bio.write(d.part0, (64 * KiB + 8192) / SECTOR_SIZE, Buffer.alloc(4096, 2), ReqFlag.NOWAIT);
    await submitBioWait(ok);
    expect(ok.status).toBe(BlkStatus.OK);
    // The AGAIN started the copy of chunk 0 (nothing else wrote there): once it is copied, a retry passes.
    await until(() => (s.info().devices[0]?.copiedChunks ?? 0) === 2, 'chunk 0 copied after the AGAIN');
    const retry = Bio.write(d.part0, 0, Buffer.alloc(4096, 9), ReqFlag.NOWAIT);
    await submitBioWait(retry);
    expect(Buffer.compare(await blkdevRead(s.image(d.name), 0, 2 * MiB), before)).toBe(0);
    expect((await blkdevRead(d.part0, 0, 4096))[0]).toBe(9);
    tracker.assertAllCompleted();
  });
});

describe('image writes', () => {
  it('keeps image writes in diff storage, leaves the original alone, and reports ranges-changed for the original', async () => {
    const tracker = enableBioDebug();
    const d = memDisk(2 * MiB, { async: true });
    const before = await fillDevice(d);
    const trackerName = registerTracker();
    await attachFilter(d.part0, trackerName);
    const s = track(await createSnapshot({ storage: mem(), chunkSize: 64 * KiB }));
    await s.addDevice(d.name);
    const events: FilterEvent[] = [];
    const off = onFilterEvent((e) => {
      if (e.type === FilterEventType.RANGES_CHANGED || e.type === FilterEventType.SNAPSHOT_TAKEN) events.push(e);
    });
    try {
      await s.take();
      const img = s.image(d.name);
      // Straddles chunks 0/1: 60 KiB + 8 KiB.
      const data = stamp(Buffer.alloc(8 * KiB), 60 * KiB, 5, 5);
      await blkdevWrite(img, 60 * KiB, data);
      const expected = Buffer.from(before);
      data.copy(expected, 60 * KiB);
      expect(Buffer.compare(await blkdevRead(img, 0, 2 * MiB), expected)).toBe(0);
      expect(Buffer.compare(await blkdevRead(d.part0, 0, 2 * MiB), before)).toBe(0);
      // A later write to the original does not change the image's written data.
      await blkdevWrite(d.part0, 56 * KiB, Buffer.alloc(16 * KiB, 0x77));
      expect(Buffer.compare(await blkdevRead(img, 0, 2 * MiB), expected)).toBe(0);
      expect(events.map((e) => [e.type, e.device, e.filter])).toEqual([
        [FilterEventType.SNAPSHOT_TAKEN, d.name, SNAPSHOT_FILTER_NAME],
        [FilterEventType.RANGES_CHANGED, d.name, SNAPSHOT_FILTER_NAME],
      ]);
      expect(events[0]?.data).toEqual({ devices: [d.name], snapshotId: s.id });
      expect(events[1]?.data).toEqual({ ranges: [{ sector: (60 * KiB) / SECTOR_SIZE, sectors: 16 }] });
      // The tracking filter above saw the take; the image write is not a write to the original.
      expect(await filterCtl(d.part0, trackerName, 'stats')).toEqual({ writes: 1, takes: 1 });
    } finally {
      off();
    }
    await s.destroy();
    // Tracking goes on after destroy.
    expect(listFilters(d.part0).map((f) => f.name)).toEqual([trackerName]);
    await blkdevWrite(d.part0, 0, Buffer.alloc(512));
    tracker.assertAllCompleted();
  });
});

describe('multi-device take', () => {
  it('snapshots two busy devices at one frozen instant, and emits snapshot-taken while both are frozen', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    const a = memDisk(1 * MiB, { async: true, seed: 1 });
    const b = memDisk(1 * MiB, { async: true, seed: 2 });
    const s = track(await createSnapshot({ storage: mem(), chunkSize: 64 * KiB }));
    await s.addDevice(a.name);
    await s.addDevice(b.part0);
    const frozen = new Set<string>();
    let takenWhileFrozen: string[] | null = null;
    const off = onFilterEvent((e) => {
      if (e.type === 'frozen') frozen.add(e.device);
      else if (e.type === 'thawed') frozen.delete(e.device);
      else if (e.type === FilterEventType.SNAPSHOT_TAKEN) {
        takenWhileFrozen = (e.data as { devices: string[] }).devices.filter((n) => frozen.has(n));
        expect(e.data).toEqual({ devices: [a.name, b.name], snapshotId: s.id });
      }
    });
    // Each writer owns one block and writes an increasing number to A, then to B, in order.
    const WRITERS = 8;
    let stop = false;
    const done = new Array<number>(WRITERS).fill(0);
    const writer = async (w: number): Promise<number> => {
      let n = 0;
      const buf = Buffer.alloc(512);
      while (!stop) {
        n++;
        buf.writeUInt32LE(n, 0);
        await blkdevWrite(a.part0, w * 64 * KiB, buf);
        await blkdevWrite(b.part0, w * 64 * KiB, buf);
        done[w] = n;
      }
      return n;
    };
    const running = Array.from({ length: WRITERS }, (_, w) => writer(w));
    // Take while every writer is busy, and let each go on a while after: counted in writes, not ms.
    await until(() => done.every((n) => n >= 5), 'every writer busy before the take');
    await s.take();
    const atTake = [...done];
    await until(() => done.every((n, w) => n >= (atTake[w] as number) + 5), 'every writer busy after the take');
    stop = true;
    const counts = await Promise.all(running);
    off();
    expect(takenWhileFrozen).toEqual([a.name, b.name]);
    const imgA = await blkdevRead(s.image(a.name), 0, MiB);
    const imgB = await blkdevRead(s.image(b.name), 0, MiB);
    for (let w = 0; w < WRITERS; w++) {
      const na = imgA.readUInt32LE(w * 64 * KiB);
      const nb = imgB.readUInt32LE(w * 64 * KiB);
      // One instant: A was written first, so it is B's number or one ahead, never behind.
      expect(na - nb, `writer ${w}: image A has ${na}, image B has ${nb}`).toBeGreaterThanOrEqual(0);
      expect(na - nb, `writer ${w}: image A has ${na}, image B has ${nb}`).toBeLessThanOrEqual(1);
      expect(na).toBeGreaterThan(0);
      expect(na).toBeLessThan(counts[w] as number);
    }
    tracker.assertAllCompleted();
  });
});

describe('destroy under load', () => {
  it('loses no bio: writers to the original keep succeeding, image bios after destroy complete with OFFLINE', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    const SIZE = 4 * MiB;
    const d = memDisk(SIZE, { async: true });
    const before = await fillDevice(d);
    const s = track(await createSnapshot({ storage: mem(32 * MiB), chunkSize: 64 * KiB }));
    await s.addDevice(d.name);
    await s.take();
    const img: BlockDev = s.image(d.name);
    let stop = false;
    const r = rng(99);
    let writes = 0;
    const writer = async (): Promise<void> => {
      while (!stop) {
        const off = r(SIZE / 4096) * 4096;
        await blkdevWrite(d.part0, off, Buffer.alloc(4096, 0xaa)); // never rejects: a snapshot cannot fail it
        writes++;
      }
    };
    const statuses = new Map<number, number>();
    let reads = 0;
    const reader = async (): Promise<void> => {
      while (!stop) {
        const off = r(SIZE / 8192) * 8192;
        const buf = Buffer.alloc(8192);
        const bio = Bio.read(img, off / SECTOR_SIZE, buf);
        await submitBioWait(bio).catch(() => {});
        statuses.set(bio.status, (statuses.get(bio.status) ?? 0) + 1);
        if (bio.status === BlkStatus.OK) {
          expect(Buffer.compare(buf, before.subarray(off, off + 8192)), `image read at ${off}`).toBe(0);
          reads++;
        } else {
          expect(bio.status).toBe(BlkStatus.OFFLINE);
          await new Promise((res) => setImmediate(res));
        }
      }
    };
    const all = [writer(), writer(), writer(), reader(), reader()];
    await until(() => writes > 10 && reads > 0, 'writers and readers under way');
    await s.destroy();
    // Readers in flight at the destroy, or after it, see OFFLINE.
    await until(() => (statuses.get(BlkStatus.OFFLINE) ?? 0) > 0, 'a reader seeing OFFLINE');
    const late = Bio.read(img, 0, Buffer.alloc(512));
    await submitBioWait(late).catch(() => {});
    expect(late.status).toBe(BlkStatus.OFFLINE);
    stop = true;
    await Promise.all(all);
    expect(writes).toBeGreaterThan(10);
    expect(reads).toBeGreaterThan(0);
    expect(statuses.get(BlkStatus.OFFLINE)).toBeGreaterThan(0);
    tracker.assertAllCompleted();
    expect(d.part0.inflight).toBe(0);
    expect(listFilters(d.part0)).toEqual([]);
    void submitBio;
  });
});

describe('corruption', () => {
  it('fails image bios with a SnapshotCorruptedError after the CoW filter is detached behind its back', async () => {
    const d = memDisk(1 * MiB);
    await fillDevice(d);
    const s = track(await createSnapshot({ storage: mem(), chunkSize: 64 * KiB }));
    await s.addDevice(d.name);
    await s.take();
    await detachFilter(d.part0, SNAPSHOT_FILTER_NAME);
    const ev = await s.waitEvent({ timeoutMs: 100 });
    expect(ev).toMatchObject({ type: 'corrupted', device: d.name });
    const bio = Bio.read(s.image(d.name), 0, Buffer.alloc(512));
    await expect(submitBioWait(bio)).rejects.toBeInstanceOf(SnapshotCorruptedError);
    expect(bio.status).toBe(BlkStatus.IOERR);
    expect(s.info()).toMatchObject({ state: 'corrupted', error: { code: 'ERR_SNAPSHOT_STATE' } });
    expect(firstDiff(Buffer.alloc(1), Buffer.alloc(1))).toBe(-1);
  });

  it('answers waitEvent with a timeout when nothing happens', async () => {
    const s = track(await createSnapshot({ storage: mem() }));
    // The timer is faked: the answer comes when 20 ms of it have passed, not before, whatever the machine.
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    try {
      let answer: unknown = null;
      void s.waitEvent({ timeoutMs: 20 }).then((e) => (answer = e));
      await vi.advanceTimersByTimeAsync(19);
      expect(answer).toBeNull();
      await vi.advanceTimersByTimeAsync(1);
      expect(answer).toMatchObject({ type: 'timeout', timeoutMs: 20 });
    } finally {
      vi.useRealTimers();
    }
    expect(() => s.waitEvent({ timeoutMs: -1 })).toThrow(/timeoutMs -1 is not valid/);
  });
});

describe('partitions', () => {
  it('snapshots a partition, and gives a whole-disk image the partitions of the instant', async () => {
    const d = memDisk(4 * MiB);
    await writeMbr(d, [[2048, 4096]]);
    const p1 = d.partition(1) as BlockDev;
    const content = stamp(Buffer.alloc(2 * MiB), 0, 0, 0);
    await blkdevWrite(p1, 0, content);

    const s1 = track(await createSnapshot({ storage: mem(), chunkSize: 64 * KiB }));
    await s1.addDevice(p1.name);
    await s1.take();
    const img1 = s1.image(p1);
    expect(img1.nrSects).toBe(4096);
    await blkdevWrite(p1, 60 * KiB, Buffer.alloc(8 * KiB, 0x42));
    expect(Buffer.compare(await blkdevRead(img1, 0, 2 * MiB), content)).toBe(0);
    await s1.destroy();

    const now = await blkdevRead(p1, 0, 2 * MiB);
    const s2 = track(await createSnapshot({ storage: mem(), chunkSize: 64 * KiB }));
    await s2.addDevice(d.part0);
    await s2.take();
    const imgDisk = s2.image(d.name).disk;
    expect(imgDisk.partitions.map((p) => [p.name, p.startSect, p.nrSects])).toEqual([[`${imgDisk.name}p1`, 2048, 4096]]);
    // A partition write is remapped to the disk, where the CoW filter sees it.
    await blkdevWrite(p1, 0, Buffer.alloc(MiB, 0x43));
    expect(Buffer.compare(await blkdevRead(imgDisk.partition(1) as BlockDev, 0, 2 * MiB), now)).toBe(0);
  });
});
