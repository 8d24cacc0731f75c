import type { BlockBackend } from './backend.js';
import { SECTOR_SHIFT, SECTOR_SIZE, type Bio } from './bio.js';
import { DeviceBusyError, DeviceExistsError, InvalidArgumentError, NoSuchDeviceError } from './errors.js';
import { IoStats } from './iostats.js';
import { readPartitionTable } from './partitions/index.js';
import type { PartitionInfo, PartitionTable } from './partitions/types.js';
import { HwQueue } from './queue.js';

/** Limits every bio to a disk is checked against (the kernel's `queue_limits`). */
export interface QueueLimits {
  /** Smallest addressable unit: 512 or 4096 bytes. Bio sector and size must be multiples. */
  readonly logicalBlockSize: 512 | 4096;
  /** Smallest unit the device writes without read-modify-write. */
  readonly physicalBlockSize: number;
  /** Most 512-byte sectors one READ or WRITE bio may carry. */
  readonly maxSectors: number;
  /** Most data segments (BioVecs) one bio may carry. */
  readonly maxSegments: number;
  /** Discard works in units of this many bytes (smaller discards may do nothing). */
  readonly discardGranularity: number;
  /** Most sectors one DISCARD bio may cover (0: discard unsupported). */
  readonly maxDiscardSectors: number;
  /** Most sectors one WRITE_ZEROES bio may cover (0: unsupported). */
  readonly maxWriteZeroesSectors: number;
}

/**
 * The filter registry's hook on a device (the kernel's `bd_filter`). The block layer calls
 * `submitBio` for each bio to a device that has one; it returns true when it took the bio
 * (the hook then owns it and must complete or resubmit it), false to let it go on.
 */
export interface BioFilterHook {
  submitBio(bio: Bio): boolean;
}

/** Options of {@link createDisk}. */
export interface DiskOptions {
  /** Unique device name (`'disk0'`, `'vda'`); partitions are named after it. */
  readonly name: string;
  /** Where the data lives. */
  readonly backend: BlockBackend;
  /** 512 (default) or 4096; at least the backend's `minIoSize`. */
  readonly logicalBlockSize?: 512 | 4096;
  /** Defaults to the logical block size. */
  readonly physicalBlockSize?: number;
  /** Refuse writes to the whole disk and its partitions (also forced by a read-only backend). */
  readonly readOnly?: boolean;
  /** Overrides of the default limits. */
  readonly limits?: Partial<Omit<QueueLimits, 'logicalBlockSize' | 'physicalBlockSize'>>;
  /** Hardware queues: interrupt-driven (default 1) and polled (default 1). */
  readonly queues?: { readonly interrupt?: number; readonly poll?: number };
  /** Read the partition table when the disk is created (default true). */
  readonly scanPartitions?: boolean;
}

/** Default limits: 4 MiB per READ/WRITE bio, 256 segments, discard and zeroing up to 4 GiB - 512. */
export const DEFAULT_LIMITS = {
  maxSectors: 8192,
  maxSegments: 256,
  maxDiscardSectors: 8_388_607,
  maxWriteZeroesSectors: 8_388_607,
} as const;

/**
 * A block device as bios address it: a whole disk (partno 0) or one partition of it (the
 * kernel's `block_device`). Bios to a partition are remapped to the whole disk on submission.
 */
export class BlockDev {
  /** The disk this device is, or is a partition of. */
  readonly disk: Disk;
  /** 0 for the whole disk, else the partition number. */
  readonly partno: number;
  /** `'disk0'`, `'disk0p1'`, `'sda1'`. */
  readonly name: string;
  /** First sector on the whole disk (0 for the disk itself). */
  readonly startSect: number;
  /** Length in 512-byte sectors. */
  nrSects: number;
  /** Refuses writes (bios complete with IOERR and an EROFS error). */
  readOnly: boolean;
  /**
   * Used as swap: every bio to it is handled as in a no-I/O scope (`bioNeedsNoio`), so filters
   * serve it from reserves instead of allocating in ways that could need I/O.
   */
  swap: boolean;
  /** The filter registry's hook, or null: with none, submission costs one null check. */
  filter: BioFilterHook | null;
  /** The table entry this partition came from; null for a whole disk. */
  readonly info: PartitionInfo | null;
  /**
   * Bios submitted to this device (for a disk: also to its partitions) and not yet completed,
   * counted from `submitBio` to end-io, whatever filters or queues hold them meanwhile.
   */
  inflight: number;
  /** Called after every completion that lowers `inflight` (the registry waits on it to freeze). */
  inflightWatcher: (() => void) | null;
  /**
   * I/O accounting ({@link BlockDev.enableStats}), or null: off by default, when completion
   * costs one null check. A disk's counters include its partitions' I/O.
   */
  stats: IoStats | null;

  constructor(disk: Disk, partno: number, name: string, startSect: number, nrSects: number, info: PartitionInfo | null) {
    this.disk = disk;
    this.partno = partno;
    this.name = name;
    this.startSect = startSect;
    this.nrSects = nrSects;
    this.readOnly = false;
    this.swap = false;
    this.filter = null;
    this.info = info;
    this.inflight = 0;
    this.inflightWatcher = null;
    this.stats = null;
  }

  /**
   * Turns on I/O accounting for this device (idempotent) and returns its counters. Bios
   * submitted from now on are timed with `performance.now()` at submission and counted at
   * completion; bios already in flight are counted without a latency.
   */
  enableStats(): IoStats {
    return (this.stats ??= new IoStats());
  }

  /** @internal a bio entered this device (submitBio). */
  startIo(): void {
    this.inflight++;
    if (this.partno !== 0) this.disk.part0.inflight++;
  }

  /** @internal a bio that entered this device completed. */
  endIo(): void {
    this.inflight--;
    if (this.inflightWatcher !== null) this.inflightWatcher();
    if (this.partno !== 0) {
      const part0 = this.disk.part0;
      part0.inflight--;
      if (part0.inflightWatcher !== null) part0.inflightWatcher();
    }
  }

  /** Size in bytes. */
  get sizeBytes(): number {
    return this.nrSects * SECTOR_SIZE;
  }

  /** True for a partition, false for a whole disk. */
  get isPartition(): boolean {
    return this.partno !== 0;
  }
}

const devices = new Map<string, BlockDev>();

/**
 * A disk: a backend, its limits, its hardware queues and its partitions (the kernel's
 * `gendisk`). Create with {@link createDisk}; remove with {@link Disk.remove}.
 */
export class Disk {
  readonly name: string;
  readonly backend: BlockBackend;
  readonly limits: QueueLimits;
  /** The whole disk as a block device. */
  readonly part0: BlockDev;
  /** Every hardware queue: interrupt queues first, then poll queues. A cookie indexes this. */
  readonly queues: readonly HwQueue[];
  /** Bios dispatched to the backend and not yet completed by it. */
  inflight = 0;
  /** Set by {@link Disk.remove}: new bios complete with `BlkStatus.OFFLINE`. */
  removed = false;
  private parts: BlockDev[] = [];
  private table: PartitionTable | null = null;
  private readonly nInterrupt: number;
  private readonly nPoll: number;
  private rrInterrupt = 0;
  private rrPoll = 0;
  private drainWaiters: Array<() => void> | null = null;

  /** @internal use {@link createDisk}. */
  constructor(options: DiskOptions, limits: QueueLimits, capacitySectors: number) {
    this.name = options.name;
    this.backend = options.backend;
    this.limits = limits;
    this.part0 = new BlockDev(this, 0, options.name, 0, capacitySectors, null);
    this.part0.readOnly = options.readOnly === true || options.backend.readOnly;
    this.nInterrupt = options.queues?.interrupt ?? 1;
    this.nPoll = options.queues?.poll ?? 1;
    const queues: HwQueue[] = [];
    for (let i = 0; i < this.nInterrupt; i++) queues.push(new HwQueue(this, queues.length, false));
    for (let i = 0; i < this.nPoll; i++) queues.push(new HwQueue(this, queues.length, true));
    this.queues = queues;
  }

  /** Capacity in 512-byte sectors. */
  get capacity(): number {
    return this.part0.nrSects;
  }

  /** The partitions found by the last scan, by partition number. */
  get partitions(): readonly BlockDev[] {
    return this.parts;
  }

  /** The partition table found by the last scan, or null (none, or not scanned). */
  get partitionTable(): PartitionTable | null {
    return this.table;
  }

  /** Partition `partno`, or undefined. */
  partition(partno: number): BlockDev | undefined {
    return this.parts.find((p) => p.partno === partno);
  }

  /** @internal the interrupt queue for the next bio (round robin). */
  nextQueue(): HwQueue {
    if (this.nInterrupt === 1) return this.queues[0] as HwQueue;
    const q = this.queues[this.rrInterrupt] as HwQueue;
    this.rrInterrupt = (this.rrInterrupt + 1) % this.nInterrupt;
    return q;
  }

  /** @internal the poll queue for the next POLLED bio, or null when the disk has none. */
  nextPollQueue(): HwQueue | null {
    if (this.nPoll === 0) return null;
    const q = this.queues[this.nInterrupt + this.rrPoll] as HwQueue;
    this.rrPoll = (this.rrPoll + 1) % this.nPoll;
    return q;
  }

  /** @internal called by a queue when the backend completed a bio. */
  endInflight(): void {
    if (--this.inflight === 0 && this.drainWaiters !== null) {
      const waiters = this.drainWaiters;
      this.drainWaiters = null;
      for (const w of waiters) w();
    }
  }

  /** Resolves when no bio is in flight on the backend (new ones may still arrive). */
  drain(): Promise<void> {
    if (this.inflight === 0) return Promise.resolve();
    return new Promise((resolve) => {
      (this.drainWaiters ??= []).push(resolve);
    });
  }

  /**
   * Reads the partition table anew (the kernel's `BLKRRPART`) and replaces the partitions.
   * Fails with {@link DeviceBusyError} while a partition has a filter attached. Returns the
   * table, or null when the disk has none.
   */
  async rescanPartitions(): Promise<PartitionTable | null> {
    const busy = this.parts.find((p) => p.filter !== null);
    if (busy) {
      throw new DeviceBusyError(`cannot rescan partitions of "${this.name}": "${busy.name}" has a filter attached; detach it first`);
    }
    const table = await readPartitionTable(this.part0);
    for (const p of this.parts) devices.delete(p.name);
    this.table = table;
    this.parts = [];
    if (table === null) return null;
    const base = /\d$/.test(this.name) ? `${this.name}p` : this.name;
    for (const info of table.partitions) {
      // The kernel gives an extended partition a device of one block (at least 2 sectors):
      // enough for its EBR, too small to clobber the logical partitions inside.
      const ebrSectors = Math.max(this.limits.logicalBlockSize / SECTOR_SIZE, 2);
      const size = info.kind === 'extended' ? Math.min(info.size, ebrSectors) : info.size;
      const part = new BlockDev(this, info.partno, `${base}${info.partno}`, info.start, size, info);
      part.readOnly = this.part0.readOnly;
      this.parts.push(part);
      devices.set(part.name, part);
    }
    return table;
  }

  /**
   * Marks the whole disk (and its partitions) read-only or writable again. A read-only backend
   * cannot be made writable.
   */
  setReadOnly(readOnly: boolean): void {
    if (!readOnly && this.backend.readOnly) {
      throw new InvalidArgumentError(`"${this.name}" cannot be made writable: its backend (${this.backend.description}) is read-only`);
    }
    this.part0.readOnly = readOnly;
    for (const p of this.parts) p.readOnly = readOnly;
  }

  /**
   * Removes the disk (the kernel's `del_gendisk`): new bios complete with OFFLINE, bios in
   * flight finish, then the backend is closed and the name is free again.
   */
  async remove(): Promise<void> {
    if (this.removed) return;
    this.removed = true;
    await this.drain();
    devices.delete(this.name);
    for (const p of this.parts) devices.delete(p.name);
    await this.backend.close();
  }
}

/**
 * Creates and registers a disk over `backend`, and (unless `scanPartitions: false`) reads its
 * partition table. Throws {@link DeviceExistsError} for a taken name and
 * {@link InvalidArgumentError} for bad geometry or limits.
 */
export async function createDisk(options: DiskOptions): Promise<Disk> {
  const disk = createDiskSync(options);
  if (options.scanPartitions !== false) {
    try {
      await disk.rescanPartitions();
    } catch (err) {
      await disk.remove();
      throw err;
    }
  }
  return disk;
}

/**
 * Creates and registers a disk without reading its partition table (call
 * `disk.rescanPartitions()` later if it has one).
 */
export function createDiskSync(options: DiskOptions): Disk {
  const { name, backend } = options;
  if (typeof name !== 'string' || !/^[A-Za-z0-9_.:-]{1,64}$/.test(name)) {
    throw new InvalidArgumentError(`disk name ${JSON.stringify(name)} is not valid: use 1-64 letters, digits, '_', '.', ':' or '-'`);
  }
  if (devices.has(name)) throw new DeviceExistsError(`a block device named "${name}" already exists; remove it or pick another name`);
  const lbs = options.logicalBlockSize ?? (backend.minIoSize > SECTOR_SIZE ? 4096 : 512);
  if (lbs !== 512 && lbs !== 4096) {
    throw new InvalidArgumentError(`logical block size ${String(lbs)} of "${name}" is not supported: use 512 or 4096`);
  }
  if (lbs < backend.minIoSize) {
    throw new InvalidArgumentError(`logical block size ${lbs} of "${name}" is smaller than its backend's minimum I/O size ${backend.minIoSize} (${backend.description})`);
  }
  const pbs = options.physicalBlockSize ?? lbs;
  if (!isPowerOfTwo(pbs) || pbs < lbs) {
    throw new InvalidArgumentError(`physical block size ${pbs} of "${name}" must be a power of two >= the logical block size ${lbs}`);
  }
  const capacitySectors = Math.floor(backend.sizeBytes / lbs) * (lbs >> SECTOR_SHIFT);
  if (capacitySectors <= 0) {
    throw new InvalidArgumentError(`backend ${backend.description} of "${name}" holds ${backend.sizeBytes} bytes: a disk needs at least one ${lbs}-byte block`);
  }
  const l = options.limits ?? {};
  const lbsSectors = lbs >> SECTOR_SHIFT;
  const limits: QueueLimits = Object.freeze({
    logicalBlockSize: lbs,
    physicalBlockSize: pbs,
    maxSectors: checkLimit(name, 'maxSectors', l.maxSectors ?? DEFAULT_LIMITS.maxSectors, lbsSectors),
    maxSegments: checkLimit(name, 'maxSegments', l.maxSegments ?? DEFAULT_LIMITS.maxSegments, 1),
    discardGranularity: l.discardGranularity ?? lbs,
    maxDiscardSectors: backend.capabilities.discard ? (l.maxDiscardSectors ?? DEFAULT_LIMITS.maxDiscardSectors) : 0,
    maxWriteZeroesSectors: backend.capabilities.writeZeroes ? (l.maxWriteZeroesSectors ?? DEFAULT_LIMITS.maxWriteZeroesSectors) : 0,
  });
  if (!isPowerOfTwo(limits.discardGranularity) || limits.discardGranularity < lbs) {
    throw new InvalidArgumentError(`discardGranularity ${limits.discardGranularity} of "${name}" must be a power of two >= ${lbs}`);
  }
  const nInt = options.queues?.interrupt ?? 1;
  const nPoll = options.queues?.poll ?? 1;
  if (!Number.isInteger(nInt) || nInt < 1 || !Number.isInteger(nPoll) || nPoll < 0 || nInt + nPoll > 256) {
    throw new InvalidArgumentError(`queues of "${name}": expected at least 1 interrupt queue, 0 or more poll queues, at most 256 in all; got ${nInt} + ${nPoll}`);
  }
  const disk = new Disk(options, limits, capacitySectors);
  devices.set(name, disk.part0);
  return disk;
}

function checkLimit(name: string, what: string, value: number, min: number): number {
  if (!Number.isInteger(value) || value < min) {
    throw new InvalidArgumentError(`${what} of "${name}" must be a whole number >= ${min}; got ${value}`);
  }
  return value;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** The registered device (disk or partition) named `name`, or undefined. */
export function findBlockDevice(name: string): BlockDev | undefined {
  return devices.get(name);
}

/** The registered device named `name`; throws {@link NoSuchDeviceError} listing the known ones. */
export function getBlockDevice(name: string): BlockDev {
  const dev = devices.get(name);
  if (dev === undefined) {
    const known = [...devices.keys()].sort().join(', ') || 'none';
    throw new NoSuchDeviceError(`no block device named "${name}" (known: ${known})`);
  }
  return dev;
}

/** Every registered device, disks and partitions, sorted by name. */
export function listBlockDevices(): BlockDev[] {
  return [...devices.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}
