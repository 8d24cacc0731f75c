import { SECTOR_SIZE, blkdevBlockStatus, type BlockDev, type BlockStatusExtent } from '@blkfilter/bio';
import { cbtInfo, cbtMap, scanExtents, type CbtSectorRange } from '@blkfilter/cbt';
import type { AllocationDepthSource, BitmapEntry } from './exports.js';
import { NbdAllocationFlag, NBD_STATE_DIRTY } from './protocol.js';

/** `base:allocation` flags of a hole: unallocated and reads as zeros (what qemu-nbd sends). */
const HOLE_FLAGS = NbdAllocationFlag.HOLE | NbdAllocationFlag.ZERO;

/**
 * Extents of `base:allocation` for `[offset, offset + length)` of `dev`, as flat
 * `[length, flags, ...]` pairs: holes of the backend's allocation map (`blkdevBlockStatus`) as
 * `NBD_STATE_HOLE | NBD_STATE_ZERO` (3), data as 0. At least one and at most `maxExtents` pairs;
 * when capped, the last one ends early and the client asks again from there (with REQ_ONE,
 * `maxExtents` 1: one extent no longer than the request). When the backend cannot tell (NBD
 * client backends, a file backend without `@blkfilter/native`), the whole range is data (flags
 * 0), which the spec allows for any block. Throws `InvalidArgumentError` for a range past the end
 * of `dev`.
 */
export function allocationExtents(dev: BlockDev, offset: number, length: number, maxExtents: number): number[] {
  const extents = blkdevBlockStatus(dev, offset, length);
  if (extents === null) return [length, 0];
  return statusToExtents(extents, length, maxExtents);
}

/**
 * Flat `[length, flags, ...]` pairs of block status `extents` for a request of `length` bytes,
 * at most `maxExtents` pairs, at least one. Defensive about a backend's answer (the wire format
 * must hold whatever it says): extents are clipped to `length`, empty ones skipped, neighbours of
 * one kind merged, and bytes it left out are reported as data.
 */
export function statusToExtents(extents: readonly BlockStatusExtent[], length: number, maxExtents: number): number[] {
  const out: number[] = [];
  const max = maxExtents * 2;
  let pos = 0;
  let full = false;
  for (let i = 0; i < extents.length && pos < length; i++) {
    const e = extents[i] as BlockStatusExtent;
    const n = Math.min(e.length, length - pos);
    if (!(n > 0)) continue;
    const flags = e.hole ? HOLE_FLAGS : 0;
    if (out.length > 0 && out[out.length - 1] === flags) {
      out[out.length - 2] = (out[out.length - 2] as number) + n;
    } else if (out.length === max) {
      full = true;
      break;
    } else {
      out.push(n, flags);
    }
    pos += n;
  }
  if (!full && pos < length) {
    if (out.length > 0 && out[out.length - 1] === 0) out[out.length - 2] = (out[out.length - 2] as number) + (length - pos);
    else if (out.length < max) out.push(length - pos, 0);
  }
  return out;
}

/**
 * Extents of `qemu:dirty-bitmap:<name>` for `[offset, offset + length)`: flag 1 where the CBT
 * read map says the block changed after take `bitmap.since`, merged into runs, at most
 * `maxExtents` of them (the last run may end early; clients ask again from there). When the map
 * cannot answer for that take (CBT reset since, no take yet, `since` ahead of the last take),
 * the whole range is dirty: the only safe answer for an incremental backup.
 */
export async function dirtyBitmapExtents(bitmap: BitmapEntry, offset: number, length: number, maxExtents: number): Promise<number[]> {
  const info = await cbtInfo(bitmap.device);
  const readGeneration = info.snapGenerationId;
  if (
    info.snapNumber === 0 ||
    readGeneration === null ||
    bitmap.since > info.snapNumber ||
    (bitmap.generationId !== null && bitmap.generationId !== readGeneration)
  ) {
    return [length, NBD_STATE_DIRTY];
  }
  const bs = info.blockSize;
  const end = offset + length;
  const first = Math.floor(offset / bs);
  const last = Math.min(Math.ceil(end / bs), info.blockCount);
  if (last <= first) return [length, 0];
  const map = await cbtMap(bitmap.device, { offset: first, length: last - first });
  return mapToExtents(map, first, bs, offset, end, bitmap.since, maxExtents);
}

/**
 * Runs of dirty (`map[i] > since`, found by CBT's own {@link scanExtents}) and clean blocks of
 * `map` (block `first` at index 0), clipped to `[offset, end)`, as flat `[length, flags, ...]`
 * pairs, at most `maxExtents` pairs. Bytes past the map's last block are reported clean.
 */
export function mapToExtents(map: Uint8Array, first: number, bs: number, offset: number, end: number, since: number, maxExtents: number): number[] {
  const out: number[] = [];
  const max = maxExtents * 2;
  const base = first * bs;
  const sectors = bs / SECTOR_SIZE;
  const dirty = scanExtents(map, map.length, since, sectors, map.length * sectors);
  let pos = offset;
  for (let i = 0; i < dirty.length && pos < end && out.length < max; i++) {
    const e = dirty[i] as CbtSectorRange;
    const from = Math.max(pos, base + e.sector * SECTOR_SIZE);
    const to = Math.min(end, base + (e.sector + e.sectors) * SECTOR_SIZE);
    if (to <= from) continue;
    if (from > pos) {
      out.push(from - pos, 0);
      pos = from;
      if (out.length === max) break;
    }
    out.push(to - from, NBD_STATE_DIRTY);
    pos = to;
  }
  if (pos < end && out.length < max) {
    if (out.length > 0 && out[out.length - 1] === 0) out[out.length - 2] = (out[out.length - 2] as number) + (end - pos);
    else out.push(end - pos, 0);
  }
  return out;
}

/**
 * Extents of `qemu:allocation-depth` for `[offset, offset + length)` (what `qemu-nbd -A` sends):
 * the flags of each run are its depth in the chain (0 unallocated, 1 the top image, ...), as
 * flat `[length, flags, ...]` pairs, at most `maxExtents`, at least one. Defensive about the
 * source's answer as {@link statusToExtents} is: clipped, merged, gaps reported as depth 0.
 */
export function depthExtents(source: AllocationDepthSource, offset: number, length: number, maxExtents: number): number[] {
  const runs = source.allocationDepth(offset, length);
  const out: number[] = [];
  const max = maxExtents * 2;
  let pos = 0;
  for (let i = 0; i < runs.length && pos < length; i++) {
    const r = runs[i] as { readonly length: number; readonly depth: number };
    const n = Math.min(r.length, length - pos);
    if (!(n > 0)) continue;
    const flags = r.depth >>> 0;
    if (out.length > 0 && out[out.length - 1] === flags) out[out.length - 2] = (out[out.length - 2] as number) + n;
    else if (out.length === max) return out;
    else out.push(n, flags);
    pos += n;
  }
  if (pos < length) {
    if (out.length > 0 && out[out.length - 1] === 0) out[out.length - 2] = (out[out.length - 2] as number) + (length - pos);
    else if (out.length < max) out.push(length - pos, 0);
  }
  return out;
}
