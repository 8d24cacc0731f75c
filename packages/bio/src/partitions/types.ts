/** One entry of a partition table, in 512-byte sectors of the whole disk. */
export interface PartitionInfo {
  /** Partition number as Linux numbers it: 1-4 primary (MBR) or entry index + 1 (GPT); 5+ logical. */
  readonly partno: number;
  /** First sector (512-byte units) on the whole disk. */
  readonly start: number;
  /** Length in 512-byte sectors. */
  readonly size: number;
  /** MBR: two hex digits as sfdisk prints them (`'83'`, `'5'` -> `'5'`); GPT: the type GUID, upper case. */
  readonly type: string;
  /** MBR: `'primary' | 'extended' | 'logical'`; GPT: `'gpt'`. */
  readonly kind: 'primary' | 'extended' | 'logical' | 'gpt';
  /** GPT: unique partition GUID, upper case; MBR: undefined. */
  readonly uuid?: string;
  /** GPT: partition name (UTF-16LE decoded); MBR: undefined. */
  readonly name?: string;
  /** MBR: the boot indicator (0x80) is set. */
  readonly bootable?: boolean;
  /** GPT: the attribute bits as a bigint. */
  readonly attributes?: bigint;
}

/** A partition table read from a device. */
export interface PartitionTable {
  /** `'dos'` for MBR, `'gpt'` for GPT (sfdisk's labels). */
  readonly label: 'dos' | 'gpt';
  /** Disk identifier: MBR `'0x1234abcd'`; GPT the disk GUID, upper case (as `sfdisk --json` prints them). */
  readonly id: string;
  /** Logical block size the table was read with. */
  readonly sectorSize: number;
  /** GPT: first and last usable LBA (in logical blocks). */
  readonly firstLba?: number;
  readonly lastLba?: number;
  /** GPT: the primary header was corrupt and the backup header was used. */
  readonly usedBackup?: boolean;
  /** The partitions, ordered by partition number. */
  readonly partitions: readonly PartitionInfo[];
}
