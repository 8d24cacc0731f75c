// A device's filter stack: the registry's hook on one device (its filters in altitude order
// and the freeze gate) and one attached filter's handler table. registry.ts changes stacks;
// this file only runs them.
import {
  bioClearPolled,
  bioEndioError,
  BlkStatus,
  getBlockDevice,
  NotSupportedError,
  opName,
  ReqFlag,
  ReqOp,
  submitBio,
  type Bio,
  type BioFilterHook,
  type BlockDev,
} from '@blkfilter/bio';
import { FilterVerdict, OPS_BY_API_VERSION, type FilterDefinition, type FilterInstance, type FilterNext, type FilterOpHandler } from './api.js';
import { DeviceFrozenError, FilterBusyError } from './errors.js';

// Handler tables are indexed by op number; every ReqOp is below this.
const OP_TABLE_SIZE = 16;
const OP_METHODS: ReadonlyArray<readonly [ReqOp, keyof FilterInstance]> = [
  [ReqOp.READ, 'read'],
  [ReqOp.WRITE, 'write'],
  [ReqOp.FLUSH, 'flush'],
  [ReqOp.DISCARD, 'discard'],
  [ReqOp.WRITE_ZEROES, 'writeZeroes'],
];

/** One filter on one device. */
export class AttachedFilter {
  readonly name: string;
  readonly apiVersion: number;
  altitude: number;
  /** Position in the stack (0 = highest altitude, sees bios first). */
  index = 0;
  instance: FilterInstance | null = null;
  /** Handler per op: the filter's, a NOTSUPP completer for ops its version never knew, or null (pass). */
  readonly handlers: Array<FilterOpHandler | null>;
  readonly next: StackNext;

  constructor(stack: DeviceStack, def: FilterDefinition<never>, altitude: number) {
    this.name = def.name;
    this.apiVersion = def.apiVersion;
    this.altitude = altitude;
    this.handlers = new Array<FilterOpHandler | null>(OP_TABLE_SIZE).fill(null);
    this.next = new StackNext(stack, this);
  }

  /** Fills the handler table from the instance: bound once here, never per bio. */
  bind(instance: FilterInstance): void {
    this.instance = instance;
    const known = OPS_BY_API_VERSION[this.apiVersion] ?? [];
    for (const [op, method] of OP_METHODS) {
      const fn = instance[method];
      if (!known.includes(op)) this.handlers[op] = notSupportedByVersion;
      else if (typeof fn === 'function') this.handlers[op] = (fn as FilterOpHandler).bind(instance);
      else this.handlers[op] = null;
    }
  }
}

export class StackNext implements FilterNext {
  constructor(
    private readonly stack: DeviceStack,
    readonly filter: AttachedFilter,
  ) {}

  submit(bio: Bio): void {
    // Below this filter on its own device; anywhere else it is an ordinary submission.
    bio.filterDepth = bio.bdev === this.stack.bdev ? this.filter.index + 1 : 0;
    submitBio(bio);
  }
}

function notSupportedByVersion(bio: Bio, next: FilterNext): FilterVerdict {
  const f = (next as StackNext).filter;
  bioEndioError(
    bio,
    BlkStatus.NOTSUPP,
    new NotSupportedError(
      `${opName(bio.op)} refused on "${bio.bdev.name}": filter "${f.name}" was built for filter API v${f.apiVersion}, which does not know ${opName(bio.op)}; upgrade the filter`,
    ),
  );
  return FilterVerdict.TAKEN;
}

/** The registry's hook on one device: its filters in altitude order, and the freeze gate. */
export class DeviceStack implements BioFilterHook {
  readonly bdev: BlockDev;
  filters: AttachedFilter[] = [];
  frozen = false;
  held: Bio[] = [];

  constructor(bdev: BlockDev) {
    this.bdev = bdev;
  }

  submitBio(bio: Bio): boolean {
    let i = bio.filterDepth;
    if (i === 0 && this.frozen) return this.hold(bio);
    const filters = this.filters;
    const n = filters.length;
    const op = bio.op;
    for (; i < n; i++) {
      const f = filters[i] as AttachedFilter;
      const h = f.handlers[op];
      if (h === null || h === undefined) continue;
      if (h(bio, f.next) !== FilterVerdict.PASS) {
        // The filter owns it now and may defer it: it must complete by interrupt.
        bioClearPolled(bio);
        return true;
      }
    }
    return false;
  }

  private hold(bio: Bio): boolean {
    if ((bio.flags & ReqFlag.NOWAIT) !== 0) {
      bioEndioError(bio, BlkStatus.AGAIN, new DeviceFrozenError(`"${this.bdev.name}" is frozen for a filter change; NOWAIT ${opName(bio.op)} not queued, retry`));
      return true;
    }
    bioClearPolled(bio);
    this.held.push(bio);
    // A bio parked here may be the last one the freeze waits for (a partition filter's
    // resubmission reaching the frozen disk): completions alone would never say so.
    const watcher = this.bdev.inflightWatcher;
    if (watcher !== null) watcher();
    return true;
  }

  find(name: string): AttachedFilter | undefined {
    return this.filters.find((f) => f.name === name);
  }

  restack(): void {
    this.filters.sort((a, b) => b.altitude - a.altitude);
    this.filters.forEach((f, i) => (f.index = i));
  }
}

export function stackOf(bdev: BlockDev): DeviceStack | null {
  return bdev.filter instanceof DeviceStack ? bdev.filter : null;
}

export function resolveDevice(device: string | BlockDev): BlockDev {
  return typeof device === 'string' ? getBlockDevice(device) : device;
}

export function installStack(bdev: BlockDev): DeviceStack {
  const existing = stackOf(bdev);
  if (existing !== null) return existing;
  if (bdev.filter !== null) {
    throw new FilterBusyError(`"${bdev.name}" already has a filter hook that is not this registry's`);
  }
  const stack = new DeviceStack(bdev);
  bdev.filter = stack;
  return stack;
}

export function uninstallIfEmpty(stack: DeviceStack): void {
  if (stack.filters.length === 0 && !stack.frozen && stack.bdev.filter === stack) stack.bdev.filter = null;
}

