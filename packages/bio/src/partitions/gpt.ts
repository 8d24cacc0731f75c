import { crc32 } from 'node:zlib';
import { SECTOR_SIZE } from '../bio.js';
import type { BlockDev } from '../device.js';
import { PartitionTableError } from '../errors.js';
import { blkdevRead } from '../io.js';
import { MAX_PARTNO } from './mbr.js';
import type { PartitionInfo, PartitionTable } from './types.js';

const PRIMARY_LBA = 1n;
const SIGNATURE = Buffer.from('EFI PART', 'latin1');
/** `sizeof(gpt_header)`: the fields up to the entry array CRC; the rest of the block is reserved. */
const HEADER_MIN_SIZE = 92;
const HEADER_CRC_OFFSET = 16;
/** `sizeof(gpt_entry)`. UEFI allows 128 * 2^n, but efi.c (and libblkid) accept 128 only. */
const ENTRY_SIZE = 128;
/** efi.c refuses an entry array larger than `KMALLOC_MAX_SIZE` (4 MiB with 4 KiB pages). */
const MAX_ENTRIES_BYTES = 4 << 20;
const NAME_OFFSET = 56;
const NAME_BYTES = 72;

/** The fields of a GPT header that passed {@link validateHeader}. */
interface GptHeader {
  readonly myLba: bigint;
  readonly alternateLba: bigint;
  readonly firstUsableLba: bigint;
  readonly lastUsableLba: bigint;
  readonly diskGuid: string;
  readonly entriesLba: bigint;
  readonly numEntries: number;
  readonly entriesCrc: number;
}

/** A header and entry array that passed every check. */
interface GptFound {
  readonly ok: true;
  readonly header: GptHeader;
  readonly entries: Buffer;
}

/** Why a header and its entries are unusable; `header` is set when only the entries failed. */
interface GptFailure {
  readonly ok: false;
  readonly header: GptHeader | null;
  readonly reason: string;
}

type GptAttempt = GptFound | GptFailure;

/**
 * Reads the GPT of `bdev`, whose LBA 0 holds a protective MBR (the kernel's `efi_partition`).
 * The primary header (LBA 1) and its entry array are checked as efi.c checks them: signature,
 * header size, header CRC32, `my_lba`, usable range inside the disk, entry size, entry array
 * CRC32. When they fail, the backup header is used, as libfdisk does: at the primary's
 * `alternate_lba` when the primary header itself was sound, else at the last LBA of the disk.
 * Throws {@link PartitionTableError} naming what failed when neither is usable.
 */
export async function readGpt(bdev: BlockDev): Promise<PartitionTable> {
  const lbs = bdev.disk.limits.logicalBlockSize;
  const lastLba = BigInt(bdev.nrSects / (lbs / SECTOR_SIZE) - 1);
  const primary = await tryGpt(bdev, PRIMARY_LBA, lastLba);
  const found = primary.ok ? primary : await findBackup(bdev, primary, lastLba);
  const { header, entries } = found;
  return {
    label: 'gpt',
    id: header.diskGuid,
    sectorSize: lbs,
    // Safe as numbers: validateHeader bounded both by the last LBA of the disk.
    firstLba: Number(header.firstUsableLba),
    lastLba: Number(header.lastUsableLba),
    usedBackup: !primary.ok,
    partitions: parseEntries(entries, header.numEntries, lastLba, lbs / SECTOR_SIZE),
  };
}

/** The first usable backup after `primary` failed; throws when there is none. */
async function findBackup(bdev: BlockDev, primary: GptFailure, lastLba: bigint): Promise<GptFound> {
  const failures = [`primary header at LBA 1: ${primary.reason}`];
  // A header that fails its CRC cannot be trusted to say where its backup is. (Linux itself
  // reads the backup only through a valid primary, or at the last LBA with the "gpt" boot
  // option; libfdisk, and so sfdisk, take the backup without being asked, as we do.)
  const candidates: bigint[] = [];
  if (primary.header !== null && primary.header.alternateLba !== PRIMARY_LBA) candidates.push(primary.header.alternateLba);
  if (lastLba !== PRIMARY_LBA && !candidates.includes(lastLba)) candidates.push(lastLba);
  for (const lba of candidates) {
    const backup = await tryGpt(bdev, lba, lastLba);
    if (backup.ok) return backup;
    failures.push(`backup header at LBA ${lba}: ${backup.reason}`);
  }
  throw new PartitionTableError(
    `"${bdev.name}" has a GPT protective MBR (an entry of type 0xee) but no usable GPT: ${failures.join('; ')}. ` +
      'Restore the table from a backup (sgdisk --load-backup) or repair it with gdisk; if the disk is not meant to be partitioned, clear the stale label with wipefs',
  );
}

async function tryGpt(bdev: BlockDev, lba: bigint, lastLba: bigint): Promise<GptAttempt> {
  const lbs = bdev.disk.limits.logicalBlockSize;
  if (lba > lastLba) return { ok: false, header: null, reason: `it lies past the last LBA of the disk (${lastLba})` };
  const block = await blkdevRead(bdev, Number(lba) * lbs, lbs);
  const header = validateHeader(block, lba, lbs, lastLba);
  if (typeof header === 'string') return { ok: false, header: null, reason: header };
  const bytes = header.numEntries * ENTRY_SIZE;
  const blocks = Math.ceil(bytes / lbs);
  const end = header.entriesLba + BigInt(blocks) - 1n;
  if (end > lastLba) {
    return { ok: false, header, reason: `its partition entry array (LBA ${header.entriesLba}-${end}) runs past the last LBA of the disk (${lastLba})` };
  }
  const entries = (await blkdevRead(bdev, Number(header.entriesLba) * lbs, blocks * lbs)).subarray(0, bytes);
  const crc = crc32(entries);
  if (crc !== header.entriesCrc) {
    return { ok: false, header, reason: `partition entry array CRC32 is ${hex32(crc)}, the header expects ${hex32(header.entriesCrc)}` };
  }
  return { ok: true, header, entries };
}

/**
 * Checks the header in `block` read at `lba`, in efi.c's order (`is_gpt_valid`). Returns the
 * header, or why it is unusable. The revision is not checked: Linux does not either.
 */
function validateHeader(block: Buffer, lba: bigint, lbs: number, lastLba: bigint): GptHeader | string {
  if (!block.subarray(0, 8).equals(SIGNATURE)) {
    return `no "EFI PART" signature (found ${JSON.stringify(block.toString('latin1', 0, 8))})`;
  }
  const headerSize = block.readUInt32LE(12);
  if (headerSize < HEADER_MIN_SIZE || headerSize > lbs) {
    return `header size ${headerSize} is not between ${HEADER_MIN_SIZE} and the ${lbs}-byte logical block size`;
  }
  const stored = block.readUInt32LE(HEADER_CRC_OFFSET);
  const copy = Buffer.from(block.subarray(0, headerSize));
  copy.writeUInt32LE(0, HEADER_CRC_OFFSET);
  const crc = crc32(copy);
  if (crc !== stored) return `header CRC32 is ${hex32(crc)}, the header says ${hex32(stored)}`;
  const myLba = block.readBigUInt64LE(24);
  if (myLba !== lba) return `the header says it is at LBA ${myLba}`;
  const firstUsableLba = block.readBigUInt64LE(40);
  const lastUsableLba = block.readBigUInt64LE(48);
  if (firstUsableLba > lastLba || lastUsableLba > lastLba || lastUsableLba < firstUsableLba) {
    return `usable LBAs ${firstUsableLba}-${lastUsableLba} are not a range inside the disk (last LBA ${lastLba})`;
  }
  const numEntries = block.readUInt32LE(80);
  const entrySize = block.readUInt32LE(84);
  if (entrySize !== ENTRY_SIZE) return `partition entry size is ${entrySize}, Linux accepts ${ENTRY_SIZE} only`;
  if (numEntries === 0 || numEntries * ENTRY_SIZE > MAX_ENTRIES_BYTES) {
    return `${numEntries} partition entries: expected 1 to ${MAX_ENTRIES_BYTES / ENTRY_SIZE}`;
  }
  return {
    myLba,
    alternateLba: block.readBigUInt64LE(32),
    firstUsableLba,
    lastUsableLba,
    diskGuid: guidAt(block, 56),
    entriesLba: block.readBigUInt64LE(72),
    numEntries,
    entriesCrc: block.readUInt32LE(88),
  };
}

/**
 * The used entries of a CRC-checked entry array, as `efi_partition` takes them: entry i is
 * partition i + 1; an all-zero type GUID marks an unused entry; an entry that starts or ends
 * past the last LBA of the disk is skipped (`is_pte_valid`), and so are entries past number
 * 255. An entry that ends before it starts is skipped too (Linux would compute a wrapped
 * size and cut it at the end of the disk).
 */
function parseEntries(entries: Buffer, numEntries: number, lastLba: bigint, ss: number): PartitionInfo[] {
  const parts: PartitionInfo[] = [];
  const n = Math.min(numEntries, MAX_PARTNO);
  for (let i = 0; i < n; i++) {
    const o = i * ENTRY_SIZE;
    if (isZero(entries, o, 16)) continue;
    const first = entries.readBigUInt64LE(o + 32);
    const last = entries.readBigUInt64LE(o + 40);
    if (first > lastLba || last > lastLba || last < first) continue;
    // Both bounded by the last LBA, so they are safe as numbers.
    parts.push({
      partno: i + 1,
      start: Number(first) * ss,
      size: (Number(last) - Number(first) + 1) * ss,
      type: guidAt(entries, o),
      kind: 'gpt',
      uuid: guidAt(entries, o + 16),
      name: nameAt(entries, o + NAME_OFFSET),
      attributes: entries.readBigUInt64LE(o + 48),
    });
  }
  return parts;
}

/** The GUID at `o` in upper case: the first three fields are little-endian on disk, the rest bytes in order. */
function guidAt(b: Buffer, o: number): string {
  const d1 = b.readUInt32LE(o).toString(16).padStart(8, '0');
  const d2 = b.readUInt16LE(o + 4).toString(16).padStart(4, '0');
  const d3 = b.readUInt16LE(o + 6).toString(16).padStart(4, '0');
  return `${d1}-${d2}-${d3}-${b.toString('hex', o + 8, o + 10)}-${b.toString('hex', o + 10, o + 16)}`.toUpperCase();
}

/** The UTF-16LE name at `o`, up to its first NUL (libfdisk stops there, and so does Linux's C string). */
function nameAt(b: Buffer, o: number): string {
  let end = o;
  while (end < o + NAME_BYTES && (b[end] !== 0 || b[end + 1] !== 0)) end += 2;
  return b.toString('utf16le', o, end);
}

function isZero(b: Buffer, o: number, length: number): boolean {
  for (let i = o; i < o + length; i++) if (b[i] !== 0) return false;
  return true;
}

function hex32(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}
