import fs from 'node:fs/promises';
import path from 'node:path';
import { BlkError, InvalidArgumentError, NotSupportedError } from '@blkfilter/bio';
import {
  EXT_BACKING_FORMAT,
  EXT_END,
  OFFSET_MASK,
  OFLAG_COMPRESSED,
  OFLAG_ZERO,
  QCOW2_MAGIC,
} from './format.js';

/** What a guest cluster of an image (not its backing chain) holds. */
export const ClusterState = {
  /** Not allocated here: the backing file (or zeros) shows through. */
  UNALLOCATED: 0,
  /** Reads as zeros, hiding the backing file. */
  ZERO: 1,
  /** Data at a host offset in this file. */
  DATA: 2,
} as const;
export type ClusterState = (typeof ClusterState)[keyof typeof ClusterState];

/** A malformed or unsupported image. */
export class ImageFormatError extends BlkError {
  constructor(message: string) {
    super('EBADIMG', message);
  }
}

/** Something that reads guest bytes: a qcow2 image (with its backing chain) or a raw file. */
export interface ImageReader {
  readonly path: string;
  readonly virtualSize: number;
  /** Reads `length` bytes at guest `offset` into `into` (zeros past the end). */
  read(offset: number, length: number, into: Buffer): Promise<void>;
  close(): Promise<void>;
}

/** A raw image read as a guest disk. */
export class RawReader implements ImageReader {
  private constructor(
    readonly path: string,
    readonly virtualSize: number,
    private readonly fh: fs.FileHandle,
  ) {}

  static async open(file: string): Promise<RawReader> {
    const fh = await fs.open(file, 'r');
    const st = await fh.stat();
    return new RawReader(file, st.size, fh);
  }

  async read(offset: number, length: number, into: Buffer): Promise<void> {
    into.fill(0, 0, length);
    const n = Math.max(0, Math.min(length, this.virtualSize - offset));
    let done = 0;
    while (done < n) {
      const { bytesRead } = await this.fh.read(into, done, n - done, offset + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}

/**
 * Reads a qcow2 image (v2 or v3, no encryption or compression) and, through it, its backing
 * chain. L2 tables are read on demand and the last few are cached.
 */
export class Qcow2Reader implements ImageReader {
  readonly backing: ImageReader | null;
  readonly backingFile: string | null;
  private readonly l2Cache = new Map<number, Buffer>();

  private constructor(
    readonly path: string,
    readonly virtualSize: number,
    readonly clusterSize: number,
    private readonly fh: fs.FileHandle,
    private readonly l1: BigUint64Array,
    backing: ImageReader | null,
    backingFile: string | null,
  ) {
    this.backing = backing;
    this.backingFile = backingFile;
  }

  /** Opens `file` and its backing chain (relative names resolve against the image's folder). */
  static async open(file: string, depth = 0): Promise<Qcow2Reader> {
    if (depth > 64) throw new ImageFormatError(`${file}: backing chain deeper than 64 images (a loop?)`);
    const fh = await fs.open(file, 'r');
    try {
      const head = Buffer.alloc(4096);
      await fh.read(head, 0, head.length, 0);
      if (head.readUInt32BE(0) !== QCOW2_MAGIC) throw new ImageFormatError(`${file} is not a qcow2 image (bad magic)`);
      const version = head.readUInt32BE(4);
      if (version !== 2 && version !== 3) throw new ImageFormatError(`${file}: qcow2 version ${version} is not supported (2 or 3)`);
      const clusterBits = head.readUInt32BE(20);
      if (clusterBits < 9 || clusterBits > 21) throw new ImageFormatError(`${file}: cluster_bits ${clusterBits} out of range`);
      const clusterSize = 2 ** clusterBits;
      const virtualSize = Number(head.readBigUInt64BE(24));
      if (head.readUInt32BE(32) !== 0) throw new NotSupportedError(`${file}: encrypted qcow2 images are not supported`);
      const l1Size = head.readUInt32BE(36);
      const l1Offset = Number(head.readBigUInt64BE(40));
      if (version === 3) {
        const incompatible = head.readBigUInt64BE(72);
        // Bit 0 dirty and bit 1 corrupt make the image untrustworthy; others are features we lack.
        if (incompatible !== 0n) throw new NotSupportedError(`${file}: incompatible qcow2 features 0x${incompatible.toString(16)} are not supported`);
      }
      const l1Buf = Buffer.alloc(l1Size * 8);
      if (l1Size > 0) await fh.read(l1Buf, 0, l1Buf.length, l1Offset);
      const l1 = new BigUint64Array(l1Size);
      for (let i = 0; i < l1Size; i++) l1[i] = l1Buf.readBigUInt64BE(i * 8);
      let backingFile: string | null = null;
      let backing: ImageReader | null = null;
      const bfOffset = Number(head.readBigUInt64BE(8));
      const bfSize = head.readUInt32BE(16);
      if (bfOffset !== 0 && bfSize > 0) {
        const nameBuf = Buffer.alloc(bfSize);
        await fh.read(nameBuf, 0, bfSize, bfOffset);
        backingFile = nameBuf.toString('utf8');
        let format = '';
        if (version === 3) {
          const headerLength = head.readUInt32BE(100);
          for (let pos = headerLength; pos + 8 <= head.length; ) {
            const type = head.readUInt32BE(pos);
            const len = head.readUInt32BE(pos + 4);
            if (type === EXT_END) break;
            if (type === EXT_BACKING_FORMAT) format = head.toString('utf8', pos + 8, pos + 8 + len);
            pos += 8 + Math.ceil(len / 8) * 8;
          }
        }
        const resolved = path.isAbsolute(backingFile) ? backingFile : path.join(path.dirname(file), backingFile);
        backing = format === 'raw' ? await RawReader.open(resolved) : await Qcow2Reader.open(resolved, depth + 1);
      }
      return new Qcow2Reader(file, virtualSize, clusterSize, fh, l1, backing, backingFile);
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  /** Guest clusters of the virtual disk. */
  get guestClusters(): number {
    return Math.ceil(this.virtualSize / this.clusterSize);
  }

  /** What this image (not its chain) holds for guest cluster `index`, and where. */
  async clusterAt(index: number): Promise<{ state: ClusterState; hostOffset: number }> {
    const l2Entries = this.clusterSize / 8;
    const l1e = this.l1[Math.floor(index / l2Entries)] ?? 0n;
    const l2Offset = Number(l1e & OFFSET_MASK);
    if (l2Offset === 0) return { state: ClusterState.UNALLOCATED, hostOffset: 0 };
    const l2 = await this.l2Table(l2Offset);
    const e = l2.readBigUInt64BE((index % l2Entries) * 8);
    if ((e & OFLAG_COMPRESSED) !== 0n) throw new NotSupportedError(`${this.path}: compressed clusters are not supported`);
    if ((e & OFLAG_ZERO) !== 0n) return { state: ClusterState.ZERO, hostOffset: 0 };
    const host = Number(e & OFFSET_MASK);
    return host === 0 ? { state: ClusterState.UNALLOCATED, hostOffset: 0 } : { state: ClusterState.DATA, hostOffset: host };
  }

  private async l2Table(offset: number): Promise<Buffer> {
    let t = this.l2Cache.get(offset);
    if (t === undefined) {
      t = Buffer.alloc(this.clusterSize);
      await this.fh.read(t, 0, this.clusterSize, offset);
      if (this.l2Cache.size >= 16) this.l2Cache.delete(this.l2Cache.keys().next().value as number);
      this.l2Cache.set(offset, t);
    }
    return t;
  }

  async read(offset: number, length: number, into: Buffer): Promise<void> {
    if (offset < 0 || length < 0) throw new InvalidArgumentError(`read of ${length} bytes at ${offset} from ${this.path}`);
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / this.clusterSize);
      const inCluster = pos % this.clusterSize;
      const n = Math.min(length - done, this.clusterSize - inCluster);
      const target = into.subarray(done, done + n);
      if (pos >= this.virtualSize) target.fill(0);
      else {
        const { state, hostOffset } = await this.clusterAt(index);
        if (state === ClusterState.DATA) await this.fh.read(target, 0, n, hostOffset + inCluster);
        else if (state === ClusterState.ZERO || this.backing === null) target.fill(0);
        else await this.backing.read(pos, n, target);
      }
      done += n;
    }
  }

  async close(): Promise<void> {
    await this.fh.close();
    await this.backing?.close();
  }
}

/** Opens an image by sniffing its magic: qcow2, else raw. */
export async function openImage(file: string): Promise<ImageReader> {
  const fh = await fs.open(file, 'r');
  const magic = Buffer.alloc(4);
  try {
    await fh.read(magic, 0, 4, 0);
  } finally {
    await fh.close();
  }
  return magic.readUInt32BE(0) === QCOW2_MAGIC ? Qcow2Reader.open(file) : RawReader.open(file);
}
