// Shared by the tests (not exported by the package).
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createDiskSync, MemoryBackend, SECTOR_SIZE, type BlockDev, type Disk } from '@blkfilter/bio';
import { detachFilter, listFilters } from '@blkfilter/registry';
import { registerCbtFilter } from './filter.js';
import { CBT_TAKER_FILTER, emitMarkDirty, registerTakerFilter, takeSnapshot } from './testing.js';
import type { CbtSectorRange, ChangedExtentsResult } from './types.js';

/** A stand-in for the snapshot filter: emits the events of the CBT contract from its ctl. */
export const TAKER = CBT_TAKER_FILTER;

/** Registers `cbt` and the test taker (once per process). */
export function registerTestFilters(): void {
  registerCbtFilter();
  registerTakerFilter();
}

let seq = 0;
const disks: Disk[] = [];
const dirs: string[] = [];

/** A memory disk with a unique name, removed by {@link cleanupDisks}. */
export function memDisk(sizeBytes: number, logicalBlockSize: 512 | 4096 = 512): Disk {
  const d = createDiskSync({ name: `cbt${process.pid}x${seq++}`, backend: new MemoryBackend({ sizeBytes }), logicalBlockSize });
  disks.push(d);
  return d;
}

/** Tracks a disk made elsewhere for {@link cleanupDisks}. */
export function trackDisk(d: Disk): Disk {
  disks.push(d);
  return d;
}

/** Detaches every filter from the test disks and removes them. */
export async function cleanupDisks(): Promise<void> {
  for (const d of disks.splice(0)) {
    for (const b of [...d.partitions, d.part0]) for (const f of listFilters(b)) await detachFilter(b, f.name);
    await d.remove();
  }
}

/** Removes the directories {@link tmpDir} made (after {@link cleanupDisks}: a detach writes state there). */
export async function cleanupTmpDirs(): Promise<void> {
  for (const dir of dirs.splice(0)) await fs.rm(dir, { recursive: true, force: true });
}

/** Takes a "snapshot" of `devs` as the snapshot filter would: the event inside one frozen instant. */
export const take = (taker: BlockDev, devs: readonly BlockDev[], snapshotId?: string): Promise<void> => takeSnapshot(taker, devs, snapshotId);

/** Announces ranges-changed from the taker on `taker` (of that device). */
export const emitDirty = (taker: BlockDev, ranges: readonly CbtSectorRange[]): Promise<void> => emitMarkDirty(taker, ranges);

/** The blocks an extents answer covers, checking that extents are sorted, merged and within capacity. */
export function extentBlocks(r: ChangedExtentsResult, blockSize: number, capacity: number): Set<number> {
  if (r.kind !== 'extents') throw new Error(`expected extents, got full-copy-needed (${r.reason}): ${r.message}`);
  const bs = blockSize / SECTOR_SIZE;
  const out = new Set<number>();
  let prevEnd = -1;
  for (const e of r.extents) {
    if (e.sectors <= 0 || e.sector % bs !== 0 || e.sector <= prevEnd || e.sector + e.sectors > capacity) {
      throw new Error(`bad extent ${JSON.stringify(e)} after end ${prevEnd} (capacity ${capacity})`);
    }
    if (e.sector + e.sectors !== capacity && e.sectors % bs !== 0) throw new Error(`extent ${JSON.stringify(e)} is not whole blocks`);
    prevEnd = e.sector + e.sectors;
    for (let b = e.sector / bs; b * bs < e.sector + e.sectors; b++) out.add(b);
  }
  return out;
}

/** Blocks touched by `sectors` sectors at `sector`. */
export function blocksOf(sector: number, sectors: number, blockSize: number): number[] {
  const bs = blockSize / SECTOR_SIZE;
  const out: number[] = [];
  for (let b = Math.floor(sector / bs); b <= Math.floor((sector + sectors - 1) / bs); b++) out.push(b);
  return out;
}

/** A fresh temporary directory, removed by {@link cleanupTmpDirs}. */
export async function tmpDir(): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'blkfilter-cbt-'));
  dirs.push(dir);
  return dir;
}
