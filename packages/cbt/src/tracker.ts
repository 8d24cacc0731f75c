import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { InvalidArgumentError, ReqFlag, SECTOR_SIZE, type Bio, type BlockDev } from '@blkfilter/bio';
import {
  FilterEventType,
  FilterVerdict,
  type FilterContext,
  type FilterCtlHandler,
  type FilterEvent,
  type FilterInstance,
  type FilterNext,
  type SectorRange,
  type SnapshotTakenData,
} from '@blkfilter/registry';
import { CbtNoSnapshotError, CbtStateError } from './errors.js';
import { cbtGeometry, cbtGeometryAfterResize } from './geometry.js';
import { CbtMapState } from './map-state.js';
import { CbtPersistence } from './persistence.js';
import { nodeStateIo, type CbtStateIo } from './state-io.js';
import {
  CBT_MAX_CHANGES_NUMBER,
  CbtGenerationReason,
  FullCopyReason,
  type CbtInfo,
  type CbtOptions,
  type CbtSectorRange,
  type ChangedExtentsResult,
} from './types.js';

/**
 * The CBT of one device: the map and its generation ({@link CbtMapState}), kept crash-safe on
 * disk by {@link CbtPersistence} when a state file is used. It is the filter instance itself,
 * so the registry binds its op methods once, not per bio.
 */
export class CbtTracker implements FilterInstance {
  readonly ctl: Readonly<Record<string, FilterCtlHandler>>;
  private readonly bdev: BlockDev;
  private readonly userBlockSize: number | undefined;
  private readonly s: CbtMapState;
  private readonly persistence: CbtPersistence | null;
  private detail: string | null = null;
  /** Why the map can no longer be trusted; the next take or query starts a new generation. */
  private untrusted: string | null = null;
  /** Attach runs frozen; the registry's `thawed` event for this device ends it. */
  private frozen = true;
  private detaching = false;
  private changedWhileDetaching = false;

  constructor(bdev: BlockDev, blockSize: number | undefined, stateFile: string | null, io: CbtStateIo = nodeStateIo, checkpointBytes?: number) {
    this.bdev = bdev;
    this.userBlockSize = blockSize;
    const geo = cbtGeometry(bdev.name, bdev.nrSects, bdev.disk.limits.logicalBlockSize, blockSize);
    this.s = new CbtMapState(geo, bdev.nrSects, randomUUID(), CbtGenerationReason.NEW);
    this.persistence = stateFile === null ? null : new CbtPersistence(io, stateFile, this.s, bdev.startSect, bdev.name, checkpointBytes);
    // Queries wait for what was recorded to be durable: a backup never records a take that a
    // crash could still undo.
    const p = this.persistence;
    this.ctl = Object.freeze(
      p === null
        ? {
            info: () => this.info(),
            map: (args: unknown) => this.readMapRange(args),
            extents: (args: unknown) => this.changedExtents(args),
            'mark-dirty': (args: unknown) => this.markDirty(args),
            reset: () => this.reset(),
          }
        : {
            info: async () => (await p.sync(), this.info()),
            map: async (args: unknown) => (await p.sync(), this.readMapRange(args)),
            extents: async (args: unknown) => (await p.sync(), this.changedExtents(args)),
            'mark-dirty': async (args: unknown) => (this.markDirty(args), await p.sync()),
            reset: async () => (this.reset(), await p.sync(), this.info()),
          },
    );
  }

  // --- the data path ----------------------------------------------------------------------------

  /**
   * Marks at submission, before the write reaches the device: a write that later fails is
   * still counted. With a state file, a write that is the first in this generation to touch a
   * block waits until that mark is durable; a write to marked blocks passes at no cost.
   */
  write(bio: Bio, next: FilterNext): FilterVerdict {
    return bio.size === 0 ? FilterVerdict.PASS : this.mark(bio, next);
  }

  /** A discard changes what reads return: counted like a write. */
  discard(bio: Bio, next: FilterNext): FilterVerdict {
    return bio.size === 0 ? FilterVerdict.PASS : this.mark(bio, next);
  }

  /** Counted like a write. */
  writeZeroes(bio: Bio, next: FilterNext): FilterVerdict {
    return bio.size === 0 ? FilterVerdict.PASS : this.mark(bio, next);
  }

  private mark(bio: Bio, next: FilterNext): FilterVerdict {
    const s = this.s;
    const bs = s.blockSectors;
    const first = Math.floor(bio.sector / bs);
    let end = Math.floor((bio.sector + bio.size / SECTOR_SIZE - 1) / bs) + 1;
    if (end > s.blockCount) {
      // The device grew under the map: what lies past its end cannot be tracked.
      this.untrusted ??= 'a write past the end of the map (the device grew)';
      end = s.blockCount;
      if (first >= end) return FilterVerdict.PASS;
    }
    const map = s.map;
    const active = s.active;
    const p = this.persistence;
    if (p === null) {
      s.markBlocks(first, end, active);
      return FilterVerdict.PASS;
    }
    for (let i = first; i < end; i++) {
      if (map[i] !== active) {
        p.holdWrite(bio, next, first, end, (bio.flags & ReqFlag.NOWAIT) !== 0);
        return FilterVerdict.TAKEN;
      }
    }
    return FilterVerdict.PASS;
  }

  // --- events ----------------------------------------------------------------------------------

  /** Follows the freezes of its device (a take is trusted only inside one). */
  onEvent(event: FilterEvent): void {
    const type = event.type;
    if (type === FilterEventType.FROZEN) this.frozen = true;
    else if (type === FilterEventType.THAWED) this.frozen = false;
  }

  /** A snapshot of this device was taken: switch generation (the registry delivers it to this device only). */
  onSnapshotTaken(data: SnapshotTakenData): void {
    if (this.detaching) this.changedWhileDetaching = true;
    const id = data.snapshotId;
    this.take(typeof id === 'string' ? id : null);
  }

  /** Ranges changed outside the bio stream (writes to the snapshot image), checked by the registry. */
  onRangesChanged(ranges: readonly SectorRange[]): void {
    // The device is frozen during detach, but events are not: a save under way would miss this.
    if (this.detaching) this.changedWhileDetaching = true;
    this.markBoth(ranges);
  }

  // --- generations -----------------------------------------------------------------------------

  /**
   * The snapshot take: freeze a copy of the map for readers, then move the active number on.
   * Past 255 the map is cleared under a new generation id; the copy keeps the old one.
   */
  private take(snapshotId: string | null): void {
    this.revalidate();
    const overflowId = randomUUID();
    this.s.take(snapshotId, overflowId);
    this.persistence?.recordTake(snapshotId, overflowId);
    if (!this.frozen) {
      // Bios in flight across the take were marked with the old number and may land after it:
      // the next incremental could miss them.
      this.untrusted ??= `a "${FilterEventType.SNAPSHOT_TAKEN}" event while "${this.bdev.name}" was not frozen (emit it inside withFrozenDevices)`;
    }
  }

  /** Resets when the device was resized or the map stopped being trustworthy (blksnap checks at take; we also check at queries). */
  private revalidate(): void {
    if (this.bdev.nrSects !== this.s.capacity) this.newGeneration(CbtGenerationReason.RESIZE);
    else if (this.untrusted !== null) this.newGeneration(CbtGenerationReason.CORRUPTED);
  }

  /** Clears the map (and drops the read map) under a new generation id. */
  private newGeneration(reason: CbtGenerationReason): void {
    const nr = this.bdev.nrSects;
    const geo = nr !== this.s.capacity ? cbtGeometryAfterResize(nr, this.bdev.disk.limits.logicalBlockSize, this.userBlockSize) : this.s;
    this.s.newGeneration(reason, randomUUID(), { blockSize: geo.blockSize, blockCount: geo.blockCount }, nr);
    this.untrusted = null;
    this.detail = null;
    this.persistence?.recordNewGeneration();
  }

  // --- queries and commands (ctl) --------------------------------------------------------------

  /** ctl `info`. */
  info(): CbtInfo {
    this.revalidate();
    const s = this.s;
    return {
      capacity: s.capacity,
      blockSize: s.blockSize,
      blockCount: s.blockCount,
      generationId: s.generationId,
      changesNumber: s.active,
      snapNumber: s.snapNumber,
      snapGenerationId: s.snapGenerationId,
      snapshotId: s.snapshotId,
      generationReason: s.reason,
      generationDetail: this.detail,
      stateFile: this.persistence?.stateFile ?? null,
      persistenceError: this.persistence?.problem?.message ?? null,
      memoryBytes: s.map.byteLength + (s.readMap?.byteLength ?? 0),
    };
  }

  /** ctl `map`: a copy of blocks `[offset, offset + length)` of the read map. */
  readMapRange(args: unknown): Uint8Array {
    this.revalidate();
    const s = this.s;
    const { offset, length } = (args ?? {}) as { offset?: unknown; length?: unknown };
    if (!isCount(offset) || !isCount(length) || offset + length > s.blockCount) {
      throw new InvalidArgumentError(
        `CBT map range of "${this.bdev.name}": expected { offset, length } as whole numbers of blocks within its ${s.blockCount} blocks; got offset ${String(offset)}, length ${String(length)}`,
      );
    }
    const rm = s.readMap;
    if (s.snapNumber === 0 || rm === null) {
      throw new CbtNoSnapshotError(`no snapshot was taken on "${this.bdev.name}" in generation ${s.generationId}, so there is no read map yet; take a snapshot first`);
    }
    return rm.slice(offset, offset + length);
  }

  /** ctl `extents`: the sector extents of blocks changed after take `since` of `generationId`. */
  changedExtents(args: unknown): ChangedExtentsResult {
    this.revalidate();
    const s = this.s;
    const { since, generationId } = (args ?? {}) as { since?: unknown; generationId?: unknown };
    if (!isCount(since) || since > CBT_MAX_CHANGES_NUMBER || typeof generationId !== 'string') {
      throw new InvalidArgumentError(
        `CBT extents of "${this.bdev.name}": expected { since: 0..${CBT_MAX_CHANGES_NUMBER}, generationId: string } from a previous answer; got since ${String(since)}, generationId ${typeof generationId === 'string' ? generationId : typeof generationId}`,
      );
    }
    const snap = s.snapNumber;
    const rm = s.readMap;
    const full = (reason: FullCopyReason, message: string): ChangedExtentsResult => ({
      kind: 'full-copy-needed',
      reason,
      message,
      generationId: s.snapGenerationId,
      snapNumber: snap,
    });
    if (snap === 0 || rm === null) {
      return full(FullCopyReason.NO_SNAPSHOT, `no snapshot was taken on "${this.bdev.name}" in generation ${s.generationId} (${s.reason}); take one and copy the whole device`);
    }
    if (generationId !== s.snapGenerationId) {
      return full(
        FullCopyReason.GENERATION_CHANGED,
        `"${this.bdev.name}" is tracked in generation ${s.snapGenerationId}, not ${generationId} (the map was reset: ${s.reason}${this.detail !== null ? `: ${this.detail}` : ''}); copy the whole device`,
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
      snapshotId: s.snapshotId,
      blockSize: s.blockSize,
      extents: scanExtents(rm, s.blockCount, since, s.blockSectors, s.capacity),
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
      if (!isCount(sector) || !isCount(sectors) || sector + sectors > this.s.capacity) {
        return `range { sector: ${String(sector)}, sectors: ${String(sectors)} } is not whole sectors within the ${this.s.capacity} sectors of "${this.bdev.name}"`;
      }
    }
    return null;
  }

  private markBoth(ranges: readonly CbtSectorRange[]): void {
    const s = this.s;
    for (const { sector, sectors } of ranges) {
      if (sectors === 0) continue;
      const [first, end] = s.blockRange(sector, sectors);
      s.markBoth(first, end);
      this.persistence?.recordMarkBoth(first, end);
    }
  }

  // --- persistence --------------------------------------------------------------------------------

  /**
   * At attach, while the device is frozen: rebuild the map from the state file and its journal
   * (a clean save, or a crash replayed), else keep the new generation; then start the live
   * state (a dirty checkpoint and an empty journal, synced) before any write can happen.
   */
  async load(): Promise<void> {
    const p = this.persistence;
    if (p === null) return;
    const bdev = this.bdev;
    const fresh = (): void => {
      const geo = cbtGeometry(bdev.name, bdev.nrSects, bdev.disk.limits.logicalBlockSize, this.userBlockSize);
      this.s.newGeneration(CbtGenerationReason.NEW, randomUUID(), geo, bdev.nrSects);
    };
    const matches = (): boolean => {
      const geo = cbtGeometry(bdev.name, bdev.nrSects, bdev.disk.limits.logicalBlockSize, this.userBlockSize);
      return this.s.capacity === bdev.nrSects && this.s.blockSize === geo.blockSize && this.s.blockCount === geo.blockCount;
    };
    const outcome = await p.load(fresh, matches);
    this.s.reason = outcome.reason;
    this.detail = outcome.detail;
    await p.start();
  }

  /** The registry's detach hook (device frozen and drained): saves the map as a clean checkpoint. */
  async detach(): Promise<void> {
    this.detaching = true;
    const p = this.persistence;
    if (p === null) return;
    try {
      await p.sync();
      await p.close(!this.changedWhileDetaching);
      // An event changed the map while the clean state was written: save it, not marked clean.
      if (this.changedWhileDetaching) await p.saveDirty();
    } catch (err) {
      throw new CbtStateError(
        `CBT of "${this.bdev.name}" could not be saved to "${p.stateFile}" (${String(err)}); the next attach will start a new generation and need a full copy`,
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

/** The `cbt` filter's attach: checks the options, loads the state (device frozen). */
export async function attachCbt(ctx: FilterContext, options: CbtOptions | undefined): Promise<CbtTracker> {
  const opts = (options ?? {}) as CbtOptions;
  if (typeof opts !== 'object' || opts === null) {
    throw new InvalidArgumentError(`CBT options for "${ctx.bdev.name}" must be an object like { blockSize?, stateFile? }; got ${String(options)}`);
  }
  const sf = opts.stateFile;
  if (sf !== undefined && sf !== false && (typeof sf !== 'string' || sf === '')) {
    throw new InvalidArgumentError(`CBT stateFile for "${ctx.bdev.name}" must be a path or false; got ${JSON.stringify(sf)}`);
  }
  const cp = opts.checkpointBytes;
  if (cp !== undefined && (!Number.isSafeInteger(cp) || cp < 4096)) {
    throw new InvalidArgumentError(`CBT checkpointBytes for "${ctx.bdev.name}" must be a whole number of at least 4096; got ${String(cp)}`);
  }
  const stateFile = sf === false ? null : sf === undefined ? defaultStateFile(ctx.bdev) : path.resolve(sf);
  const tracker = new CbtTracker(ctx.bdev, opts.blockSize, stateFile, opts.stateIo ?? nodeStateIo, cp);
  await tracker.load();
  return tracker;
}
