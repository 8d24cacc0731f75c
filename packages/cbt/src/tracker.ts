import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { InvalidArgumentError, SECTOR_SIZE, type Bio, type BlockDev } from '@blkfilter/bio';
import { FilterVerdict, type FilterContext, type FilterCtlHandler, type FilterEvent, type FilterInstance } from '@blkfilter/registry';
import { CbtNoSnapshotError, CbtStateError } from './errors.js';
import { cbtGeometry, cbtGeometryAfterResize } from './geometry.js';
import { encodeState, readStateFile, rewriteStateHeader, writeStateFileAtomic, type CbtState } from './state.js';
import {
  CBT_EVENT_MARK_DIRTY,
  CBT_EVENT_SNAPSHOT_TAKEN,
  CBT_MAX_CHANGES_NUMBER,
  CbtGenerationReason,
  FullCopyReason,
  type CbtInfo,
  type CbtOptions,
  type CbtSectorRange,
  type ChangedExtentsResult,
} from './types.js';

/**
 * The CBT of one device: the active map (one byte per block: the changes number in which the
 * block last changed), the read map frozen at the last take, and the generation they belong to.
 * It is the filter instance itself, so the registry binds its op methods once, not per bio.
 */
export class CbtTracker implements FilterInstance {
  readonly ctl: Readonly<Record<string, FilterCtlHandler>>;
  private readonly bdev: BlockDev;
  private readonly userBlockSize: number | undefined;
  private readonly stateFile: string | null;
  private blockSize: number;
  private blockSectors: number;
  private blockCount: number;
  /** Sectors the map covers; a device whose `nrSects` differs was resized under it. */
  private capacity: number;
  private map: Uint8Array;
  /** Allocated at the first take only; meaningful while `snapNumber > 0`. */
  private readMap: Uint8Array | null = null;
  private active = 1;
  private snapNumber = 0;
  private generationId: string;
  private snapGenerationId: string | null = null;
  private snapshotId: string | null = null;
  private reason: CbtGenerationReason = CbtGenerationReason.NEW;
  /** Why the map can no longer be trusted; the next take or query starts a new generation. */
  private untrusted: string | null = null;
  /** Attach runs frozen; the registry's `thawed` event for this device ends it. */
  private frozen = true;
  private detaching = false;
  private changedWhileDetaching = false;

  constructor(bdev: BlockDev, blockSize: number | undefined, stateFile: string | null) {
    this.bdev = bdev;
    this.userBlockSize = blockSize;
    this.stateFile = stateFile;
    const geo = cbtGeometry(bdev.name, bdev.nrSects, bdev.disk.limits.logicalBlockSize, blockSize);
    this.blockSize = geo.blockSize;
    this.blockSectors = geo.blockSize / SECTOR_SIZE;
    this.blockCount = geo.blockCount;
    this.capacity = bdev.nrSects;
    this.map = new Uint8Array(geo.blockCount);
    this.generationId = randomUUID();
    this.ctl = Object.freeze({
      info: () => this.info(),
      map: (args: unknown) => this.readMapRange(args),
      extents: (args: unknown) => this.changedExtents(args),
      'mark-dirty': (args: unknown) => this.markDirty(args),
      reset: () => this.reset(),
    });
  }

  // --- the data path ----------------------------------------------------------------------------

  /** Marks at submission, before the write reaches the device: a write that later fails is still counted. */
  write(bio: Bio): FilterVerdict {
    if (bio.size !== 0) this.mark(bio.sector, bio.size / SECTOR_SIZE);
    return FilterVerdict.PASS;
  }

  /** A discard changes what reads return: counted like a write. */
  discard(bio: Bio): FilterVerdict {
    if (bio.size !== 0) this.mark(bio.sector, bio.size / SECTOR_SIZE);
    return FilterVerdict.PASS;
  }

  /** Counted like a write. */
  writeZeroes(bio: Bio): FilterVerdict {
    if (bio.size !== 0) this.mark(bio.sector, bio.size / SECTOR_SIZE);
    return FilterVerdict.PASS;
  }

  private mark(sector: number, sectors: number): void {
    const first = Math.floor(sector / this.blockSectors);
    let end = Math.floor((sector + sectors - 1) / this.blockSectors) + 1;
    if (end > this.blockCount) {
      // The device grew under the map: what lies past its end cannot be tracked.
      this.untrusted ??= 'a write past the end of the map (the device grew)';
      end = this.blockCount;
      if (first >= end) return;
    }
    // The active number is the largest in the map, so max(map[i], active) is a plain store;
    // most writes touch one block, where a store beats fill()'s call.
    if (end - first === 1) this.map[first] = this.active;
    else this.map.fill(this.active, first, end);
  }

  // --- events ----------------------------------------------------------------------------------

  /** Follows freezes of its device, switches generation at takes, marks ranges dirty on request. */
  onEvent(event: FilterEvent): void {
    const type = event.type;
    if (type === CBT_EVENT_SNAPSHOT_TAKEN) this.onSnapshotTaken(event.data);
    else if (event.device !== this.bdev.name) return;
    else if (type === 'frozen') this.frozen = true;
    else if (type === 'thawed') this.frozen = false;
    else if (type === CBT_EVENT_MARK_DIRTY) this.onMarkDirty(event.data);
  }

  private onSnapshotTaken(data: unknown): void {
    const devices = (data as { devices?: unknown } | null | undefined)?.devices;
    if (this.detaching) this.changedWhileDetaching = true;
    if (!Array.isArray(devices)) {
      // Cannot tell whether this device was in the take; the map may now be behind one.
      this.untrusted ??= `a malformed "${CBT_EVENT_SNAPSHOT_TAKEN}" event (data.devices is not an array)`;
      return;
    }
    if (!devices.includes(this.bdev.name)) return;
    const id = (data as { snapshotId?: unknown }).snapshotId;
    this.take(typeof id === 'string' ? id : null);
  }

  private onMarkDirty(data: unknown): void {
    // The device is frozen during detach, but events are not: a save under way would miss this.
    if (this.detaching) this.changedWhileDetaching = true;
    const ranges = (data as { ranges?: unknown } | null | undefined)?.ranges;
    const problem = Array.isArray(ranges) ? this.checkRanges(ranges) : 'data.ranges is not an array';
    if (problem !== null) {
      // Some change went unrecorded: never claim the map is complete.
      this.untrusted ??= `a malformed "${CBT_EVENT_MARK_DIRTY}" event (${problem})`;
      return;
    }
    this.markBoth(ranges as CbtSectorRange[]);
  }

  // --- generations -----------------------------------------------------------------------------

  /**
   * The snapshot take: freeze a copy of the map for readers, then move the active number on.
   * Past 255 the map is cleared under a new generation id; the copy keeps the old one.
   */
  private take(snapshotId: string | null): void {
    this.revalidate();
    let rm = this.readMap;
    if (rm === null || rm.length !== this.blockCount) rm = this.readMap = new Uint8Array(this.blockCount);
    rm.set(this.map);
    this.snapNumber = this.active;
    this.snapGenerationId = this.generationId;
    this.snapshotId = snapshotId;
    if (this.active === CBT_MAX_CHANGES_NUMBER) {
      this.map.fill(0);
      this.generationId = randomUUID();
      this.reason = CbtGenerationReason.OVERFLOW;
      this.active = 1;
    } else {
      this.active++;
    }
    if (!this.frozen) {
      // Bios in flight across the take were marked with the old number and may land after it:
      // the next incremental could miss them.
      this.untrusted ??= `a "${CBT_EVENT_SNAPSHOT_TAKEN}" event while "${this.bdev.name}" was not frozen (emit it inside withFrozenDevices)`;
    }
  }

  /** Resets when the device was resized or the map stopped being trustworthy (blksnap checks at take; we also check at queries). */
  private revalidate(): void {
    if (this.bdev.nrSects !== this.capacity) this.newGeneration(CbtGenerationReason.RESIZE);
    else if (this.untrusted !== null) this.newGeneration(CbtGenerationReason.CORRUPTED);
  }

  /** Clears the map (and drops the read map) under a new generation id. */
  private newGeneration(reason: CbtGenerationReason): void {
    if (this.bdev.nrSects !== this.capacity) {
      const geo = cbtGeometryAfterResize(this.bdev.nrSects, this.bdev.disk.limits.logicalBlockSize, this.userBlockSize);
      this.capacity = this.bdev.nrSects;
      this.blockSize = geo.blockSize;
      this.blockSectors = geo.blockSize / SECTOR_SIZE;
      this.blockCount = geo.blockCount;
      this.map = new Uint8Array(geo.blockCount);
      this.readMap = null;
    } else {
      this.map.fill(0);
    }
    this.generationId = randomUUID();
    this.active = 1;
    this.snapNumber = 0;
    this.snapGenerationId = null;
    this.snapshotId = null;
    this.untrusted = null;
    this.reason = reason;
  }

  // --- control commands --------------------------------------------------------------------------

  /** ctl `info`. */
  info(): CbtInfo {
    this.revalidate();
    return {
      capacity: this.capacity,
      blockSize: this.blockSize,
      blockCount: this.blockCount,
      generationId: this.generationId,
      changesNumber: this.active,
      snapNumber: this.snapNumber,
      snapGenerationId: this.snapGenerationId,
      snapshotId: this.snapshotId,
      generationReason: this.reason,
      stateFile: this.stateFile,
      memoryBytes: this.map.byteLength + (this.readMap?.byteLength ?? 0),
    };
  }

  /** ctl `map`: a copy of blocks `[offset, offset + length)` of the read map. */
  readMapRange(args: unknown): Uint8Array {
    this.revalidate();
    const { offset, length } = (args ?? {}) as { offset?: unknown; length?: unknown };
    if (!isCount(offset) || !isCount(length) || offset + length > this.blockCount) {
      throw new InvalidArgumentError(
        `CBT map range of "${this.bdev.name}": expected { offset, length } as whole numbers of blocks within its ${this.blockCount} blocks; got offset ${String(offset)}, length ${String(length)}`,
      );
    }
    const rm = this.readMap;
    if (this.snapNumber === 0 || rm === null) {
      throw new CbtNoSnapshotError(
        `no snapshot was taken on "${this.bdev.name}" in generation ${this.generationId}, so there is no read map yet; take a snapshot first`,
      );
    }
    return rm.slice(offset, offset + length);
  }

  /** ctl `extents`: the sector extents of blocks changed after take `since` of `generationId`. */
  changedExtents(args: unknown): ChangedExtentsResult {
    this.revalidate();
    const { since, generationId } = (args ?? {}) as { since?: unknown; generationId?: unknown };
    if (!isCount(since) || since > CBT_MAX_CHANGES_NUMBER || typeof generationId !== 'string') {
      throw new InvalidArgumentError(
        `CBT extents of "${this.bdev.name}": expected { since: 0..${CBT_MAX_CHANGES_NUMBER}, generationId: string } from a previous answer; got since ${String(since)}, generationId ${typeof generationId === 'string' ? generationId : typeof generationId}`,
      );
    }
    const snap = this.snapNumber;
    const rm = this.readMap;
    const full = (reason: FullCopyReason, message: string): ChangedExtentsResult => ({
      kind: 'full-copy-needed',
      reason,
      message,
      generationId: this.snapGenerationId,
      snapNumber: snap,
    });
    if (snap === 0 || rm === null) {
      return full(FullCopyReason.NO_SNAPSHOT, `no snapshot was taken on "${this.bdev.name}" in generation ${this.generationId} (${this.reason}); take one and copy the whole device`);
    }
    if (generationId !== this.snapGenerationId) {
      return full(
        FullCopyReason.GENERATION_CHANGED,
        `"${this.bdev.name}" is tracked in generation ${this.snapGenerationId}, not ${generationId} (the map was reset: ${this.reason}); copy the whole device`,
      );
    }
    if (since > snap) {
      return full(FullCopyReason.SINCE_AHEAD, `take ${since} is past the last take ${snap} of generation ${generationId} on "${this.bdev.name}"; copy the whole device`);
    }
    return {
      kind: 'extents',
      generationId,
      since,
      snapNumber: snap,
      snapshotId: this.snapshotId,
      blockSize: this.blockSize,
      extents: scanExtents(rm, this.blockCount, since, this.blockSectors, this.capacity),
    };
  }

  /** ctl `mark-dirty`: counts `ranges` as changed in the active map and in the read map (blksnap's CBTDIRTY). */
  markDirty(args: unknown): void {
    if (this.detaching) throw new CbtStateError(`CBT of "${this.bdev.name}" is being detached; ranges not marked`);
    this.revalidate();
    const ranges = Array.isArray(args) ? args : (args as { ranges?: unknown } | null | undefined)?.ranges;
    const problem = Array.isArray(ranges) ? this.checkRanges(ranges) : `expected { ranges: Array<{ sector, sectors }> }`;
    if (problem !== null) throw new InvalidArgumentError(`CBT mark-dirty on "${this.bdev.name}": ${problem}`);
    this.markBoth(ranges as CbtSectorRange[]);
  }

  /** ctl `reset`: a new generation id and an empty map. */
  reset(): CbtInfo {
    this.newGeneration(CbtGenerationReason.RESET);
    return this.info();
  }

  /** Null when every range is whole sectors within the map's capacity, else what is wrong. */
  private checkRanges(ranges: readonly unknown[]): string | null {
    for (const r of ranges) {
      const { sector, sectors } = (r ?? {}) as { sector?: unknown; sectors?: unknown };
      if (!isCount(sector) || !isCount(sectors) || sector + sectors > this.capacity) {
        return `range { sector: ${String(sector)}, sectors: ${String(sectors)} } is not whole sectors within the ${this.capacity} sectors of "${this.bdev.name}"`;
      }
    }
    return null;
  }

  private markBoth(ranges: readonly CbtSectorRange[]): void {
    const rm = this.snapNumber > 0 ? this.readMap : null;
    for (const { sector, sectors } of ranges) {
      if (sectors === 0) continue;
      const first = Math.floor(sector / this.blockSectors);
      const end = Math.floor((sector + sectors - 1) / this.blockSectors) + 1;
      this.map.fill(this.active, first, end);
      // So a backup in progress from the last take copies them too (blksnap's cbt_map_set_both).
      if (rm !== null) rm.fill(this.snapNumber, first, end);
    }
  }

  // --- persistence --------------------------------------------------------------------------------

  private state(clean: boolean): CbtState {
    const hasRead = this.snapNumber > 0 && this.readMap !== null;
    return {
      blockSize: this.blockSize,
      blockCount: this.blockCount,
      capacity: this.capacity,
      startSect: this.bdev.startSect,
      generationId: this.generationId,
      changesNumber: this.active,
      snapNumber: hasRead ? this.snapNumber : 0,
      snapGenerationId: hasRead ? this.snapGenerationId : null,
      clean,
      map: this.map,
      readMap: hasRead ? this.readMap : null,
    };
  }

  /**
   * At attach, while the device is frozen: resume a clean state file of the same geometry, else
   * keep the new generation; then mark the file dirty (fsync'd) before any write can happen,
   * so that a crash from now on is seen at the next attach.
   */
  async load(): Promise<void> {
    const file = this.stateFile;
    if (file === null) return;
    const s = await readStateFile(file);
    let resumed = false;
    if ('problem' in s) {
      this.reason = s.problem === 'missing' ? CbtGenerationReason.NEW : CbtGenerationReason.STATE_INVALID;
    } else if (!s.clean) {
      this.reason = CbtGenerationReason.UNCLEAN_SHUTDOWN;
    } else if (s.blockSize !== this.blockSize || s.blockCount !== this.blockCount || s.capacity !== this.capacity || s.startSect !== this.bdev.startSect) {
      this.reason = CbtGenerationReason.GEOMETRY_CHANGED;
    } else {
      this.map = s.map;
      this.readMap = s.readMap;
      this.active = s.changesNumber;
      this.snapNumber = s.snapNumber;
      this.generationId = s.generationId;
      this.snapGenerationId = s.snapGenerationId;
      this.reason = CbtGenerationReason.RESUMED;
      resumed = true;
    }
    try {
      // A resumed file already holds these maps: rewriting its header in place is enough.
      if (resumed) await rewriteStateHeader(file, this.state(false));
      else await writeStateFileAtomic(file, this.state(false));
    } catch (err) {
      throw new CbtStateError(
        `cannot mark the CBT state file "${file}" of "${this.bdev.name}" as in use (${String(err)}); without it a crash would go unnoticed. Make its directory writable, choose another stateFile, or pass stateFile: false`,
        { cause: err },
      );
    }
  }

  /** The registry's detach hook (device frozen and drained): saves the map with the clean flag. */
  async detach(): Promise<void> {
    this.detaching = true;
    const file = this.stateFile;
    if (file === null) return;
    const saved = encodeState(this.state(true));
    try {
      await writeStateFileAtomic(file, saved);
      // An event that changed the map arrived while the file was written: it must not be trusted.
      if (this.changedWhileDetaching) await writeStateFileAtomic(file, this.state(false));
    } catch (err) {
      throw new CbtStateError(
        `CBT of "${this.bdev.name}" could not be saved to "${file}" (${String(err)}); the next attach will start a new generation and need a full copy`,
        { cause: err },
      );
    }
  }
}

function isCount(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

/**
 * Merged sector extents of the blocks whose value is above `since` in a CBT map (block `i` at
 * sector `i * blockSectors`, the last extent clipped to `capacity` sectors): one pass over the
 * bytes, no object per block, only per extent. Pure; the NBD server reads dirty bitmaps with it.
 */
export function scanExtents(map: Uint8Array, blockCount: number, since: number, blockSectors: number, capacity: number): CbtSectorRange[] {
  const out: CbtSectorRange[] = [];
  let i = 0;
  while (i < blockCount) {
    if ((map[i] as number) <= since) {
      i++;
      continue;
    }
    let j = i + 1;
    while (j < blockCount && (map[j] as number) > since) j++;
    const sector = i * blockSectors;
    out.push({ sector, sectors: Math.min(j * blockSectors, capacity) - sector });
    i = j + 1;
  }
  return out;
}

/**
 * Where the state lives by default: next to a file-backed disk's image (any backend with a
 * string `path`), none for others.
 */
export function defaultStateFile(bdev: BlockDev): string | null {
  const p = (bdev.disk.backend as { path?: unknown }).path;
  if (typeof p !== 'string' || p === '') return null;
  return bdev.partno === 0 ? `${p}.cbt` : `${p}.p${bdev.partno}.cbt`;
}

/** Attaches the CBT to the filter context's device (the filter definition's `attach`). */
export async function attachCbt(ctx: FilterContext, options: CbtOptions | undefined): Promise<CbtTracker> {
  const opts = (options ?? {}) as CbtOptions;
  if (typeof opts !== 'object' || opts === null) {
    throw new InvalidArgumentError(`CBT options for "${ctx.bdev.name}" must be an object like { blockSize?, stateFile? }; got ${String(options)}`);
  }
  const sf = opts.stateFile;
  if (sf !== undefined && sf !== false && (typeof sf !== 'string' || sf === '')) {
    throw new InvalidArgumentError(`CBT stateFile for "${ctx.bdev.name}" must be a path or false; got ${JSON.stringify(sf)}`);
  }
  const stateFile = sf === false ? null : sf === undefined ? defaultStateFile(ctx.bdev) : path.resolve(sf);
  const tracker = new CbtTracker(ctx.bdev, opts.blockSize, stateFile);
  await tracker.load();
  return tracker;
}
