import { SECTOR_SIZE } from '@blkfilter/bio';
import type { CbtGeometry } from './geometry.js';
import { CBT_MAX_CHANGES_NUMBER, CbtGenerationReason } from './types.js';

/**
 * The CBT map of one device and its generation, with the only transitions it has. The live
 * tracker and the journal's replay both change it through these methods, so that what a
 * restart rebuilds is, by construction, what the tracker had.
 */
export class CbtMapState {
  blockSize: number;
  blockSectors: number;
  blockCount: number;
  /** Sectors the map covers. */
  capacity: number;
  /** One byte per block: the changes number in which the block last changed. */
  map: Uint8Array;
  /** The copy frozen at the last take; meaningful while `snapNumber > 0`. */
  readMap: Uint8Array | null;
  /** The active changes number (1..255): the largest value in `map`. */
  active: number;
  /** Take number of the read map; 0 before the first take of this generation. */
  snapNumber: number;
  generationId: string;
  snapGenerationId: string | null;
  snapshotId: string | null;
  reason: CbtGenerationReason;

  constructor(geo: CbtGeometry, capacity: number, generationId: string, reason: CbtGenerationReason) {
    this.blockSize = geo.blockSize;
    this.blockSectors = geo.blockSize / SECTOR_SIZE;
    this.blockCount = geo.blockCount;
    this.capacity = capacity;
    this.map = new Uint8Array(geo.blockCount);
    this.readMap = null;
    this.active = 1;
    this.snapNumber = 0;
    this.generationId = generationId;
    this.snapGenerationId = null;
    this.snapshotId = null;
    this.reason = reason;
  }

  /** Blocks `[first, end)` changed in changes number `value` (at most `active`). */
  markBlocks(first: number, end: number, value: number): void {
    const map = this.map;
    // The active number is the largest in the map, so max(map[i], value) is a plain store
    // when value is the active one; most writes touch one block, where a store beats fill().
    if (value === this.active) {
      if (end - first === 1) map[first] = value;
      else map.fill(value, first, end);
      return;
    }
    for (let i = first; i < end; i++) if ((map[i] as number) < value) map[i] = value;
  }

  /**
   * Blocks `[first, end)` changed outside the bio stream: in the active map and in the read
   * map with its take number, so a backup in progress from the last take copies them too
   * (blksnap's cbt_map_set_both).
   */
  markBoth(first: number, end: number): void {
    this.map.fill(this.active, first, end);
    const rm = this.snapNumber > 0 ? this.readMap : null;
    if (rm !== null) rm.fill(this.snapNumber, first, end);
  }

  /**
   * The snapshot take: freeze a copy of the map for readers, then move the active number on.
   * Past 255 the map is cleared under `overflowId`, a new generation id that the caller drew
   * (so a replay draws the same one); the copy keeps the old id.
   */
  take(snapshotId: string | null, overflowId: string): void {
    let rm = this.readMap;
    if (rm === null || rm.length !== this.blockCount) rm = this.readMap = new Uint8Array(this.blockCount);
    rm.set(this.map);
    this.snapNumber = this.active;
    this.snapGenerationId = this.generationId;
    this.snapshotId = snapshotId;
    if (this.active === CBT_MAX_CHANGES_NUMBER) {
      this.map.fill(0);
      this.generationId = overflowId;
      this.reason = CbtGenerationReason.OVERFLOW;
      this.active = 1;
    } else {
      this.active++;
    }
  }

  /** True when the next take starts a new generation id (the active number is 255). */
  takeOverflows(): boolean {
    return this.active === CBT_MAX_CHANGES_NUMBER;
  }

  /** Clears the map (and drops the read map) under a new generation id, with `geo` for `capacity`. */
  newGeneration(reason: CbtGenerationReason, generationId: string, geo: CbtGeometry, capacity: number): void {
    if (geo.blockCount !== this.blockCount || geo.blockSize !== this.blockSize || capacity !== this.capacity) {
      this.blockSize = geo.blockSize;
      this.blockSectors = geo.blockSize / SECTOR_SIZE;
      this.blockCount = geo.blockCount;
      this.capacity = capacity;
      this.map = new Uint8Array(geo.blockCount);
      this.readMap = null;
    } else {
      this.map.fill(0);
    }
    this.generationId = generationId;
    this.active = 1;
    this.snapNumber = 0;
    this.snapGenerationId = null;
    this.snapshotId = null;
    this.reason = reason;
  }

  /** The first block of sectors `[sector, sector + sectors)` and the block after the last. */
  blockRange(sector: number, sectors: number): [number, number] {
    const bs = this.blockSectors;
    return [Math.floor(sector / bs), Math.floor((sector + sectors - 1) / bs) + 1];
  }
}
