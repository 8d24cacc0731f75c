import fs from 'node:fs/promises';
import { deflateRawSync } from 'node:zlib';
import { InvalidArgumentError } from '@blkfilter/bio';
import {
  compressedShift,
  DEFAULT_CLUSTER_SIZE,
  DEFLATE_WINDOW_BITS,
  EXT_BACKING_FORMAT,
  EXT_END,
  HEADER_LENGTH,
  MAX_BACKING_NAME,
  OFLAG_COMPRESSED,
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
  /**
   * Store data clusters deflate-compressed (qcow2 compressed clusters, which every qemu reads);
   * a cluster that does not shrink by at least one sector is stored as it is.
   */
  readonly compress?: boolean;
}

const STAGE_BYTES = 4 << 20;

/**
 * Writes a qcow2 (v3) image in one pass: guest clusters are given in ascending order, as data
 * or as zero clusters (which hide the backing file); clusters never given read from the backing
 * file, or as zeros without one. Data and L2 tables are written as they come (contiguous host
 * writes coalesced up to 4 MiB), so memory stays at one L2 table whatever the disk size; the
 * L1 table, refcounts and header go last, and the header is written only after everything else
 * is synced, so a crash leaves no valid-looking half image.
 */
export class Qcow2Writer {
  readonly path: string;
  readonly virtualSize: number;
  readonly clusterSize: number;
  readonly compress: boolean;
  private readonly fh: fs.FileHandle;
  private readonly backingFile: string | null;
  private readonly backingFormat: string;
  private readonly l2Entries: number;
  private readonly l1: BigUint64Array;
  private readonly l2: Buffer;
  private l2Index = -1;
  private nextCluster = 1; // cluster 0 is the header
  private lastGuestCluster = -1;
  private closed = false;
  // Coalesced contiguous host writes.
  private readonly stage: Buffer;
  private stageHost = 0;
  private stageLen = 0;
  // Compressed clusters are packed, sector aligned, into host clusters of their own.
  private cHost = -1;
  private cUsed = 0;
  private cCount = 0;
  private readonly cBuf: Buffer;
  /** Host cluster index -> refcount, for the (compressed) clusters whose count is not 1. */
  private readonly refcounts = new Map<number, number>();
  /** Guest bytes stored as data clusters (compressed or not). */
  dataBytes = 0;
  /** Guest clusters stored as zero clusters. */
  zeroClusters = 0;
  /** Guest clusters stored compressed. */
  compressedClusters = 0;

  private constructor(path: string, fh: fs.FileHandle, options: Qcow2WriterOptions, clusterSize: number) {
    this.path = path;
    this.fh = fh;
    this.virtualSize = options.virtualSize;
    this.clusterSize = clusterSize;
    this.compress = options.compress === true;
    this.backingFile = options.backingFile ?? null;
    this.backingFormat = options.backingFormat ?? 'qcow2';
    this.l2Entries = clusterSize / 8;
    const l1Size = Math.max(1, Math.ceil(options.virtualSize / clusterSize / this.l2Entries));
    this.l1 = new BigUint64Array(l1Size);
    this.l2 = Buffer.alloc(clusterSize);
    this.stage = Buffer.allocUnsafe(Math.max(STAGE_BYTES, clusterSize));
    this.cBuf = Buffer.alloc(this.compress ? clusterSize : 0);
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
    if (options.backingFile !== undefined && Buffer.byteLength(options.backingFile) > MAX_BACKING_NAME) {
      throw new InvalidArgumentError(`qcow2 backing file name is longer than ${MAX_BACKING_NAME} bytes: ${options.backingFile}`);
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
    const cs = this.clusterSize;
    if (data.length > cs) throw new InvalidArgumentError(`cluster data of ${data.length} bytes exceeds the cluster size ${cs}`);
    await this.enterL2(index);
    this.dataBytes += Math.min(cs, this.virtualSize - index * cs);
    let buf = data;
    if (data.length < cs) {
      const padded = Buffer.alloc(cs);
      padded.set(data);
      buf = padded;
    }
    if (this.compress) {
      // qemu's window (-12): its inflate refuses streams that reach further back.
      const z = deflateRawSync(buf, { windowBits: DEFLATE_WINDOW_BITS, memLevel: 9 });
      const sectors = Math.ceil(z.length / 512);
      if (sectors * 512 < cs) {
        await this.writeCompressed(index, z, sectors);
        return;
      }
    }
    const host = this.allocCluster();
    await this.queue(host, buf);
    this.setL2(index, BigInt(host) | OFLAG_COPIED);
  }

  private async writeCompressed(index: number, z: Buffer, sectors: number): Promise<void> {
    const cs = this.clusterSize;
    if (this.cHost < 0 || this.cUsed + sectors * 512 > cs) {
      await this.flushCompressed();
      this.cHost = this.allocCluster();
      this.cUsed = 0;
      this.cCount = 0;
      this.cBuf.fill(0);
    }
    const host = this.cHost + this.cUsed;
    z.copy(this.cBuf, this.cUsed);
    this.cUsed += sectors * 512;
    this.cCount++;
    this.compressedClusters++;
    const shift = BigInt(compressedShift(Math.log2(cs)));
    this.setL2(index, OFLAG_COMPRESSED | (BigInt(sectors - 1) << shift) | BigInt(host));
  }

  private async flushCompressed(): Promise<void> {
    if (this.cHost < 0) return;
    await this.queue(this.cHost, this.cBuf);
    if (this.cCount !== 1) this.refcounts.set(this.cHost / this.clusterSize, this.cCount);
    this.cHost = -1;
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

  /** Writes `data` at `host`, joined to the staged write when contiguous. */
  private async queue(host: number, data: Uint8Array): Promise<void> {
    if (this.stageLen > 0 && (host !== this.stageHost + this.stageLen || this.stageLen + data.length > this.stage.length)) await this.flushStage();
    if (this.stageLen === 0) this.stageHost = host;
    this.stage.set(data, this.stageLen);
    this.stageLen += data.length;
  }

  private async flushStage(): Promise<void> {
    let done = 0;
    while (done < this.stageLen) {
      const { bytesWritten } = await this.fh.write(this.stage, done, this.stageLen - done, this.stageHost + done);
      done += bytesWritten;
    }
    this.stageLen = 0;
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
    await this.queue(host, this.l2);
    this.l1[this.l2Index] = BigInt(host) | OFLAG_COPIED;
    this.l2Index = -1;
  }

  /** Writes the L1 table, refcounts and header, syncs and closes the file. */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      await this.flushL2();
      await this.flushCompressed();
      const cs = this.clusterSize;
      const l1Bytes = this.l1.length * 8;
      const l1Clusters = Math.ceil(l1Bytes / cs);
      const l1Offset = this.nextCluster * cs;
      this.nextCluster += l1Clusters;
      const l1Buf = Buffer.alloc(l1Clusters * cs);
      for (let i = 0; i < this.l1.length; i++) l1Buf.writeBigUInt64BE(this.l1[i] as bigint, i * 8);
      await this.queue(l1Offset, l1Buf);
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
      await this.queue(tableOffset, table);
      const block = Buffer.alloc(cs);
      for (let b = 0; b < blocks; b++) {
        block.fill(0);
        const from = b * perBlock;
        const to = Math.min(total, from + perBlock);
        for (let c = Math.max(from, 1); c < to; c++) block.writeUInt16BE(this.refcounts.get(c) ?? 1, (c - from) * 2);
        if (from === 0) block.writeUInt16BE(1, 0); // the header
        await this.queue((firstBlock + b) * cs, block);
      }
      await this.flushStage();
      this.nextCluster = total;
      await this.fh.sync();
      // The header last: until it is written, the file is not a qcow2 image at all.
      const h = this.header(l1Offset, tableOffset, tableClusters);
      await this.fh.write(h, 0, h.length, 0);
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
    // nb_snapshots, snapshots_offset, feature bits: all zero (deflate needs no compression_type).
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
