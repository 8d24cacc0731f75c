import { blkdevBlockStatus, type BlockDev, type BlockStatusExtent } from '@blkfilter/bio';

/** Bytes of the source asked about at once: a multiple of every cluster size (4 KiB to 2 MiB). */
export const STATUS_SPAN = 64 << 20;

/** Cluster flag of {@link holeClusters}: the cluster is wholly a hole and reads as zeros. */
export const HOLE = 1;

/**
 * Which clusters of `[start, end)` of `image` are wholly holes (`blkdevBlockStatus`, which
 * answers in whole blocks and refuses an answer that does not tile the range), one byte per
 * cluster ({@link HOLE}, else 0): a backup stores those as zeros without reading them, as it
 * stores clusters it read and found all zeros. `start` is a multiple of `clusterSize`; `end` is
 * too, or the end of the disk. A cluster with any byte of data is data; only `hole: true` is a
 * hole. Null (read everything) when the device cannot tell, the call throws, or no cluster is
 * wholly a hole.
 */
export function holeClusters(image: BlockDev, start: number, end: number, clusterSize: number): Uint8Array | null {
  let extents: BlockStatusExtent[] | null;
  try {
    extents = blkdevBlockStatus(image, start, end - start);
  } catch {
    return null;
  }
  if (extents === null) return null;
  const flags = new Uint8Array(Math.ceil((end - start) / clusterSize)).fill(HOLE);
  let pos = start;
  for (let i = 0; i < extents.length; i++) {
    const e = extents[i] as BlockStatusExtent;
    if (e.hole !== true) flags.fill(0, Math.floor((pos - start) / clusterSize), Math.ceil((pos + e.length - start) / clusterSize));
    pos += e.length;
  }
  return flags.includes(HOLE) ? flags : null;
}
