import { cbtInfo, cbtMap } from '@blkfilter/cbt';
import type { BitmapEntry } from './exports.js';
import { NBD_STATE_DIRTY } from './protocol.js';

/**
 * Extents of `base:allocation` for `[offset, offset + length)`, as flat `[length, flags, ...]`
 * pairs. `@blkfilter/bio` has no allocation query, so the whole range is reported as allocated
 * data (flags 0), which the spec allows for any block ("the server could not otherwise
 * determine its status").
 */
export function allocationExtents(_offset: number, length: number): number[] {
  return [length, 0];
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
 * Runs of dirty (`map[i] > since`) and clean blocks of `map` (block `first` at index 0), clipped
 * to `[offset, end)`, as flat `[length, flags, ...]` pairs, at most `maxExtents` pairs. Bytes past
 * the map's last block are reported clean.
 */
export function mapToExtents(map: Uint8Array, first: number, bs: number, offset: number, end: number, since: number, maxExtents: number): number[] {
  const out: number[] = [];
  let pos = offset;
  let i = 0;
  const n = map.length;
  while (pos < end && i < n && out.length < maxExtents * 2) {
    const dirty = (map[i] as number) > since;
    let j = i + 1;
    while (j < n && ((map[j] as number) > since) === dirty) j++;
    const runEnd = Math.min(end, (first + j) * bs);
    out.push(runEnd - pos, dirty ? NBD_STATE_DIRTY : 0);
    pos = runEnd;
    i = j;
  }
  if (pos < end && out.length < maxExtents * 2) {
    const lastFlags = out.length > 0 ? (out[out.length - 1] as number) : 1;
    if (lastFlags === 0) out[out.length - 2] = (out[out.length - 2] as number) + (end - pos);
    else out.push(end - pos, 0);
  }
  return out;
}
