import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type {
  Bio} from '@blkfilter/bio';
import {
  allocIoBuffer,
  bioChain,
  bioClone,
  bioEndio,
  bioNeedsNoio,
  bioSplit,
  createDiskSync,
  disableBioDebug,
  enableBioDebug,
  FileBackend,
  MemoryBackend,
  ReqFlag,
  type BlockBackend,
  type Disk,
} from '@blkfilter/bio';
import { FaultBackend, findDirectIoDir } from '@blkfilter/bio/testing';
import { attachFilter, detachFilter, FILTER_API_VERSION, FilterVerdict, listFilters, registerFilter, unregisterFilter, withFrozenDevices, type FilterNext } from '@blkfilter/registry';
import { afterEach, describe, expect, it } from 'vitest';
import { openDirect } from './direct.js';
import { HandleClosedError, MisalignedIoError } from './errors.js';

let n = 0;
const disks: Disk[] = [];
const filters: string[] = [];
const dirs: string[] = [];
function disk(backend: BlockBackend = new MemoryBackend({ sizeBytes: 8 << 20 }), options: { logicalBlockSize?: 512 | 4096; maxSectors?: number } = {}): Disk {
  const d = createDiskSync({
    name: `dio${n++}`,
    backend,
    ...(options.logicalBlockSize ? { logicalBlockSize: options.logicalBlockSize } : {}),
    limits: { maxSectors: options.maxSectors ?? 256 },
  });
  disks.push(d);
  return d;
}
function filter(name: string, make: () => Parameters<typeof registerFilter>[0]['attach']): string {
  registerFilter({ name, apiVersion: FILTER_API_VERSION, attach: make() });
  filters.push(name);
  return name;
}
afterEach(async () => {
  disableBioDebug();
  for (const d of disks.splice(0).reverse()) {
    for (const f of listFilters(d.part0)) await detachFilter(d.part0, f.name);
    await d.remove();
  }
  for (const f of filters.splice(0)) unregisterFilter(f);
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

/**
 * A directory where O_DIRECT opens work (tmpfs refuses it): BLKFILTER_DIRECT_TMP, else the
 * system temp dir, else a directory in this package (on the repository's disk); null when none.
 */
const directDir = findDirectIoDir([process.env.BLKFILTER_DIRECT_TMP ?? os.tmpdir(), path.join(fileURLToPath(new URL('../', import.meta.url)), '.test-tmp')]);
if (directDir === null) console.warn('skipping the O_DIRECT file test: no candidate directory supports O_DIRECT (set BLKFILTER_DIRECT_TMP to one on a disk filesystem)');

function pattern(size: number, seed: number): Buffer {
  const b = allocIoBuffer(size, 4096);
  for (let i = 0; i < size; i++) b[i] = (i * 13 + seed) & 0xff;
  return b;
}

describe('openDirect', () => {
  it('refuses misaligned offsets, lengths and buffers with the needed alignment in the message', async () => {
    const d = disk(new MemoryBackend({ sizeBytes: 8 << 20 }), { logicalBlockSize: 4096 });
    const h = await openDirect(d.part0);
    const aligned = allocIoBuffer(4096, 4096);
    await expect(h.read(aligned, 512)).rejects.toThrow(/offset 512 must be a multiple of the 4096-byte/);
    await expect(h.read(allocIoBuffer(512, 4096), 0)).rejects.toBeInstanceOf(MisalignedIoError);
    await expect(h.write(Buffer.alloc(4096), 0)).rejects.toThrow(/allocIoBuffer\(size, 4096\)/);
    await expect(h.write(aligned.subarray(512, 4608 > aligned.length ? aligned.length : 4608), 0)).rejects.toBeInstanceOf(MisalignedIoError);
    const loose = await openDirect(d.part0, { alignedBuffers: false });
    expect(await loose.write(Buffer.alloc(4096, 1), 0)).toBe(4096);
    await h.close();
    await expect(h.read(aligned, 0)).rejects.toBeInstanceOf(HandleClosedError);
  });

  it('splits requests over the queue limits into chained bios and reads back exactly', async () => {
    const tracker = enableBioDebug();
    const d = disk(new MemoryBackend({ sizeBytes: 8 << 20 }), { maxSectors: 16 });
    const h = await openDirect(d.name);
    const data = pattern(1 << 20, 3);
    expect(await h.write(data, 4096)).toBe(1 << 20);
    const back = allocIoBuffer(1 << 20, 4096);
    expect(await h.read(back, 4096)).toBe(1 << 20);
    expect(Buffer.compare(back, data)).toBe(0);
    const parts = [pattern(8192, 1), pattern(4096, 2)];
    await h.writev(parts, 0);
    const a = allocIoBuffer(4096, 4096);
    const b = allocIoBuffer(8192, 4096);
    await h.readv([a, b], 0);
    expect(Buffer.compare(Buffer.concat([a, b]), Buffer.concat(parts))).toBe(0);
    tracker.assertAllCompleted();
    expect(tracker.submitted).toBeGreaterThan(128); // 1 MiB in 8 KiB pieces, twice
  });

  it('marks dsync writes FUA and sends them through the filters', async () => {
    const seen: number[] = [];
    const log = filter('dio-log', () => () => ({
      write: (bio: Bio) => (seen.push(bio.flags), FilterVerdict.PASS),
    }));
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dio-'));
    dirs.push(dir);
    const backend = await FileBackend.open(path.join(dir, 'img'), { create: { sizeBytes: 4 << 20 } });
    const d = disk(backend);
    await attachFilter(d.part0, log, { altitude: 1 });
    const h = await openDirect(d.part0, { dsync: true });
    await h.write(pattern(4096, 9), 8192);
    expect(seen).toHaveLength(1);
    expect((seen[0] as number) & ReqFlag.FUA).toBe(ReqFlag.FUA);
    expect(fs.readFileSync(path.join(dir, 'img')).subarray(8192, 8192 + 4096).equals(pattern(4096, 9))).toBe(true);
  });

  it('fails NOWAIT I/O with EAGAIN while the device is frozen', async () => {
    const d = disk();
    const h = await openDirect(d.part0, { nowait: true });
    await withFrozenDevices([d.part0], async () => {
      await expect(h.write(pattern(4096, 1), 0)).rejects.toMatchObject({ code: 'EAGAIN' });
    });
    expect(await h.write(pattern(4096, 1), 0)).toBe(4096);
  });

  it.skipIf(directDir === null)(`does real O_DIRECT I/O on a file backend opened O_DIRECT (in ${directDir ?? 'no directory supporting it'})`, async () => {
    const dir = fs.mkdtempSync(path.join(directDir as string, 'dio-'));
    dirs.push(dir);
    const img = path.join(dir, 'direct.img');
    const backend = await FileBackend.open(img, { create: { sizeBytes: 4 << 20 }, direct: true });
    const d = disk(backend, { logicalBlockSize: 4096 });
    // The image's fd carries O_DIRECT (octal 040000 in /proc/self/fdinfo flags).
    const O_DIRECT = fs.constants.O_DIRECT;
    const fds = fs.readdirSync('/proc/self/fd').filter((fd) => {
      try {
        return fs.readlinkSync(`/proc/self/fd/${fd}`) === img;
      } catch {
        return false;
      }
    });
    expect(fds.length).toBeGreaterThan(0);
    const flags = fds.map((fd) => parseInt(/flags:\s*(\d+)/.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))?.[1] ?? '0', 8));
    expect(flags.some((f) => (f & O_DIRECT) !== 0)).toBe(true);
    const h = await openDirect(d.part0, { dsync: true });
    const data = pattern(64 * 1024, 5);
    await h.write(data, 1 << 20);
    const back = allocIoBuffer(64 * 1024, 4096);
    await h.read(back, 1 << 20);
    expect(Buffer.compare(back, data)).toBe(0);
    expect(backend.stats.bouncedBios).toBe(0); // aligned buffers went straight to the kernel
  });

  it('marks swap I/O so that filters handle it in a no-I/O scope', async () => {
    const noio: boolean[] = [];
    const f = filter('dio-swapcheck', () => () => ({ write: (bio: Bio) => (noio.push(bioNeedsNoio(bio)), FilterVerdict.PASS) }));
    const d = disk();
    await attachFilter(d.part0, f, { altitude: 1 });
    await (await openDirect(d.part0)).write(pattern(4096, 1), 0);
    await (await openDirect(d.part0, { swap: true })).write(pattern(4096, 1), 0);
    expect(noio).toEqual([false, true]);
  });
});

describe('polled completion', () => {
  it('reaps a polled request from the poll queue with its cookie', async () => {
    const d = disk();
    const h = await openDirect(d.part0, { poll: true });
    for (let i = 0; i < 20; i++) await h.write(pattern(4096, i), i * 4096);
    const back = allocIoBuffer(4096, 4096);
    await h.read(back, 19 * 4096);
    expect(Buffer.compare(back, pattern(4096, 19))).toBe(0);
    expect(h.stats.polled).toBe(21);
    expect(h.stats.pollFallbacks).toBe(0);
    for (const q of d.queues) expect(q.pending).toBe(0);
  });

  it('polls asynchronous completions, yielding to the event loop while it spins', async () => {
    const d = disk(new FaultBackend(new MemoryBackend({ sizeBytes: 8 << 20 }), { rules: [{ delayMs: 5 }] }));
    const h = await openDirect(d.part0, { poll: true });
    let ticks = 0;
    const timer = setInterval(() => ticks++, 1);
    await h.write(pattern(4096, 1), 0);
    clearInterval(timer);
    expect(h.stats.polled).toBe(1);
    expect(h.stats.emptyPolls).toBeGreaterThan(0);
    expect(ticks).toBeGreaterThan(0); // timers ran while we polled
  });

  it.skipIf(directDir === null)('polls and takes interrupts on an O_DIRECT file whose completions come from Linux native AIO', async () => {
    const tracker = enableBioDebug();
    const dir = fs.mkdtempSync(path.join(directDir as string, 'dio-'));
    dirs.push(dir);
    const backend = await FileBackend.open(path.join(dir, 'aio.img'), { create: { sizeBytes: 8 << 20 }, direct: true });
    if (backend.stats.ioEngine !== 'aio') console.warn(`the file backend uses the threadpool here: ${backend.stats.ioEngineReason ?? ''}`);
    const d = disk(backend, { logicalBlockSize: 4096 });
    const polled = await openDirect(d.part0, { poll: true });
    const irq = await openDirect(d.part0);
    const datas = Array.from({ length: 64 }, (_, i) => pattern(8192, i));
    // All in flight at once, half through each handle; then each read back through the other.
    await Promise.all(datas.map((data, i) => (i % 2 === 0 ? polled : irq).write(data, i * 8192)));
    const backs = datas.map(() => allocIoBuffer(8192, 4096));
    await Promise.all(backs.map((back, i) => (i % 2 === 0 ? irq : polled).read(back, i * 8192)));
    for (let i = 0; i < 64; i++) expect(Buffer.compare(backs[i] as Buffer, datas[i] as Buffer), `request ${i}`).toBe(0);
    // Every polled request was reaped from its poll queue by its cookie, none fell back; the
    // kernel completes later than the submission, so polls found nothing first.
    expect(polled.stats).toMatchObject({ polled: 64, pollFallbacks: 0, interrupts: 0 });
    expect(polled.stats.emptyPolls).toBeGreaterThan(0);
    expect(irq.stats).toMatchObject({ polled: 0, interrupts: 64 });
    for (const q of d.queues) expect(q.pending).toBe(0);
    tracker.assertAllCompleted();
  });

  it('never strands a completion, whatever a filter does with the bio', async () => {
    const tracker = enableBioDebug();
    const other = disk();
    const kinds: Record<string, () => (bio: Bio, next: FilterNext) => FilterVerdict> = {
      pass: () => () => FilterVerdict.PASS,
      defer: () => (bio, next) => (setImmediate(() => next.submit(bio)), FilterVerdict.TAKEN),
      split: () => (bio, next) => {
        if (bio.size < 1024) return FilterVerdict.PASS;
        const first = bioSplit(bio, 1);
        bioChain(first, bio);
        next.submit(first);
        next.submit(bio);
        return FilterVerdict.TAKEN;
      },
      clone: () => (bio, next) => {
        const clone = bioClone(bio);
        clone.private = bio;
        clone.endIo = (c) => bioEndio(c.private as Bio, c.status);
        next.submit(clone);
        return FilterVerdict.TAKEN;
      },
      remap: () => (bio) => {
        // Redirect to another device (as a snapshot image redirects to diff storage).
        const clone = bioClone(bio, other.part0);
        clone.private = bio;
        clone.endIo = (c) => bioEndio(c.private as Bio, c.status);
        setImmediate(() => {
          void import('@blkfilter/bio').then(({ submitBio }) => submitBio(clone));
        });
        return FilterVerdict.TAKEN;
      },
    };
    for (const [kind, make] of Object.entries(kinds)) {
      const d = disk();
      const f = filter(`dio-${kind}`, () => () => ({ read: make(), write: make() }));
      await attachFilter(d.part0, f, { altitude: 1 });
      const h = await openDirect(d.part0, { poll: true });
      const data = pattern(8192, kind.length);
      await h.write(data, 8192);
      const back = allocIoBuffer(8192, 4096);
      await h.read(back, 8192);
      if (kind !== 'remap') expect(Buffer.compare(back, data), kind).toBe(0);
      if (kind === 'pass') expect(h.stats.polled, kind).toBe(2);
      else expect(h.stats.pollFallbacks, kind).toBe(2);
      for (const q of [...d.queues, ...other.queues]) expect(q.pending, kind).toBe(0);
    }
    tracker.assertAllCompleted();
  });
});
