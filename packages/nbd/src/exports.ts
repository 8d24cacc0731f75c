import { getBlockDevice, InvalidArgumentError, IoStats, type BlockDev } from '@blkfilter/bio';
import { NBD_MAX_STRING, NbdTransmissionFlag } from './protocol.js';

/**
 * A `qemu:dirty-bitmap:<name>` context on an export, read from the CBT map of a device
 * (mirrors `qemu-nbd -B <name>`): a block is dirty (flag 1) when it changed after take `since`.
 */
export interface NbdBitmapConfig {
  /** The bitmap's name: clients select `qemu:dirty-bitmap:<name>`. */
  readonly name: string;
  /**
   * A take number of the CBT read map (`snapNumber` of a previous backup): blocks whose map value
   * is above it are dirty. 0 means "changed at all in this generation".
   */
  readonly since: number;
  /**
   * The generation id `since` belongs to. When given and the read map is of another generation
   * (CBT was reset since), every block is reported dirty: a full copy is needed.
   */
  readonly generationId?: string;
  /**
   * The device whose CBT map is read (default: the exported device). Set it when exporting a
   * snapshot image of a tracked device; the byte offsets of both must match.
   */
  readonly device?: BlockDev | string;
}

/**
 * Where a `qemu:allocation-depth` answer comes from (mirrors `qemu-nbd -A`): for a device built
 * from a chain of images (a backup point), how deep in the chain each byte lives.
 */
export interface AllocationDepthSource {
  /**
   * Runs covering exactly `[offset, offset + length)` of the export, in order, each longer than
   * 0: `depth` 0 is unallocated in the whole chain, 1 the top image, 2 its backing file, and so
   * on. Synchronous (from what the source holds in memory); must not throw for a range inside
   * the export.
   */
  allocationDepth(offset: number, length: number): ReadonlyArray<{ readonly length: number; readonly depth: number }>;
}

/** How one export is served. */
export interface NbdExportConfig {
  /** The device (disk, partition, snapshot image) or its registered name. */
  readonly device: BlockDev | string;
  /** Allow WRITE, TRIM and WRITE_ZEROES (default false: the export is read-only). */
  readonly writable?: boolean;
  /** Shown by `nbdinfo --list` and `NBD_INFO_DESCRIPTION`. */
  readonly description?: string;
  /** Offer `qemu:dirty-bitmap:<name>` from CBT (needs the `cbt` filter attached to the device). */
  readonly bitmap?: NbdBitmapConfig;
  /** Offer `qemu:allocation-depth` from this source (a whole-device export of a chain). */
  readonly allocationDepth?: AllocationDepthSource;
  /**
   * Advertise `NBD_FLAG_CAN_MULTI_CONN` (default true): every connection goes through the same
   * block layer, so a FLUSH on one covers writes completed on all.
   */
  readonly multiConn?: boolean;
  /**
   * Count this export's completed requests (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES: ops,
   * bytes, errors, latency from the request's arrival to its bio's completion) in these
   * counters. Off by default: a request then costs nothing extra.
   */
  readonly stats?: IoStats;
}

/** @internal an export as a connection uses it. */
export interface ExportEntry {
  readonly name: string;
  readonly device: BlockDev;
  readonly writable: boolean;
  readonly description: string | null;
  readonly multiConn: boolean;
  readonly bitmaps: readonly BitmapEntry[];
  readonly allocationDepth: AllocationDepthSource | null;
  readonly stats: IoStats | null;
}

/** @internal a resolved bitmap. */
export interface BitmapEntry {
  readonly name: string;
  readonly since: number;
  readonly generationId: string | null;
  readonly device: BlockDev;
}

function stringBytes(s: string): number {
  return Buffer.byteLength(s, 'utf8');
}

/** @internal checks a config and resolves device names (throws InvalidArgumentError / NoSuchDeviceError). */
export function resolveExport(name: string, config: NbdExportConfig): ExportEntry {
  if (typeof name !== 'string' || stringBytes(name) > NBD_MAX_STRING || name.includes('\0')) {
    throw new InvalidArgumentError(`NBD export name ${JSON.stringify(name)} is not valid: use at most ${NBD_MAX_STRING} bytes of UTF-8 without NUL`);
  }
  if (config === null || typeof config !== 'object') {
    throw new InvalidArgumentError(`NBD export ${JSON.stringify(name)}: expected { device, writable?, description?, bitmap? }, got ${String(config)}`);
  }
  const device = typeof config.device === 'string' ? getBlockDevice(config.device) : config.device;
  if (device === undefined || device === null || typeof device !== 'object' || !('disk' in device)) {
    throw new InvalidArgumentError(`NBD export ${JSON.stringify(name)}: "device" must be a BlockDev or the name of one`);
  }
  const description = config.description ?? null;
  if (description !== null && (typeof description !== 'string' || stringBytes(description) > NBD_MAX_STRING)) {
    throw new InvalidArgumentError(`NBD export ${JSON.stringify(name)}: description must be a string of at most ${NBD_MAX_STRING} bytes`);
  }
  if (config.stats !== undefined && !(config.stats instanceof IoStats)) {
    throw new InvalidArgumentError(`NBD export ${JSON.stringify(name)}: stats must be an IoStats from @blkfilter/bio`);
  }
  const depth = config.allocationDepth;
  if (depth !== undefined && (depth === null || typeof depth.allocationDepth !== 'function')) {
    throw new InvalidArgumentError(`NBD export ${JSON.stringify(name)}: allocationDepth must have an allocationDepth(offset, length) method`);
  }
  const bitmaps: BitmapEntry[] = [];
  const bm = config.bitmap;
  if (bm !== undefined) {
    if (typeof bm.name !== 'string' || bm.name === '' || stringBytes(bm.name) > NBD_MAX_STRING - 18) {
      throw new InvalidArgumentError(`NBD export ${JSON.stringify(name)}: bitmap.name must be a non-empty string`);
    }
    if (!Number.isInteger(bm.since) || bm.since < 0 || bm.since > 255) {
      throw new InvalidArgumentError(`NBD export ${JSON.stringify(name)}: bitmap.since must be a CBT take number 0..255, got ${String(bm.since)}`);
    }
    const bmDevice = bm.device === undefined ? device : typeof bm.device === 'string' ? getBlockDevice(bm.device) : bm.device;
    bitmaps.push({ name: bm.name, since: bm.since, generationId: bm.generationId ?? null, device: bmDevice });
  }
  return {
    name,
    device,
    writable: config.writable === true,
    description,
    multiConn: config.multiConn !== false,
    bitmaps,
    allocationDepth: config.allocationDepth ?? null,
    stats: config.stats ?? null,
  };
}

/** @internal true when the export refuses writes now. */
export function exportReadOnly(exp: ExportEntry): boolean {
  return !exp.writable || exp.device.readOnly;
}

/** @internal the transmission flags of `exp` for a client with or without structured replies. */
export function exportFlags(exp: ExportEntry, structured: boolean): number {
  let f = NbdTransmissionFlag.HAS_FLAGS | NbdTransmissionFlag.SEND_FLUSH | NbdTransmissionFlag.SEND_FUA | NbdTransmissionFlag.SEND_CACHE;
  if (exp.multiConn) f |= NbdTransmissionFlag.CAN_MULTI_CONN;
  if (structured) f |= NbdTransmissionFlag.SEND_DF;
  if (exportReadOnly(exp)) f |= NbdTransmissionFlag.READ_ONLY;
  else f |= NbdTransmissionFlag.SEND_TRIM | NbdTransmissionFlag.SEND_WRITE_ZEROES | NbdTransmissionFlag.SEND_FAST_ZERO;
  return f;
}

/** @internal a metadata context selected with NBD_OPT_SET_META_CONTEXT. */
export interface MetaContext {
  readonly id: number;
  readonly name: string;
  readonly bitmap: BitmapEntry | null;
  /** Set for `qemu:allocation-depth`. */
  readonly depth: AllocationDepthSource | null;
}
