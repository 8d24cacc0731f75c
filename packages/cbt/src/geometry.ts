import { SECTOR_SIZE } from '@blkfilter/bio';
import { CbtBlockSizeError } from './errors.js';
import {
  CBT_DEFAULT_BLOCK_SIZE,
  CBT_MAX_BLOCK_COUNT,
  CBT_MAX_BLOCK_SIZE,
  CBT_MAX_DEFAULT_BLOCK_COUNT,
} from './types.js';

/** Block size and count of a map over a device. */
export interface CbtGeometry {
  readonly blockSize: number;
  readonly blockCount: number;
}

function blocksFor(capacitySectors: number, blockSize: number): number {
  return Math.ceil((capacitySectors * SECTOR_SIZE) / blockSize);
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}

/**
 * The map geometry for a device of `capacitySectors`: the user's `blockSize` (checked), or
 * 64 KiB doubled while the block count exceeds 2,097,152 (blksnap's rule, so a map stays
 * around 2 MiB). Throws {@link CbtBlockSizeError} for a bad `blockSize`.
 */
export function cbtGeometry(device: string, capacitySectors: number, logicalBlockSize: number, blockSize?: number): CbtGeometry {
  if (blockSize === undefined) {
    let bs = Math.max(CBT_DEFAULT_BLOCK_SIZE, logicalBlockSize);
    while (blocksFor(capacitySectors, bs) > CBT_MAX_DEFAULT_BLOCK_COUNT) bs *= 2;
    return { blockSize: bs, blockCount: blocksFor(capacitySectors, bs) };
  }
  if (typeof blockSize !== 'number' || !isPowerOfTwo(blockSize) || blockSize < logicalBlockSize || blockSize > CBT_MAX_BLOCK_SIZE) {
    throw new CbtBlockSizeError(
      `CBT block size for "${device}" must be a power of two from its logical block size ${logicalBlockSize} to ${CBT_MAX_BLOCK_SIZE} bytes; got ${String(blockSize)}. Leave blockSize out for the default (64 KiB, doubled for large devices)`,
    );
  }
  const blockCount = blocksFor(capacitySectors, blockSize);
  if (blockCount > CBT_MAX_BLOCK_COUNT) {
    throw new CbtBlockSizeError(
      `CBT block size ${blockSize} for "${device}" (${capacitySectors} sectors) needs ${blockCount} blocks, more than the ${CBT_MAX_BLOCK_COUNT} a map may hold; choose a larger blockSize`,
    );
  }
  return { blockSize, blockCount };
}

/** Geometry after a resize: keep the chosen block size, doubling it only if the map would grow too large. */
export function cbtGeometryAfterResize(capacitySectors: number, logicalBlockSize: number, blockSize: number | undefined): CbtGeometry {
  if (blockSize === undefined) return cbtGeometry('', capacitySectors, logicalBlockSize);
  let bs = blockSize;
  while (blocksFor(capacitySectors, bs) > CBT_MAX_BLOCK_COUNT) bs *= 2;
  return { blockSize: bs, blockCount: blocksFor(capacitySectors, bs) };
}
