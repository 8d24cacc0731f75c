import {
  Bio,
  bioEndio,
  blkdevRead,
  blkdevWrite,
  BlkStatus,
  createDiskSync,
  disableBioDebug,
  enableBioDebug,
  InvalidArgumentError,
  MemoryBackend,
  ReqFlag,
  ReqOp,
  submitBio,
  submitBioWait,
  type Disk,
} from '@blkfilter/bio';
import { FaultBackend, writeMbr } from '@blkfilter/bio/testing';
import { afterEach, describe, expect, it } from 'vitest';
import { FilterVerdict, type FilterDefinition, type FilterEvent, type FilterInstance, type FilterNext } from './api.js';
import {
  FilterAlreadyAttachedError,
  FilterApiVersionError,
  FilterBusyError,
  FilterExistsError,
  FilterNotFoundError,
  FreezeTimeoutError,
  UnknownCtlCommandError,
} from './errors.js';
import { FilterEventType } from './events.js';
import {
  attachFilter,
  detachFilter,
  filterCtl,
  listFilters,
  onFilterEvent,
  registerFilter,
  setFilterAltitude,
  unregisterFilter,
  withFrozenDevices,
} from './registry.js';

let n = 0;
const disks: Disk[] = [];
function disk(sizeBytes = 1 << 20, delayed = false): Disk {
  const mem = new MemoryBackend({ sizeBytes });
  const backend = delayed ? new FaultBackend(mem, { rules: [{ delayMs: 0 }] }) : mem;
  const d = createDiskSync({ name: `reg${n++}`, backend });
  disks.push(d);
  return d;
}
const registered: string[] = [];
function register<O>(def: FilterDefinition<O>): string {
  registerFilter(def);
  registered.push(def.name);
  return def.name;
}
afterEach(async () => {
  disableBioDebug();
  for (const d of disks.splice(0)) {
    for (const f of listFilters(d.part0)) await detachFilter(d.part0, f.name);
    for (const p of d.partitions) for (const f of listFilters(p)) await detachFilter(p, f.name);
    await d.remove();
  }
  for (const name of registered.splice(0)) unregisterFilter(name);
});

/** A filter that logs every op it sees under its name and passes it on. */
function logger(name: string, log: string[], apiVersion = 2): FilterDefinition {
  const see = (bio: Bio): FilterVerdict => {
    log.push(`${name}:${bio.op}:${bio.sector}`);
    return FilterVerdict.PASS;
  };
  return { name, apiVersion, attach: () => ({ read: see, write: see, flush: see, discard: see, writeZeroes: see }) };
}

describe('registration and attach errors', () => {
  it('checks the API version and refuses duplicates', () => {
    expect(() => registerFilter({ name: 'v9', apiVersion: 9, attach: () => ({}) })).toThrow(FilterApiVersionError);
    register({ name: 'dup', apiVersion: 2, attach: () => ({}) });
    expect(() => registerFilter({ name: 'dup', apiVersion: 2, attach: () => ({}) })).toThrow(FilterExistsError);
  });

  it('gives ENOENT, EALREADY and EBUSY like BLKFILTER_ATTACH', async () => {
    const d = disk();
    const a = register(logger('la', []));
    const b = register(logger('lb', []));
    await expect(attachFilter(d.part0, 'nope', { altitude: 1 })).rejects.toMatchObject({ code: 'ENOENT' });
    await attachFilter(d.name, a, { altitude: 10 });
    await expect(attachFilter(d.part0, a, { altitude: 20 })).rejects.toBeInstanceOf(FilterAlreadyAttachedError);
    await expect(attachFilter(d.part0, b, { altitude: 10 })).rejects.toBeInstanceOf(FilterBusyError);
    await expect(attachFilter(d.part0, b)).rejects.toThrow(/altitude/);
    expect(() => unregisterFilter(a)).toThrow(FilterBusyError);
    await expect(detachFilter(d.part0, b)).rejects.toBeInstanceOf(FilterNotFoundError);
  });
});

describe('the stack', () => {
  it('shows bios to filters from the highest altitude down, and the order is visible', async () => {
    const d = disk();
    const log: string[] = [];
    for (const [name, alt] of [['low', 10], ['high', 30], ['mid', 20]] as const) {
      await attachFilter(d.part0, register(logger(name, log)), { altitude: alt });
    }
    expect(listFilters(d.part0).map((f) => f.name)).toEqual(['high', 'mid', 'low']);
    await blkdevWrite(d.part0, 4096, Buffer.alloc(512, 1));
    expect(log).toEqual(['high:1:8', 'mid:1:8', 'low:1:8']);
    await setFilterAltitude(d.part0, 'low', 40);
    log.length = 0;
    await blkdevRead(d.part0, 0, 512);
    expect(log).toEqual(['low:0:0', 'high:0:0', 'mid:0:0']);
    await detachFilter(d.part0, 'high');
    await detachFilter(d.part0, 'mid');
    await detachFilter(d.part0, 'low');
    expect(d.part0.filter).toBeNull(); // no filter, no hook: the bare path again
  });

  it("does not show a filter its own I/O, but shows it to the filters below", async () => {
    const d = disk();
    const log: string[] = [];
    const name = register({
      name: 'mirror-read',
      apiVersion: 2,
      attach: (ctx) => ({
        write(bio: Bio, next: FilterNext): FilterVerdict {
          log.push(`top sees ${bio.sector}`);
          // Before each write, read the old block through the layers below (as CoW does).
          const old = Bio.read(ctx.bdev, bio.sector, Buffer.alloc(bio.size));
          old.private = bio;
          old.endIo = (o) => {
            log.push(`old read ${o.status}`);
            next.submit(o.private as Bio);
          };
          next.submit(old);
          return FilterVerdict.TAKEN;
        },
        read(bio: Bio): FilterVerdict {
          log.push(`top sees read ${bio.sector}`);
          return FilterVerdict.PASS;
        },
      }),
    });
    await attachFilter(d.part0, name, { altitude: 50 });
    await attachFilter(d.part0, register(logger('below', log)), { altitude: 10 });
    await blkdevWrite(d.part0, 512, Buffer.alloc(512, 2));
    expect(log).toEqual(['top sees 1', 'below:0:1', 'old read 0', 'below:1:1']);
    expect((await blkdevRead(d.part0, 512, 512))[0]).toBe(2);
  });

  it('completes ops newer than a filter API version with NOTSUPP', async () => {
    const d = disk();
    await attachFilter(d.part0, register(logger('old-cbt', [], 1)), { altitude: 1 });
    const wz = new Bio(ReqOp.WRITE_ZEROES, d.part0, 0, 4096);
    await expect(submitBioWait(wz)).rejects.toMatchObject({ code: 'EOPNOTSUPP' });
    expect(wz.status).toBe(BlkStatus.NOTSUPP);
    expect(wz.error?.message).toMatch(/filter API v1, which does not know WRITE_ZEROES/);
    await blkdevWrite(d.part0, 0, Buffer.alloc(512, 3)); // known ops still work
  });

  it('sees partition bios in the partition stack, then the disk stack', async () => {
    const d = disk(1 << 20);
    await writeMbr(d, [[128, 256]]);
    const p1 = d.partition(1);
    if (p1 === undefined) throw new Error('no partition');
    const log: string[] = [];
    await attachFilter(p1, register(logger('onpart', log)), { altitude: 5 });
    await attachFilter(d.part0, register(logger('ondisk', log)), { altitude: 5 });
    await blkdevWrite(p1, 0, Buffer.alloc(512));
    expect(log).toEqual(['onpart:1:0', 'ondisk:1:128']);
    await expect(d.rescanPartitions()).rejects.toMatchObject({ code: 'EBUSY' });
  });
});

describe('control channel and events', () => {
  it('runs known commands and names the known ones for an unknown command', async () => {
    const d = disk();
    let count = 0;
    const name = register({
      name: 'counter',
      apiVersion: 2,
      attach: (): FilterInstance => ({
        write: () => (count++, FilterVerdict.PASS),
        ctl: { count: () => count, reset: () => (count = 0) },
      }),
    });
    await attachFilter(d.part0, name, { altitude: 1 });
    await blkdevWrite(d.part0, 0, Buffer.alloc(1024));
    expect(await filterCtl(d.name, name, 'count')).toBe(1);
    await expect(filterCtl(d.part0, name, 'explode')).rejects.toThrow(UnknownCtlCommandError);
    await expect(filterCtl(d.part0, name, 'explode')).rejects.toThrow(/commands: count, reset/);
    await expect(filterCtl(d.part0, 'absent', 'count')).rejects.toBeInstanceOf(FilterNotFoundError);
  });

  it('delivers registry and filter events to subscribers and to the filters of that device only', async () => {
    const d = disk();
    const other = disk();
    const events: string[] = [];
    const seen: Record<string, string[]> = { mine: [], other: [] };
    const off = onFilterEvent((e: FilterEvent) => events.push(`${e.type}${e.filter ? `:${e.filter}` : ''}@${e.device === d.part0.name ? 'mine' : 'other'}`));
    const name = register({
      name: 'announcer',
      apiVersion: 2,
      attach: (ctx) => {
        const who = ctx.bdev === d.part0 ? 'mine' : 'other';
        return {
          onEvent: (e) => seen[who]?.push(e.type),
          onSnapshotTaken: (data) => seen[who]?.push(`taken:${data.devices.join(',')}:${data.snapshotId ?? ''}`),
          onRangesChanged: (ranges) => seen[who]?.push(`changed:${ranges.map((r) => `${r.sector}+${r.sectors}`).join(',')}`),
          ctl: {
            hello: () => ctx.emit('hello', { n: 1 }),
            take: () => ctx.snapshotTaken({ devices: [ctx.bdev.name], snapshotId: 's1' }),
            changed: (r) => ctx.rangesChanged(r as never),
            forged: () => ctx.emit(FilterEventType.SNAPSHOT_TAKEN, { devices: [ctx.bdev.name] }),
          },
        };
      },
    });
    await attachFilter(d.part0, name, { altitude: 1 });
    await attachFilter(other.part0, name, { altitude: 1 });
    events.length = 0;
    seen.mine = [];
    seen.other = [];
    await filterCtl(d.part0, name, 'hello');
    await filterCtl(d.part0, name, 'take');
    await filterCtl(d.part0, name, 'changed', [{ sector: 8, sectors: 2 }]);
    await expect(filterCtl(d.part0, name, 'changed', [{ sector: d.part0.nrSects, sectors: 1 }])).rejects.toThrow(/inside 0\.\./);
    await expect(filterCtl(d.part0, name, 'changed', [{ sector: 0.5, sectors: 1 }])).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(filterCtl(d.part0, name, 'forged')).rejects.toThrow(/ctx\.snapshotTaken/);
    await detachFilter(d.part0, name);
    await detachFilter(other.part0, name);
    off();
    expect(events).toEqual([
      'hello:announcer@mine',
      'snapshot-taken:announcer@mine',
      'ranges-changed:announcer@mine',
      'frozen@mine',
      'thawed@mine',
      'detached:announcer@mine',
      'frozen@other',
      'thawed@other',
      'detached:announcer@other',
    ]);
    expect(seen.mine).toEqual(['hello', `taken:${d.part0.name}:s1`, 'changed:8+2', 'frozen']);
    expect(seen.other).toEqual(['frozen']);
  });

  it('delivers a snapshot of several devices to the filters of each, and refuses unknown devices', async () => {
    const a = disk();
    const b = disk();
    const got: string[] = [];
    const name = register({
      name: 'taker2',
      apiVersion: 2,
      attach: (ctx) => ({
        onSnapshotTaken: (data) => got.push(`${ctx.bdev.name}<-${data.devices.length}`),
        ctl: { take: (devs) => ctx.snapshotTaken({ devices: devs as string[] }) },
      }),
    });
    await attachFilter(a.part0, name, { altitude: 1 });
    await attachFilter(b.part0, name, { altitude: 1 });
    await filterCtl(a.part0, name, 'take', [a.part0.name, b.part0.name]);
    expect(got.sort()).toEqual([`${a.part0.name}<-2`, `${b.part0.name}<-2`].sort());
    await expect(filterCtl(a.part0, name, 'take', ['no-such-device'])).rejects.toThrow(/"no-such-device", which is not a known device/);
    await expect(filterCtl(a.part0, name, 'take', [])).rejects.toBeInstanceOf(InvalidArgumentError);
    await detachFilter(a.part0, name);
    await detachFilter(b.part0, name);
  });
});

describe('freeze', () => {
  it('makes new bios wait, NOWAIT bios get AGAIN, and in-flight bios drain first', async () => {
    const d = disk(1 << 20, true);
    const inflight = submitBioWait(Bio.write(d.part0, 0, Buffer.alloc(512, 4)));
    let waited: Promise<void> | null = null;
    let nowait: Bio | null = null;
    await withFrozenDevices([d.part0], async () => {
      expect(d.part0.inflight).toBe(0); // the write before the freeze has completed
      waited = submitBioWait(Bio.write(d.part0, 0, Buffer.alloc(512, 5)));
      nowait = Bio.write(d.part0, 8, Buffer.alloc(512, 6), ReqFlag.NOWAIT);
      await submitBioWait(nowait).catch(() => {});
      expect((nowait as Bio).status).toBe(BlkStatus.AGAIN);
      let waitedDone = false;
      void waited.then(() => (waitedDone = true));
      // Turns of the event loop, not a time: a write that could complete would have by now.
      for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
      expect(waitedDone).toBe(false);
    });
    await inflight;
    await waited;
    expect((await blkdevRead(d.part0, 0, 512))[0]).toBe(5);
    expect(d.part0.filter).toBeNull();
  });

  it('gives up with ETIMEDOUT when a filter never releases a bio, and thaws unchanged', async () => {
    const d = disk();
    const held: Bio[] = [];
    await attachFilter(d.part0, register({ name: 'hoarder', apiVersion: 2, attach: () => ({ write: (b: Bio) => (held.push(b), FilterVerdict.TAKEN) }) }), { altitude: 9 });
    const w = submitBioWait(Bio.write(d.part0, 0, Buffer.alloc(512)));
    await expect(attachFilter(d.part0, register(logger('late', [])), { altitude: 1, timeoutMs: 30 })).rejects.toBeInstanceOf(FreezeTimeoutError);
    expect(listFilters(d.part0).map((f) => f.name)).toEqual(['hoarder']);
    const r = await blkdevRead(d.part0, 0, 512); // reads flow: the device thawed
    expect(r.length).toBe(512);
    bioEndio(held[0] as Bio);
    await w;
  });
});

describe('freeze and partitions', () => {
  it('sees the disk drained when a partition filter resubmits its last bio into the frozen disk', async () => {
    const d = disk(8 << 20);
    await writeMbr(d, [[2048, 4096]]);
    const p1 = d.partition(1);
    if (p1 === undefined) throw new Error('no partition');
    // Holds the partition write until the disk is frozen, then resubmits it into the frozen disk.
    let held: (() => void) | null = null;
    const off = onFilterEvent((e: FilterEvent) => {
      if (e.type !== 'frozen' || e.device !== d.part0.name || held === null) return;
      setImmediate(held);
      held = null;
    });
    const defer = register({
      name: 'defer-p',
      apiVersion: 2,
      attach: () => ({ write: (bio: Bio, next: FilterNext) => ((held = () => next.submit(bio)), FilterVerdict.TAKEN) }),
    });
    await attachFilter(p1, defer, { altitude: 1 });
    const w = submitBioWait(Bio.write(p1, 0, Buffer.alloc(4096, 1)));
    // A freeze that misses the resubmitted bio never sees the disk drained: FreezeTimeoutError.
    await attachFilter(d.part0, register(logger('late-pass', [])), { altitude: 1, timeoutMs: 2000 });
    off();
    expect(held).toBeNull();
    await w;
  });
});

describe('under load', () => {
  it('loses no bio and completes none twice while filters come and go', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    const SIZE = 256 * 1024;
    const d = disk(SIZE, true);
    const model = Buffer.alloc(SIZE);
    // A filter that takes writes and sends them on later, asynchronously.
    const deferrer = register({
      name: 'deferrer',
      apiVersion: 2,
      attach: () => ({
        write(bio: Bio, next: FilterNext): FilterVerdict {
          setImmediate(() => next.submit(bio));
          return FilterVerdict.TAKEN;
        },
      }),
    });
    const pass = register(logger('passer', []));
    const names = [deferrer, pass];
    let stop = false;
    let seed = 42;
    const rnd = (m: number): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % m;
    };
    const changer = (async () => {
      let changes = 0;
      while (!stop) {
        const name = names[rnd(2)] as string;
        const attached = listFilters(d.part0).some((f) => f.name === name);
        if (attached && rnd(3) === 0) await setFilterAltitude(d.part0, name, 100 + rnd(50) * 2 + (name === pass ? 1 : 0));
        else if (attached) await detachFilter(d.part0, name);
        else await attachFilter(d.part0, name, { altitude: 100 + rnd(50) * 2 + (name === pass ? 1 : 0) });
        changes++;
        for (let t = rnd(3); t > 0; t--) await new Promise((r) => setImmediate(r));
      }
      return changes;
    })();
    // Each submitter owns its own blocks, so the model is exact whatever the interleaving.
    const submitter = async (id: number): Promise<number> => {
      let ios = 0;
      for (let i = 0; i < 300; i++) {
        const block = id + 4 * rnd(SIZE / 4096 / 4);
        const off = block * 4096;
        if (rnd(2) === 0) {
          const data = Buffer.alloc(4096, (id * 50 + i) & 0xff);
          await blkdevWrite(d.part0, off, data);
          data.copy(model, off);
        } else {
          const got = await blkdevRead(d.part0, off, 4096);
          expect(Buffer.compare(got, model.subarray(off, off + 4096))).toBe(0);
        }
        ios++;
      }
      return ios;
    };
    const ios = await Promise.all([0, 1, 2, 3].map(submitter));
    stop = true;
    const changes = await changer;
    expect(ios.reduce((a, b) => a + b)).toBe(1200);
    expect(changes).toBeGreaterThan(10);
    expect(Buffer.compare(await blkdevRead(d.part0, 0, SIZE), model)).toBe(0);
    tracker.assertAllCompleted();
    expect(d.part0.inflight).toBe(0);
    void submitBio;
  });
});
