import { findBlockDevice, InvalidArgumentError, submitBio, type BlockDev, type Disk } from '@blkfilter/bio';
import {
  FILTER_API_MIN_VERSION,
  FILTER_API_VERSION,
  type AttachedFilterInfo,
  type FilterContext,
  type FilterDefinition,
  type FilterEvent,
} from './api.js';
import {
  FilterAlreadyAttachedError,
  FilterApiVersionError,
  FilterBusyError,
  FilterExistsError,
  FilterNotFoundError,
  FreezeTimeoutError,
  UnknownCtlCommandError,
} from './errors.js';
import { FilterEventType, type SectorRange, type SnapshotTakenData } from './events.js';
import { AttachedFilter, installStack, resolveDevice, stackOf, uninstallIfEmpty, type DeviceStack } from './stack.js';

/** Default time to wait for in-flight bios to drain before a stack change gives up. */
export const DEFAULT_FREEZE_TIMEOUT_MS = 30_000;

const definitions = new Map<string, FilterDefinition<never>>();
const attachedAll = new Set<AttachedFilter>();
const listeners = new Set<(event: FilterEvent) => void>();
const diskLocks = new WeakMap<Disk, Promise<void>>();

// --- locking, freezing -------------------------------------------------------------------------

/** Runs `fn` with the disk's stack-change lock: one freeze at a time per disk, partitions included. */
async function withDiskLock<T>(disks: Disk[], fn: () => Promise<T>): Promise<T> {
  const unique = [...new Set(disks)].sort((a, b) => (a.name < b.name ? -1 : 1));
  const releases: Array<() => void> = [];
  try {
    for (const disk of unique) {
      const prev = diskLocks.get(disk) ?? Promise.resolve();
      let release!: () => void;
      const mine = new Promise<void>((r) => (release = r));
      diskLocks.set(disk, prev.then(() => mine));
      await prev;
      releases.push(release);
    }
    return await fn();
  } finally {
    for (const r of releases) r();
  }
}

function drained(stack: DeviceStack): boolean {
  return stack.bdev.inflight - stack.held.length === 0;
}

/** Closes the gate and waits until every bio that entered the device before it has completed. */
function freeze(stack: DeviceStack, timeoutMs: number): Promise<void> {
  stack.frozen = true;
  emit({ type: FilterEventType.FROZEN, device: stack.bdev.name });
  if (drained(stack)) return Promise.resolve();
  const bdev = stack.bdev;
  return new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      bdev.inflightWatcher = null;
      reject(
        new FreezeTimeoutError(
          `"${bdev.name}" did not drain within ${timeoutMs} ms: ${bdev.inflight - stack.held.length} bio(s) still in flight (a filter holding bios, or polled bios nobody polls); nothing was changed`,
        ),
      );
    }, timeoutMs);
    bdev.inflightWatcher = () => {
      if (!drained(stack)) return;
      bdev.inflightWatcher = null;
      clearTimeout(timer);
      resolve();
    };
  });
}

/** Opens the gate and resubmits, in order, the bios that waited. */
function thaw(stack: DeviceStack): void {
  stack.frozen = false;
  const held = stack.held;
  stack.held = [];
  uninstallIfEmpty(stack);
  emit({ type: FilterEventType.THAWED, device: stack.bdev.name });
  for (const bio of held) submitBio(bio);
}

/**
 * Freezes `devices` together (new bios wait, NOWAIT ones get AGAIN; bios in flight drain), runs
 * `fn` at that instant, then thaws them. For work that must see the devices still, such as
 * taking a snapshot of several devices at once. `fn` may do I/O through filters' `next`.
 */
export async function withFrozenDevices<T>(
  devices: ReadonlyArray<string | BlockDev>,
  fn: () => T | Promise<T>,
  options: { timeoutMs?: number } = {},
): Promise<T> {
  const bdevs = [...new Set(devices.map(resolveDevice))];
  const timeoutMs = options.timeoutMs ?? DEFAULT_FREEZE_TIMEOUT_MS;
  return withDiskLock(
    bdevs.map((b) => b.disk),
    async () => {
      const stacks = bdevs.map(installStack);
      const frozen: DeviceStack[] = [];
      try {
        for (const s of stacks) {
          frozen.push(s);
          await freeze(s, timeoutMs);
        }
        return await fn();
      } finally {
        for (const s of frozen) thaw(s);
        for (const s of stacks) uninstallIfEmpty(s);
      }
    },
  );
}

// --- registration -----------------------------------------------------------------------------

/**
 * Registers a filter by name (like loading a kernel module). Throws
 * {@link FilterApiVersionError} for an API version this registry does not support and
 * {@link FilterExistsError} for a taken name.
 */
export function registerFilter<Options>(definition: FilterDefinition<Options>): void {
  const { name, apiVersion } = definition;
  if (typeof name !== 'string' || !/^[A-Za-z0-9_.-]{1,64}$/.test(name)) {
    throw new InvalidArgumentError(`filter name ${JSON.stringify(name)} is not valid: use 1-64 letters, digits, '_', '.' or '-'`);
  }
  if (!Number.isInteger(apiVersion) || apiVersion < FILTER_API_MIN_VERSION || apiVersion > FILTER_API_VERSION) {
    throw new FilterApiVersionError(
      `filter "${name}" was built for filter API v${String(apiVersion)}; this registry supports v${FILTER_API_MIN_VERSION} to v${FILTER_API_VERSION}`,
    );
  }
  if (typeof definition.attach !== 'function') throw new InvalidArgumentError(`filter "${name}" has no attach() function`);
  if (definitions.has(name)) throw new FilterExistsError(`a filter named "${name}" is already registered`);
  definitions.set(name, definition as FilterDefinition<never>);
}

/** Unregisters a filter; throws {@link FilterBusyError} while it is attached to any device. */
export function unregisterFilter(name: string): void {
  if (!definitions.has(name)) throw new FilterNotFoundError(`no filter named "${name}" is registered`);
  const users = [...attachedAll].filter((a) => a.name === name);
  if (users.length > 0) throw new FilterBusyError(`filter "${name}" is still attached (${users.length} device(s)); detach it first`);
  definitions.delete(name);
}

/** The registered filters: name, API version, description. */
export function listRegisteredFilters(): Array<{ name: string; apiVersion: number; description: string }> {
  return [...definitions.values()]
    .map((d) => ({ name: d.name, apiVersion: d.apiVersion, description: d.description ?? '' }))
    .sort((a, b) => (a.name < b.name ? -1 : 1));
}

// --- attach, detach, reorder -------------------------------------------------------------------

/** Options of {@link attachFilter}. */
export interface AttachOptions<Options = unknown> {
  /** Position in the stack: higher altitudes see bios first. Defaults to the filter's `defaultAltitude`. */
  readonly altitude?: number;
  /** Passed to the filter's `attach`. */
  readonly options?: Options;
  /** How long to wait for in-flight bios to drain (default 30 s). */
  readonly timeoutMs?: number;
}

/**
 * Attaches a registered filter to a disk or partition, live: the device is frozen, in-flight
 * bios drain, the filter joins the stack at its altitude, the device thaws. Throws
 * {@link FilterNotFoundError} (ENOENT) for an unknown filter, {@link FilterAlreadyAttachedError}
 * (EALREADY) when it is attached there already, {@link FilterBusyError} (EBUSY) when another
 * filter holds the altitude, {@link FreezeTimeoutError} when the device does not drain.
 */
export async function attachFilter<Options = unknown>(
  device: string | BlockDev,
  filterName: string,
  options: AttachOptions<Options> = {},
): Promise<AttachedFilterInfo> {
  const bdev = resolveDevice(device);
  const def = definitions.get(filterName);
  if (def === undefined) {
    const known = [...definitions.keys()].sort().join(', ') || 'none';
    throw new FilterNotFoundError(`no filter named "${filterName}" is registered (registered: ${known})`);
  }
  const altitude = options.altitude ?? def.defaultAltitude;
  if (altitude === undefined || !Number.isSafeInteger(altitude)) {
    throw new InvalidArgumentError(`attach "${filterName}" to "${bdev.name}": give a whole-number altitude (the filter has no default)`);
  }
  return withDiskLock([bdev.disk], async () => {
    const existing = stackOf(bdev);
    if (existing?.find(filterName)) {
      throw new FilterAlreadyAttachedError(`filter "${filterName}" is already attached to "${bdev.name}"`);
    }
    const clash = existing?.filters.find((f) => f.altitude === altitude);
    if (clash) {
      throw new FilterBusyError(`altitude ${altitude} on "${bdev.name}" is taken by filter "${clash.name}"; choose another`);
    }
    const stack = installStack(bdev);
    try {
      await freeze(stack, options.timeoutMs ?? DEFAULT_FREEZE_TIMEOUT_MS);
      const att = new AttachedFilter(stack, def, altitude);
      // Join the stack (passing everything) first, so the filter's own I/O during attach
      // already starts below it.
      stack.filters.push(att);
      stack.restack();
      try {
        const ctx: FilterContext = {
          bdev,
          name: def.name,
          get altitude() {
            return att.altitude;
          },
          next: att.next,
          snapshotTaken: (data) => announceSnapshotTaken(bdev, def.name, data),
          rangesChanged: (ranges) => announceRangesChanged(bdev, def.name, ranges),
          emit: (type, data) => emitCustom(bdev, def.name, type, data),
        };
        const instance = await def.attach(ctx, options.options as never);
        if (typeof instance !== 'object' || instance === null) {
          throw new InvalidArgumentError(`filter "${filterName}" attach() returned ${String(instance)}, not a filter instance`);
        }
        att.bind(instance);
        attachedAll.add(att);
      } catch (err) {
        stack.filters = stack.filters.filter((f) => f !== att);
        stack.restack();
        throw err;
      }
    } finally {
      if (stack.frozen) thaw(stack);
      uninstallIfEmpty(stack);
    }
    emit({ type: FilterEventType.ATTACHED, device: bdev.name, filter: filterName, data: { altitude } });
    return { name: filterName, altitude, apiVersion: def.apiVersion };
  });
}

/**
 * Detaches a filter, live: freeze, drain (so the filter holds no bio), the filter's `detach`
 * hook, removal, thaw. Throws {@link FilterNotFoundError} when it is not attached there.
 */
export async function detachFilter(device: string | BlockDev, filterName: string, options: { timeoutMs?: number } = {}): Promise<void> {
  const bdev = resolveDevice(device);
  await withDiskLock([bdev.disk], async () => {
    const stack = stackOf(bdev);
    const att = stack?.find(filterName);
    if (stack === null || att === undefined) {
      throw new FilterNotFoundError(`filter "${filterName}" is not attached to "${bdev.name}" (attached: ${describeStack(stack)})`);
    }
    try {
      await freeze(stack, options.timeoutMs ?? DEFAULT_FREEZE_TIMEOUT_MS);
      try {
        await att.instance?.detach?.('detach');
      } finally {
        stack.filters = stack.filters.filter((f) => f !== att);
        stack.restack();
        attachedAll.delete(att);
      }
    } finally {
      if (stack.frozen) thaw(stack);
      uninstallIfEmpty(stack);
    }
  });
  emit({ type: FilterEventType.DETACHED, device: bdev.name, filter: filterName });
}

/** Moves an attached filter to another altitude (freeze, reorder, thaw). */
export async function setFilterAltitude(device: string | BlockDev, filterName: string, altitude: number, options: { timeoutMs?: number } = {}): Promise<void> {
  const bdev = resolveDevice(device);
  if (!Number.isSafeInteger(altitude)) throw new InvalidArgumentError(`altitude ${altitude} must be a whole number`);
  await withDiskLock([bdev.disk], async () => {
    const stack = stackOf(bdev);
    const att = stack?.find(filterName);
    if (stack === null || att === undefined) {
      throw new FilterNotFoundError(`filter "${filterName}" is not attached to "${bdev.name}" (attached: ${describeStack(stack)})`);
    }
    const clash = stack.filters.find((f) => f !== att && f.altitude === altitude);
    if (clash) throw new FilterBusyError(`altitude ${altitude} on "${bdev.name}" is taken by filter "${clash.name}"`);
    try {
      await freeze(stack, options.timeoutMs ?? DEFAULT_FREEZE_TIMEOUT_MS);
      att.altitude = altitude;
      stack.restack();
    } finally {
      if (stack.frozen) thaw(stack);
    }
  });
  emit({ type: FilterEventType.REORDERED, device: bdev.name, filter: filterName, data: { altitude } });
}

/** The filters attached to a device, in the order bios meet them (highest altitude first). */
export function listFilters(device: string | BlockDev): AttachedFilterInfo[] {
  const stack = stackOf(resolveDevice(device));
  return (stack?.filters ?? []).map((f) => ({ name: f.name, altitude: f.altitude, apiVersion: f.apiVersion }));
}

function describeStack(stack: DeviceStack | null): string {
  const names = stack?.filters.map((f) => `${f.name}@${f.altitude}`) ?? [];
  return names.length > 0 ? names.join(', ') : 'none';
}

// --- control channel and events ------------------------------------------------------------------

/**
 * Sends a control command to a filter attached to a device (like `BLKFILTER_CTL`) and returns
 * its answer. Throws {@link FilterNotFoundError} when the filter is not attached there and
 * {@link UnknownCtlCommandError} (ENOTTY) for a command it does not have.
 */
export async function filterCtl(device: string | BlockDev, filterName: string, cmd: string, args?: unknown): Promise<unknown> {
  const bdev = resolveDevice(device);
  const stack = stackOf(bdev);
  const att = stack?.find(filterName);
  if (att === undefined || att.instance === null) {
    throw new FilterNotFoundError(`filter "${filterName}" is not attached to "${bdev.name}" (attached: ${describeStack(stack)})`);
  }
  const commands = att.instance.ctl ?? {};
  const handler = Object.hasOwn(commands, cmd) ? commands[cmd] : undefined;
  if (handler === undefined) {
    const known = Object.keys(commands).sort().join(', ') || 'none';
    throw new UnknownCtlCommandError(`filter "${filterName}" on "${bdev.name}" has no command "${cmd}" (commands: ${known})`);
  }
  return await handler(args);
}

/** Subscribes to every filter event on every device; returns the unsubscribe function. */
export function onFilterEvent(listener: (event: FilterEvent) => void): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

/**
 * Delivers a registry event about `event.device`: to global listeners, then to the filters of
 * that device only (a filter learns about its own device; nothing is broadcast to every stack).
 */
function emit(event: FilterEvent): void {
  notifyListeners(event);
  const stack = stackOfName(event.device);
  if (stack === null) return;
  for (const f of stack.filters) {
    const inst = f.instance;
    if (inst === null || inst.onEvent === undefined) continue;
    try {
      inst.onEvent(event);
    } catch (err) {
      reportListenerError(err);
    }
  }
}

function notifyListeners(event: FilterEvent): void {
  for (const l of listeners) {
    try {
      l(event);
    } catch (err) {
      reportListenerError(err);
    }
  }
}

function stackOfName(name: string): DeviceStack | null {
  const bdev = findBlockDevice(name);
  return bdev === undefined ? null : stackOf(bdev);
}

const CONTRACT_TYPES: ReadonlySet<string> = new Set([FilterEventType.SNAPSHOT_TAKEN, FilterEventType.RANGES_CHANGED]);
const LIFECYCLE_TYPES: ReadonlySet<string> = new Set([
  FilterEventType.ATTACHED,
  FilterEventType.DETACHED,
  FilterEventType.FROZEN,
  FilterEventType.THAWED,
  FilterEventType.REORDERED,
]);

function emitCustom(bdev: BlockDev, filter: string, type: string, data: unknown): void {
  if (typeof type !== 'string' || type.length === 0) throw new InvalidArgumentError(`event type ${JSON.stringify(type)} must be a non-empty string`);
  if (CONTRACT_TYPES.has(type) || LIFECYCLE_TYPES.has(type)) {
    throw new InvalidArgumentError(
      `filter "${filter}" may not emit "${type}" as a custom event: it is the registry's own (use ctx.snapshotTaken / ctx.rangesChanged for the snapshot contract)`,
    );
  }
  emit({ type, device: bdev.name, filter, data });
}

function announceSnapshotTaken(from: BlockDev, filter: string, data: SnapshotTakenData): void {
  const devices: unknown = (data as SnapshotTakenData | null | undefined)?.devices;
  if (!Array.isArray(devices) || devices.length === 0) {
    throw new InvalidArgumentError(`filter "${filter}" announced a snapshot with no devices (data.devices must be a non-empty array of device names)`);
  }
  const stacks: Array<DeviceStack | null> = [];
  for (const name of devices) {
    if (typeof name !== 'string') throw new InvalidArgumentError(`filter "${filter}" announced a snapshot of ${JSON.stringify(name)}, not a device name`);
    const bdev = findBlockDevice(name);
    if (bdev === undefined) throw new InvalidArgumentError(`filter "${filter}" announced a snapshot of "${name}", which is not a known device`);
    stacks.push(stackOf(bdev));
  }
  for (const stack of stacks) {
    if (stack === null) continue;
    for (const f of stack.filters) {
      const inst = f.instance;
      if (inst === null || inst.onSnapshotTaken === undefined) continue;
      try {
        inst.onSnapshotTaken(data);
      } catch (err) {
        reportListenerError(err);
      }
    }
  }
  notifyListeners({ type: FilterEventType.SNAPSHOT_TAKEN, device: from.name, filter, data });
}

function announceRangesChanged(bdev: BlockDev, filter: string, ranges: readonly SectorRange[]): void {
  if (!Array.isArray(ranges)) throw new InvalidArgumentError(`filter "${filter}" reported changed ranges of "${bdev.name}" that are not an array`);
  const capacity = bdev.nrSects;
  for (const r of ranges as readonly SectorRange[]) {
    const sector = (r as SectorRange | null)?.sector ?? NaN;
    const sectors = (r as SectorRange | null)?.sectors ?? NaN;
    if (!Number.isSafeInteger(sector) || !Number.isSafeInteger(sectors) || sector < 0 || sectors <= 0 || sector + sectors > capacity) {
      throw new InvalidArgumentError(
        `filter "${filter}" reported a changed range ${JSON.stringify(r)} of "${bdev.name}": expected whole sectors inside 0..${capacity}`,
      );
    }
  }
  const stack = stackOf(bdev);
  if (stack !== null) {
    for (const f of stack.filters) {
      const inst = f.instance;
      if (inst === null || inst.onRangesChanged === undefined) continue;
      try {
        inst.onRangesChanged(ranges);
      } catch (err) {
        reportListenerError(err);
      }
    }
  }
  if (listeners.size > 0) notifyListeners({ type: FilterEventType.RANGES_CHANGED, device: bdev.name, filter, data: { ranges } });
}

function reportListenerError(err: unknown): void {
  // A listener's bug must not break a stack change half way: report it outside.
  queueMicrotask(() => {
    throw err;
  });
}
