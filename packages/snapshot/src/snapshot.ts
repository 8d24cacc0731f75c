import { randomUUID } from 'node:crypto';
import { findBlockDevice, getBlockDevice, InvalidArgumentError, type BlkError, type BlockDev, type Disk } from '@blkfilter/bio';
import {
  attachFilter,
  detachFilter,
  FILTER_API_VERSION,
  listFilters,
  listRegisteredFilters,
  registerFilter,
  withFrozenDevices,
  type FilterContext,
  type FilterDefinition,
  type FilterInstance,
  type SnapshotTakenData,
} from '@blkfilter/registry';
import { CopyQueue, SnapshotDevice, type SnapshotCore } from './cow.js';
import { createImageDisk } from './image.js';
import { DiffStorage, type DiffStorageOwner } from './diff-storage.js';
import { SnapshotBusyError, SnapshotCorruptedError, SnapshotNotFoundError, SnapshotStateError } from './errors.js';
import {
  SNAPSHOT_DEFAULT_ALTITUDE,
  SNAPSHOT_DEFAULT_CHUNK_SIZE,
  SNAPSHOT_DEFAULT_MAX_CONCURRENT_COPIES,
  SNAPSHOT_FILTER_NAME,
  SNAPSHOT_MAX_CHUNK_SIZE,
  SNAPSHOT_MAX_CONCURRENT_COPIES,
  SnapshotState,
  type AddDeviceOptions,
  type CreateSnapshotOptions,
  type DiffStorageUsage,
  type SnapshotEvent,
  type SnapshotInfo,
} from './types.js';

/** Events kept for `waitEvent` when nobody waits; older ones are dropped past this. */
const MAX_QUEUED_EVENTS = 1024;
/** Events kept for {@link SnapshotInfo.history}. */
const MAX_HISTORY = 64;

const live = new Map<string, Snapshot>();
/** Which snapshot each device is in: a device is in at most one at a time. */
const owners = new Map<BlockDev, Snapshot>();

/**
 * The `snapshot-cow` filter definition. Attached only by `Snapshot.addDevice` (its options are
 * the snapshot's per-device state); attaching it any other way fails with a clear error.
 */
const snapshotFilter: FilterDefinition<unknown> = Object.freeze<FilterDefinition<unknown>>({
  name: SNAPSHOT_FILTER_NAME,
  apiVersion: FILTER_API_VERSION,
  description: 'snapshot copy-on-write: saves the old data of a chunk before its first write after take',
  defaultAltitude: SNAPSHOT_DEFAULT_ALTITUDE,
  attach(ctx: FilterContext, options: unknown): FilterInstance {
    if (!(options instanceof SnapshotDevice)) {
      throw new InvalidArgumentError(
        `the ${SNAPSHOT_FILTER_NAME} filter cannot be attached with attachFilter(): use createSnapshot() and snapshot.addDevice("${ctx.bdev.name}")`,
      );
    }
    return options.bind(ctx);
  },
});

/**
 * Registers the `snapshot-cow` filter with the registry unless it is registered already.
 * `addDevice` calls it; importing this package registers nothing (it has no side effects).
 */
export function registerSnapshotFilter(): void {
  if (listRegisteredFilters().some((f) => f.name === SNAPSHOT_FILTER_NAME)) return;
  registerFilter(snapshotFilter);
}

interface EventWaiter {
  resolve: (event: SnapshotEvent) => void;
  timer: NodeJS.Timeout;
}

/** The snapshot's state behind its public face; the devices and the storage talk to it. */
class Core implements SnapshotCore, DiffStorageOwner {
  readonly id: string;
  readonly chunkSize: number;
  readonly copyQueue: CopyQueue;
  storage!: DiffStorage;
  corruptedError: SnapshotCorruptedError | null = null;
  destroying = false;
  state: SnapshotState = SnapshotState.CREATED;
  error: BlkError | null = null;
  readonly devices: SnapshotDevice[] = [];
  readonly createdAt = Date.now();
  takenAt: number | null = null;
  readonly events: SnapshotEvent[] = [];
  readonly history: SnapshotEvent[] = [];
  readonly waiters: EventWaiter[] = [];

  constructor(id: string, chunkSize: number, maxCopies: number) {
    this.id = id;
    this.chunkSize = chunkSize;
    this.copyQueue = new CopyQueue(maxCopies, chunkSize);
  }

  /** Marks the snapshot corrupted (once): CoW stops everywhere, image bios fail, the event is queued. */
  corrupt(error: BlkError, device: string | null): void {
    if (this.corruptedError !== null || this.state === SnapshotState.DESTROYED) return;
    this.error = error;
    this.corruptedError = new SnapshotCorruptedError(
      `snapshot ${this.id} is corrupted (${error.message}); its images cannot be read any more: destroy it and take a new one`,
      { cause: error },
    );
    if (this.state === SnapshotState.TAKEN) this.state = SnapshotState.CORRUPTED;
    for (const d of this.devices) d.deactivate();
    this.storage.dropWaiters();
    this.push({ type: 'corrupted', time: Date.now(), device, error });
  }

  onLowSpace(usage: DiffStorageUsage, requestedBytes: number): void {
    this.push({ type: 'low-space', time: Date.now(), ...usage, requestedBytes });
  }

  onExtended(usage: DiffStorageUsage): void {
    this.push({ type: 'storage-extended', time: Date.now(), ...usage });
  }

  onFailed(error: BlkError, device: string | null): void {
    this.corrupt(error, device);
  }

  push(event: SnapshotEvent): void {
    if (this.history.length >= MAX_HISTORY) this.history.shift();
    this.history.push(event);
    const w = this.waiters.shift();
    if (w !== undefined) {
      clearTimeout(w.timer);
      w.resolve(event);
      return;
    }
    if (this.events.length >= MAX_QUEUED_EVENTS) this.events.shift();
    this.events.push(event);
  }

  info(): SnapshotInfo {
    const s = this.storage;
    return {
      id: this.id,
      state: this.state,
      chunkSize: this.chunkSize,
      devices: this.devices.map((d) => ({
        device: d.name,
        image: d.image !== null && !d.image.removed ? d.image.name : null,
        chunks: d.chunkCount,
        copiedChunks: d.copiedChunks,
      })),
      images: this.devices.flatMap((d) => (d.image !== null && !d.image.removed ? [d.image.name] : [])),
      storage: { kind: s.kind, path: s.dir, stepBytes: s.stepBytes, ...s.usage() },
      error: this.error,
      createdAt: this.createdAt,
      takenAt: this.takenAt,
      history: [...this.history],
    };
  }
}

/**
 * A point-in-time snapshot of one or more devices (blksnap's snapshot): add devices, take it
 * (all devices at one frozen instant), read (and write) its images, destroy it. Create with
 * {@link createSnapshot}. Control calls on one snapshot run one at a time.
 */
export class Snapshot {
  /** The snapshot's id, a UUID. */
  readonly id: string;
  /** The copy-on-write chunk size in bytes. */
  readonly chunkSize: number;
  readonly #core: Core;
  #ops: Promise<unknown> = Promise.resolve();

  /** @internal use {@link createSnapshot}; the argument is internal state. */
  constructor(core: unknown) {
    if (!(core instanceof Core)) throw new InvalidArgumentError('use createSnapshot() to create a Snapshot');
    this.#core = core;
    this.id = core.id;
    this.chunkSize = core.chunkSize;
  }

  /** The lifecycle state: created, taken, corrupted or destroyed. */
  get state(): SnapshotState {
    return this.#core.state;
  }

  /** Runs control operations of this snapshot one after another. */
  #serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#ops.then(fn, fn);
    this.#ops = run.catch(() => {});
    return run;
  }

  /**
   * Adds a disk or partition (by name or BlockDev) to the snapshot (blksnap's SNAPSHOT_ADD):
   * attaches the copy-on-write filter to it through the registry (a freeze of that device),
   * registering the filter first if needed. Throws {@link SnapshotBusyError} (EBUSY) when the
   * device is in a snapshot already, {@link SnapshotStateError} after take,
   * `InvalidArgumentError` when the chunk size is smaller than the device's logical block size,
   * `NoSuchDeviceError` for an unknown name.
   */
  addDevice(device: string | BlockDev, options: AddDeviceOptions = {}): Promise<void> {
    return this.#serial(async () => {
      const core = this.#core;
      if (core.state !== SnapshotState.CREATED || core.destroying) {
        throw new SnapshotStateError(`cannot add a device to snapshot ${this.id}: it is ${core.destroying ? 'being destroyed' : core.state}; devices are added before take(), so create a new snapshot`);
      }
      const bdev = typeof device === 'string' ? getBlockDevice(device) : device;
      const other = owners.get(bdev);
      if (other !== undefined) {
        throw new SnapshotBusyError(
          other === this
            ? `"${bdev.name}" is already in snapshot ${this.id}: add each device once`
            : `"${bdev.name}" is already in snapshot ${other.id}: a device can be in one snapshot at a time; destroy that snapshot first`,
        );
      }
      if (listFilters(bdev).some((f) => f.name === SNAPSHOT_FILTER_NAME)) {
        throw new SnapshotBusyError(`"${bdev.name}" already has the ${SNAPSHOT_FILTER_NAME} filter attached (by another copy of @blkfilter/snapshot?); detach it first`);
      }
      const lbs = bdev.disk.limits.logicalBlockSize;
      if (core.chunkSize < lbs) {
        throw new InvalidArgumentError(
          `chunk size ${core.chunkSize} of snapshot ${this.id} is smaller than the ${lbs}-byte logical block size of "${bdev.name}": create the snapshot with chunkSize >= ${lbs}`,
        );
      }
      const imageName = options.imageName ?? null;
      if (imageName !== null) checkImageName(imageName, core);
      registerSnapshotFilter();
      const dev = new SnapshotDevice(core, bdev, core.chunkSize, imageName);
      owners.set(bdev, this);
      try {
        await attachFilter(bdev, SNAPSHOT_FILTER_NAME, { options: dev });
      } catch (err) {
        owners.delete(bdev);
        throw err;
      }
      core.devices.push(dev);
    });
  }

  /**
   * Takes the snapshot (blksnap's SNAPSHOT_TAKE): freezes all its devices together (in-flight
   * bios drain, new ones wait), flushes their write caches (a failed flush fails the take), and
   * at that instant starts copy-on-write, creates the image
   * disks and emits the registry event `snapshot-taken` (`{ devices, snapshotId }`) from the
   * CoW filter, so that CBT switches its generation at the same instant; then thaws. Whole-disk
   * images get their partitions scanned. Throws {@link SnapshotStateError} when not in the
   * created state or with no device, {@link SnapshotBusyError} when an image name is taken.
   */
  take(): Promise<void> {
    return this.#serial(async () => {
      const core = this.#core;
      if (core.state !== SnapshotState.CREATED || core.destroying) {
        throw new SnapshotStateError(`cannot take snapshot ${this.id}: it is ${core.destroying ? 'being destroyed' : core.state}; a snapshot is taken once`);
      }
      if (core.devices.length === 0) throw new SnapshotStateError(`cannot take snapshot ${this.id}: it has no device; addDevice() first`);
      const devs = core.devices;
      const names = pickImageNames(devs);
      // Allocated before the freeze: the frozen instant should be short.
      const maps = devs.map((d) => new Uint8Array(d.chunkCount));
      const data: SnapshotTakenData = { devices: devs.map((d) => d.name), snapshotId: this.id };
      await withFrozenDevices(
        devs.map((d) => d.bdev),
        async () => {
          // What the image shows must be on stable storage: a write acknowledged before the
          // take but lost from a volatile cache in a power cut would otherwise be in the backup
          // and not on the device, and CBT (which counted it before this take) would never
          // report it again. Flushed below the CoW filter: the devices are frozen.
          await Promise.all(devs.map((d) => d.flushBelow()));
          const created: Disk[] = [];
          try {
            for (let i = 0; i < devs.length; i++) {
              const dev = devs[i] as SnapshotDevice;
              const image = createImageDisk(dev, names[i] as string);
              created.push(image);
              dev.activate(maps[i] as Uint8Array, image);
            }
          } catch (err) {
            for (const d of devs) d.deactivate();
            for (const disk of created) await disk.remove();
            for (const d of devs) d.image = null;
            throw err;
          }
          core.state = SnapshotState.TAKEN;
          core.takenAt = Date.now();
          (devs[0] as SnapshotDevice).ctx?.snapshotTaken(data);
        },
      );
      for (const d of devs) {
        const image = d.image;
        if (image === null || d.bdev.isPartition || core.corruptedError !== null) continue;
        try {
          await image.rescanPartitions();
        } catch (err) {
          // The original's table is what it is; an unreadable one leaves the image without partitions.
          if ((err as BlkError).code !== 'EBADPT' && (err as BlkError).code !== 'EIO') throw err;
        }
      }
    });
  }

  /**
   * The image device of `device` (a name or BlockDev of an original device in this snapshot).
   * Throws {@link SnapshotStateError} before take or after destroy, `InvalidArgumentError`
   * for a device not in the snapshot.
   */
  image(device: string | BlockDev): BlockDev {
    const core = this.#core;
    const name = typeof device === 'string' ? device : device.name;
    const dev = core.devices.find((d) => d.name === name);
    if (dev === undefined) {
      throw new InvalidArgumentError(`"${name}" is not in snapshot ${this.id} (devices: ${core.devices.map((d) => d.name).join(', ') || 'none'})`);
    }
    if (dev.image === null || dev.image.removed) {
      throw new SnapshotStateError(`snapshot ${this.id} has no image of "${name}": it is ${core.state}; images exist from take() to destroy()`);
    }
    return dev.image.part0;
  }

  /** The snapshot's state, devices, images, chunk size, storage use and error (blksnap's SNAPSHOTINFO). */
  info(): SnapshotInfo {
    return this.#core.info();
  }

  /**
   * Resolves with the next event of this snapshot (blksnap's SNAPSHOT_WAIT_EVENT): queued
   * events first, in order; else the next one within `timeoutMs`, else a `timeout` event.
   * After destroy, resolves with a `destroyed` event at once.
   */
  waitEvent(options: { timeoutMs: number }): Promise<SnapshotEvent> {
    const timeoutMs = options.timeoutMs;
    if (!(typeof timeoutMs === 'number' && timeoutMs >= 0 && timeoutMs <= 2 ** 31 - 1)) {
      throw new InvalidArgumentError(`waitEvent timeoutMs ${String(timeoutMs)} is not valid: expected milliseconds from 0 to ${2 ** 31 - 1}`);
    }
    const core = this.#core;
    const queued = core.events.shift();
    if (queued !== undefined) return Promise.resolve(queued);
    if (core.state === SnapshotState.DESTROYED) return Promise.resolve({ type: 'destroyed', time: Date.now() });
    return new Promise((resolve) => {
      const waiter: EventWaiter = {
        resolve,
        timer: setTimeout(() => {
          const i = core.waiters.indexOf(waiter);
          if (i >= 0) core.waiters.splice(i, 1);
          resolve({ type: 'timeout', time: Date.now(), timeoutMs });
        }, timeoutMs),
      };
      core.waiters.push(waiter);
    });
  }

  /**
   * Destroys the snapshot (blksnap's SNAPSHOT_DESTROY): removes the images (their in-flight
   * bios finish; new ones complete with OFFLINE), detaches the CoW filters (held writes go on),
   * frees the diff storage (files removed). Other filters on the devices, such as CBT, stay.
   * Idempotent. May reject with the registry's `FreezeTimeoutError`; call it again then.
   */
  destroy(): Promise<void> {
    return this.#serial(async () => {
      const core = this.#core;
      if (core.state === SnapshotState.DESTROYED) return;
      core.destroying = true;
      for (const d of core.devices) if (d.image !== null) await d.image.remove();
      for (const d of core.devices) {
        if (listFilters(d.bdev).some((f) => f.name === SNAPSHOT_FILTER_NAME)) await detachFilter(d.bdev, SNAPSHOT_FILTER_NAME);
        d.deactivate();
      }
      for (const d of core.devices) await d.idle();
      core.copyQueue.clear();
      await core.storage.close();
      for (const d of core.devices) if (owners.get(d.bdev) === this) owners.delete(d.bdev);
      live.delete(this.id);
      core.state = SnapshotState.DESTROYED;
      core.destroying = false;
      core.push({ type: 'destroyed', time: Date.now() });
      // Later waits answer `destroyed` at once; keep no queue nobody will read.
      for (const w of core.waiters.splice(0)) {
        clearTimeout(w.timer);
        w.resolve({ type: 'destroyed', time: Date.now() });
      }
      core.events.length = 0;
    });
  }
}

function checkImageName(name: string, core: Core): void {
  if (typeof name !== 'string' || !/^[A-Za-z0-9_.:-]{1,64}$/.test(name)) {
    throw new InvalidArgumentError(`image name ${JSON.stringify(name)} is not valid: use 1-64 letters, digits, '_', '.', ':' or '-'`);
  }
  if (findBlockDevice(name) !== undefined || core.devices.some((d) => d.requestedImageName === name)) {
    throw new SnapshotBusyError(`image name "${name}" is taken by another block device; choose another`);
  }
}

/** The image name of each device: the one asked for, or `<device>-snap<N>` with the lowest free N. */
function pickImageNames(devs: readonly SnapshotDevice[]): string[] {
  const chosen = new Set<string>();
  return devs.map((d) => {
    let name = d.requestedImageName;
    if (name !== null) {
      if (findBlockDevice(name) !== undefined) throw new SnapshotBusyError(`image name "${name}" for "${d.name}" is taken by another block device; choose another`);
    } else {
      for (let n = 0; ; n++) {
        name = `${d.name}-snap${n}`;
        if (findBlockDevice(name) === undefined && !chosen.has(name)) break;
      }
    }
    chosen.add(name);
    return name;
  });
}

/**
 * Creates a snapshot (blksnap's SNAPSHOT_CREATE) with its diff storage, whose first step is
 * allocated now (so a bad directory fails here, not at the first write; a memory step is also
 * mapped, up to 64 MiB of it, so the first writes after take do not page-fault). Add devices, then
 * take it. Throws `InvalidArgumentError` for a chunk size that is not a power of two from 512
 * to 64 MiB, a `maxConcurrentCopies` out of 1..4096 or bad storage options,
 * `DiffStorageIoError` when the directory is unusable.
 */
export async function createSnapshot(options: CreateSnapshotOptions): Promise<Snapshot> {
  const chunkSize = options?.chunkSize ?? SNAPSHOT_DEFAULT_CHUNK_SIZE;
  if (!Number.isSafeInteger(chunkSize) || chunkSize < 512 || chunkSize > SNAPSHOT_MAX_CHUNK_SIZE || (chunkSize & (chunkSize - 1)) !== 0) {
    throw new InvalidArgumentError(
      `snapshot chunkSize ${String(chunkSize)} is not valid: expected a power of two from 512 to ${SNAPSHOT_MAX_CHUNK_SIZE} bytes, at least the devices' logical block size (default ${SNAPSHOT_DEFAULT_CHUNK_SIZE})`,
    );
  }
  const maxCopies = options?.maxConcurrentCopies ?? SNAPSHOT_DEFAULT_MAX_CONCURRENT_COPIES;
  if (!Number.isSafeInteger(maxCopies) || maxCopies < 1 || maxCopies > SNAPSHOT_MAX_CONCURRENT_COPIES) {
    throw new InvalidArgumentError(
      `snapshot maxConcurrentCopies ${String(maxCopies)} is not valid: expected a whole number from 1 to ${SNAPSHOT_MAX_CONCURRENT_COPIES} (default ${SNAPSHOT_DEFAULT_MAX_CONCURRENT_COPIES})`,
    );
  }
  const core = new Core(randomUUID(), chunkSize, maxCopies);
  core.storage = await DiffStorage.create(options.storage, chunkSize, core.id, core);
  const snapshot = new Snapshot(core);
  live.set(core.id, snapshot);
  return snapshot;
}

/** The state of every snapshot not yet destroyed, oldest first (blksnap's SNAPSHOT_COLLECT). */
export function listSnapshots(): SnapshotInfo[] {
  return [...live.values()].map((s) => s.info());
}

/** The live snapshot with id `id`; throws {@link SnapshotNotFoundError} listing the known ids. */
export function getSnapshot(id: string): Snapshot {
  const s = live.get(id);
  if (s === undefined) {
    throw new SnapshotNotFoundError(`no snapshot with id "${id}" (live: ${[...live.keys()].join(', ') || 'none'}); it may have been destroyed`);
  }
  return s;
}
