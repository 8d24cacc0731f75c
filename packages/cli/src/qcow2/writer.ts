import fs from 'node:fs/promises';
import { InvalidArgumentError } from '@blkfilter/bio';
import {
  DEFAULT_CLUSTER_SIZE,
  EXT_BACKING_FORMAT,
  EXT_END,
  HEADER_LENGTH,
  OFLAG_COPIED,
  OFLAG_ZERO,
  QCOW2_MAGIC,
  QCOW2_VERSION,
  REFCOUNT_ORDER,
} from './format.js';

/** Options of {@link Qcow2Writer.create}. */
export interface Qcow2WriterOptions {
  /** Size of the virtual disk in bytes. */
  readonly virtualSize: number;
  /** Cluster size: a power of two from 4 KiB to 2 MiB (default 64 KiB). */
  readonly clusterSize?: number;
  /** Backing file, as qemu will resolve it: relative names are relative to this image's folder. */
  readonly backingFile?: string;
  /** Format of the backing file (default `qcow2`). */
  readonly backingFormat?: 'qcow2' | 'raw';
}

/**
 * Writes a qcow2 (v3) image in one pass: guest clusters are given in ascending order, as data
 * or as zero clusters (which hide the backing file); clusters never given read from the backing
 * file, or as zeros without one. Data and L2 tables are written as they come, so memory stays
 * at one L2 table whatever the disk size; the L1 table, refcounts and header go last, and the
 * header is written only once everything else is on disk, so a crash leaves no valid-looking
 * half image.
 */
export class Qcow2Writer {
  readonly path: string;
  readonly virtualSize: number;
  readonly clusterSize: number;
  private readonly fh: fs.FileHandle;
  private readonly backingFile: string | null;
  private readonly backingFormat: string;
  private readonly l2Entries: number;
  private readonly l1: BigUint64Array;
  private l2: Buffer;
  private l2Index = -1;
  private nextCluster = 1; // cluster 0 is the header
  private lastGuestCluster = -1;
  private closed = false;
  /** Guest bytes stored as data clusters. */
  dataBytes = 0;
  /** Guest clusters stored as zero clusters. */
  zeroClusters = 0;

  private constructor(path: string, fh: fs.FileHandle, options: Qcow2WriterOptions, clusterSize: number) {
    this.path = path;
    this.fh = fh;
    this.virtualSize = options.virtualSize;
    this.clusterSize = clusterSize;
    this.backingFile = options.backingFile ?? null;
    this.backingFormat = options.backingFormat ?? 'qcow2';
    this.l2Entries = clusterSize / 8;
    const l1Size = Math.max(1, Math.ceil(options.virtualSize / clusterSize / this.l2Entries));
    this.l1 = new BigUint64Array(l1Size);
    this.l2 = Buffer.alloc(clusterSize);
  }

  /** Creates the image file (refusing to overwrite one) and returns a writer for it. */
  static async create(path: string, options: Qcow2WriterOptions): Promise<Qcow2Writer> {
    const clusterSize = options.clusterSize ?? DEFAULT_CLUSTER_SIZE;
    if (!Number.isInteger(clusterSize) || clusterSize < 4096 || clusterSize > 2 << 20 || (clusterSize & (clusterSize - 1)) !== 0) {
      throw new InvalidArgumentError(`qcow2 cluster size ${clusterSize} must be a power of two from 4096 to 2097152`);
    }
    if (!Number.isSafeInteger(options.virtualSize) || options.virtualSize <= 0 || options.virtualSize % 512 !== 0) {
      throw new InvalidArgumentError(`qcow2 virtual size ${options.virtualSize} must be a positive multiple of 512`);
    }
    if (options.backingFile !== undefined && Buffer.byteLength(options.backingFile) > 1023) {
      throw new InvalidArgumentError(`qcow2 backing file name is longer than 1023 bytes: ${options.backingFile}`);
    }
    const fh = await fs.open(path, 'wx');
    return new Qcow2Writer(path, fh, options, clusterSize);
  }

  /** Number of guest clusters of the virtual disk. */
  get guestClusters(): number {
    return Math.ceil(this.virtualSize / this.clusterSize);
  }

  /**
   * Stores guest cluster `index` as data. `data` holds the cluster's bytes (the last cluster
   * of the disk may be shorter; it is padded with zeros). Clusters must come in ascending order.
   */
  async writeCluster(index: number, data: Uint8Array): Promise<void> {
    this.checkIndex(index);
    if (data.length > this.clusterSize) throw new InvalidArgumentError(`cluster data of ${data.length} bytes exceeds the cluster size ${this.clusterSize}`);
    await this.enterL2(index);
    const host = this.allocCluster();
    let buf = data;
    if (data.length < this.clusterSize) {
      const padded = Buffer.alloc(this.clusterSize);
      padded.set(data);
      buf = padded;
    }
    await this.fh.write(buf, 0, this.clusterSize, host);
    this.setL2(index, BigInt(host) | OFLAG_COPIED);
    this.dataBytes += Math.min(this.clusterSize, this.virtualSize - index * this.clusterSize);
  }

  /** Stores guest cluster `index` as a zero cluster: reads as zeros, hiding the backing file. */
  async zeroCluster(index: number): Promise<void> {
    this.checkIndex(index);
    await this.enterL2(index);
    this.setL2(index, OFLAG_ZERO);
    this.zeroClusters++;
  }

  private checkIndex(index: number): void {
    if (this.closed) throw new InvalidArgumentError(`qcow2 writer for ${this.path} is closed`);
    if (!Number.isInteger(index) || index < 0 || index >= this.guestClusters) {
      throw new InvalidArgumentError(`guest cluster ${index} is outside the ${this.guestClusters} clusters of ${this.path}`);
    }
    if (index <= this.lastGuestCluster) {
      throw new InvalidArgumentError(`guest clusters must be written in ascending order: ${index} after ${this.lastGuestCluster}`);
    }
    this.lastGuestCluster = index;
  }

  private setL2(index: number, entry: bigint): void {
    this.l2.writeBigUInt64BE(entry, (index % this.l2Entries) * 8);
  }

  private allocCluster(): number {
    return this.nextCluster++ * this.clusterSize;
  }

  /** Moves to the L2 table covering guest cluster `index`, writing out the previous one. */
  private async enterL2(index: number): Promise<void> {
    const l1Index = Math.floor(index / this.l2Entries);
    if (l1Index === this.l2Index) return;
    await this.flushL2();
    this.l2Index = l1Index;
    this.l2.fill(0);
  }

  private async flushL2(): Promise<void> {
    if (this.l2Index < 0) return;
    const host = this.allocCluster();
    await this.fh.write(this.l2, 0, this.clusterSize, host);
    this.l1[this.l2Index] = BigInt(host) | OFLAG_COPIED;
    this.l2Index = -1;
  }

  /** Writes the L1 table, refcounts and header, syncs and closes the file. */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      await this.flushL2();
      const cs = this.clusterSize;
      // L1 table.
      const l1Bytes = this.l1.length * 8;
      const l1Clusters = Math.ceil(l1Bytes / cs);
      const l1Offset = this.nextCluster * cs;
      this.nextCluster += l1Clusters;
      const l1Buf = Buffer.alloc(l1Clusters * cs);
      for (let i = 0; i < this.l1.length; i++) l1Buf.writeBigUInt64BE(this.l1[i] as bigint, i * 8);
      await this.fh.write(l1Buf, 0, l1Buf.length, l1Offset);
      // Refcounts: blocks and the table must count themselves too, so grow to a fixed point.
      const perBlock = (cs * 8) >> REFCOUNT_ORDER;
      let blocks = 0;
      let tableClusters = 0;
      for (;;) {
        const total = this.nextCluster + blocks + tableClusters;
        const needBlocks = Math.ceil(total / perBlock);
        const needTable = Math.ceil((needBlocks * 8) / cs);
        if (needBlocks === blocks && needTable === tableClusters) break;
        blocks = needBlocks;
        tableClusters = needTable;
      }
      const tableOffset = this.nextCluster * cs;
      const firstBlock = this.nextCluster + tableClusters;
      const total = firstBlock + blocks;
      const table = Buffer.alloc(tableClusters * cs);
      for (let b = 0; b < blocks; b++) table.writeBigUInt64BE(BigInt((firstBlock + b) * cs), b * 8);
      await this.fh.write(table, 0, table.length, tableOffset);
      const block = Buffer.alloc(cs);
      for (let b = 0; b < blocks; b++) {
        block.fill(0);
        const from = b * perBlock;
        const to = Math.min(total, from + perBlock);
        for (let c = from; c < to; c++) block.writeUInt16BE(1, (c - from) * 2);
        await this.fh.write(block, 0, cs, (firstBlock + b) * cs);
      }
      this.nextCluster = total;
      await this.fh.sync();
      // The header last: until it is written, the file is not a qcow2 image at all.
      await this.fh.write(this.header(l1Offset, tableOffset, tableClusters), 0, cs, 0);
      await this.fh.sync();
      this.closed = true;
    } finally {
      await this.fh.close();
    }
  }

  private header(l1Offset: number, refcountTableOffset: number, refcountTableClusters: number): Buffer {
    const h = Buffer.alloc(this.clusterSize);
    h.writeUInt32BE(QCOW2_MAGIC, 0);
    h.writeUInt32BE(QCOW2_VERSION, 4);
    h.writeUInt32BE(Math.log2(this.clusterSize), 20);
    h.writeBigUInt64BE(BigInt(this.virtualSize), 24);
    h.writeUInt32BE(0, 32); // no encryption
    h.writeUInt32BE(this.l1.length, 36);
    h.writeBigUInt64BE(BigInt(l1Offset), 40);
    h.writeBigUInt64BE(BigInt(refcountTableOffset), 48);
    h.writeUInt32BE(refcountTableClusters, 56);
    // nb_snapshots, snapshots_offset, feature bits: all zero.
    h.writeUInt32BE(REFCOUNT_ORDER, 96);
    h.writeUInt32BE(HEADER_LENGTH, 100);
    let pos = HEADER_LENGTH;
    if (this.backingFile !== null) {
      const fmt = Buffer.from(this.backingFormat);
      h.writeUInt32BE(EXT_BACKING_FORMAT, pos);
      h.writeUInt32BE(fmt.length, pos + 4);
      fmt.copy(h, pos + 8);
      pos += 8 + Math.ceil(fmt.length / 8) * 8;
    }
    h.writeUInt32BE(EXT_END, pos);
    h.writeUInt32BE(0, pos + 4);
    pos += 8;
    if (this.backingFile !== null) {
      const name = Buffer.from(this.backingFile);
      h.writeBigUInt64BE(BigInt(pos), 8);
      h.writeUInt32BE(name.length, 16);
      name.copy(h, pos);
    }
    return h;
  }

  /** Closes and deletes the partial image (after a failed backup). */
  async abort(): Promise<void> {
    this.closed = true;
    await this.fh.close().catch(() => {});
    await fs.rm(this.path, { force: true });
  }
}
