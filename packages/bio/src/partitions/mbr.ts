import { SECTOR_SIZE } from '../bio.js';
import type { BlockDev } from '../device.js';
import { blkdevRead } from '../io.js';
import type { PartitionInfo, PartitionTable } from './types.js';

const DISK_ID_OFFSET = 0x1b8;
const TABLE_OFFSET = 0x1be;
const ENTRY_SIZE = 16;
const SIGNATURE_OFFSET = 510;
const BOOT_ACTIVE = 0x80;

/** Type byte of a GPT protective MBR entry (the kernel's `EFI_PMBR_OSTYPE_EFI_GPT`). */
export const MBR_TYPE_GPT_PROTECTIVE = 0xee;

/**
 * Highest partition number Linux creates: `DISK_MAX_PARTS` (256) minors per disk, minor 0
 * being the disk itself. Both the EBR walk and the GPT entry loop stop there.
 */
export const MAX_PARTNO = 255;

// msdos.c gives up on a chain after this many links in a row without a data partition.
const MAX_EMPTY_LINKS = 100;

/** One of the four 16-byte entries of an MBR or EBR (CHS fields are ignored, as Linux does). */
export interface MbrEntry {
  /** Boot indicator: 0x80 active, 0 inactive; anything else means this is no partition table. */
  readonly bootInd: number;
  /** Partition type byte (`sys_ind`). */
  readonly type: number;
  /** Start in logical blocks: from LBA 0 (MBR), from the EBR (data entry) or from the extended partition (link). */
  readonly startLba: number;
  /** Length in logical blocks; 0 marks an unused entry. */
  readonly sizeLba: number;
}

/** True when `block` (LBA 0 or an EBR) ends its first 512 bytes with the 0x55AA signature. */
export function hasMbrSignature(block: Buffer): boolean {
  return block[SIGNATURE_OFFSET] === 0x55 && block[SIGNATURE_OFFSET + 1] === 0xaa;
}

/** The four entries of the table in `block` (LBA 0 or an EBR), in slot order. */
export function mbrEntries(block: Buffer): MbrEntry[] {
  const entries: MbrEntry[] = [];
  for (let i = 0; i < 4; i++) {
    const o = TABLE_OFFSET + i * ENTRY_SIZE;
    entries.push({
      bootInd: block.readUInt8(o),
      type: block.readUInt8(o + 4),
      startLba: block.readUInt32LE(o + 8),
      sizeLba: block.readUInt32LE(o + 12),
    });
  }
  return entries;
}

function isExtended(type: number): boolean {
  // DOS_EXTENDED_PARTITION, WIN98_EXTENDED_PARTITION, LINUX_EXTENDED_PARTITION
  return type === 0x05 || type === 0x0f || type === 0x85;
}

/**
 * Where a partition of `start` + `size` sectors ends up on a disk of `capacity` sectors, as
 * the kernel's `blk_add_partition` decides: one that starts past the end is dropped ("start
 * is beyond EOD"), one that runs past it is cut at the end ("extends beyond EOD, truncated").
 * Returns the size to use, or 0 to drop the partition.
 */
function sizeOnDisk(start: number, size: number, capacity: number): number {
  if (start >= capacity) return 0;
  return Math.min(size, capacity - start);
}

interface ScanState {
  readonly bdev: BlockDev;
  readonly lbs: number;
  /** 512-byte sectors per logical block: MBR fields count logical blocks. */
  readonly ss: number;
  readonly capacity: number;
  readonly parts: PartitionInfo[];
  /** Number of the next logical partition (the kernel's `state->next`). */
  next: number;
}

/**
 * Reads a DOS partition table (the kernel's `msdos_partition`) from `lba0`, the first logical
 * block of `bdev`, which has the 0x55AA signature and no GPT protective entry. Primary and
 * extended partitions are numbered by slot (1-4), logical partitions from 5 in chain order.
 * Returns null when LBA 0 is not a partition table after all (a boot indicator other than 0
 * or 0x80: a FAT boot sector, say). Never throws for a damaged extended chain: like Linux, it
 * keeps the partitions found before the damage.
 */
export async function readMbr(bdev: BlockDev, lba0: Buffer): Promise<PartitionTable | null> {
  const entries = mbrEntries(lba0);
  // msdos.c: with the signature present, LBA 0 is either a DOS table or the boot sector of a
  // partitionless FAT file system; a boot indicator that is neither 0 nor 0x80 says the latter.
  if (entries.some((e) => e.bootInd !== 0 && e.bootInd !== BOOT_ACTIVE)) return null;
  const lbs = bdev.disk.limits.logicalBlockSize;
  const state: ScanState = { bdev, lbs, ss: lbs / SECTOR_SIZE, capacity: bdev.nrSects, parts: [], next: 5 };
  for (let i = 0; i < 4; i++) {
    const e = entries[i] as MbrEntry;
    // Linux and libfdisk go by the size only ("the kernel cares about partition size only"):
    // an entry of type 0 with a size is a partition to both.
    if (e.sizeLba === 0) continue;
    const start = e.startLba * state.ss;
    const size = e.sizeLba * state.ss;
    const extended = isExtended(e.type);
    addPartition(state, i + 1, start, size, e, extended ? 'extended' : 'primary');
    if (extended) await parseExtended(state, start, size);
  }
  state.parts.sort((a, b) => a.partno - b.partno);
  return {
    label: 'dos',
    id: `0x${lba0.readUInt32LE(DISK_ID_OFFSET).toString(16).padStart(8, '0')}`,
    sectorSize: lbs,
    partitions: state.parts,
  };
}

function addPartition(state: ScanState, partno: number, start: number, size: number, e: MbrEntry, kind: 'primary' | 'extended' | 'logical'): void {
  const onDisk = sizeOnDisk(start, size, state.capacity);
  if (onDisk === 0) return;
  state.parts.push({ partno, start, size: onDisk, type: e.type.toString(16), kind, bootable: e.bootInd === BOOT_ACTIVE });
}

/**
 * Walks the EBR chain of the extended partition at `first` + `firstSize` sectors (the
 * kernel's `parse_extended`). Each EBR holds data partitions relative to itself and a link to
 * the next EBR relative to the extended partition. Stops, keeping what it found, at the end
 * of the chain, at a link that leaves the extended partition or the disk, at an EBR seen
 * before (a loop), after 100 links without a data partition, or at partition 255.
 */
async function parseExtended(state: ScanState, first: number, firstSize: number): Promise<void> {
  const { bdev, lbs, ss } = state;
  const visited = new Set<number>();
  let thisSector = first;
  let thisSize = firstSize;
  let emptyLinks = 0;
  for (;;) {
    if (++emptyLinks > MAX_EMPTY_LINKS || state.next > MAX_PARTNO) return;
    // msdos.c bounds a loop only by the partition limit (and would list the loop's partitions
    // again and again); a link outside the extended partition is as corrupt, so stop at both.
    if (thisSector >= first + firstSize || thisSector + ss > state.capacity || visited.has(thisSector)) return;
    visited.add(thisSector);
    const ebr = await blkdevRead(bdev, thisSector * SECTOR_SIZE, lbs);
    if (!hasMbrSignature(ebr)) return;
    const entries = mbrEntries(ebr);
    // Usually entry 0 is the data partition and entry 1 the link, but DR-DOS puts the link
    // first when the data partition is empty and OS/2 uses all four: look at every entry.
    for (let i = 0; i < 4; i++) {
      const e = entries[i] as MbrEntry;
      if (e.sizeLba === 0 || isExtended(e.type)) continue;
      const offs = e.startLba * ss;
      const size = e.sizeLba * ss;
      const start = thisSector + offs;
      // Entries 3 and 4 "sometimes contain random garbage": keep them only when they fit
      // inside both this link's extent and the extended partition.
      if (i >= 2 && (offs + size > thisSize || start + size > first + firstSize)) continue;
      addPartition(state, state.next, start, size, e, 'logical');
      emptyLinks = 0;
      if (++state.next > MAX_PARTNO) return;
    }
    const link = entries.find((e) => e.sizeLba !== 0 && isExtended(e.type));
    if (link === undefined) return;
    thisSector = first + link.startLba * ss;
    thisSize = link.sizeLba * ss;
  }
}
