import type { BlockDev } from '../device.js';
import { InvalidArgumentError } from '../errors.js';
import { blkdevRead } from '../io.js';
import { readGpt } from './gpt.js';
import { hasMbrSignature, mbrEntries, MBR_TYPE_GPT_PROTECTIVE, readMbr } from './mbr.js';
import type { PartitionTable } from './types.js';

/**
 * Reads the partition table of `bdev` (a whole disk): GPT (behind a protective MBR, with
 * header and entry CRC32 checked and the backup header used when the primary is corrupt) or
 * MBR with extended/logical partitions, with Linux's semantics (`block/partitions/efi.c`,
 * `msdos.c`). Issues a few small READs to `bdev` and waits for them; control path only.
 * Returns null when the disk has no table (no 0x55AA signature at LBA 0, or a boot sector
 * that is not a partition table). Throws PartitionTableError for a GPT that is present but
 * unusable, InvalidArgumentError when `bdev` is a partition, and the read's error when a
 * READ fails.
 */
export async function readPartitionTable(bdev: BlockDev): Promise<PartitionTable | null> {
  if (bdev.partno !== 0) {
    throw new InvalidArgumentError(`cannot read a partition table from "${bdev.name}": it is partition ${bdev.partno} of "${bdev.disk.name}"; pass the whole disk`);
  }
  const lba0 = await blkdevRead(bdev, 0, bdev.disk.limits.logicalBlockSize);
  // Neither efi.c (without the "gpt" boot option) nor msdos.c looks further without it.
  if (!hasMbrSignature(lba0)) return null;
  // Linux tries efi.c before msdos.c, and msdos.c ignores a disk with any 0xee entry, so that
  // entry makes it a GPT disk; a hybrid MBR's other entries are ignored. (efi.c also wants the
  // 0xee entry to start at LBA 1, and sees no table at all otherwise; we read the GPT anyway.)
  if (mbrEntries(lba0).some((e) => e.type === MBR_TYPE_GPT_PROTECTIVE)) return readGpt(bdev);
  return readMbr(bdev, lba0);
}
