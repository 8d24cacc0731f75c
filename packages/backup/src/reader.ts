import fs from 'node:fs/promises';
import path from 'node:path';
import { inflateRawSync } from 'node:zlib';
import { InvalidArgumentError, NotSupportedError } from '@blkfilter/bio';
import { ImageFormatError } from './errors.js';
import {
  COMPRESSION_DEFLATE,
  COMPRESSION_ZSTD,
  compressedShift,
  EXT_BACKING_FORMAT,
  EXT_END,
  INCOMPAT_COMPRESSION_TYPE,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTENDED_L2,
  INCOMPAT_EXTERNAL_DATA,
  INCOMPAT_KNOWN,
  L1_RESERVED,
  L2_RESERVED,
  MAX_BACKING_NAME,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  OFFSET_MASK,
  OFLAG_COMPRESSED,
  OFLAG_COPIED,
  OFLAG_ZERO,
  QCOW2_MAGIC,
} from './format.js';
import { readExact, readExactv } from './fsutil.js';

/** What a guest cluster of one image (not its backing chain) holds. */
export const ClusterState = {
  /** Not allocated here: the backing file (or zeros) shows through. */
  UNALLOCATED: 0,
  /** Reads as zeros, hiding the backing file. */
  ZERO: 1,
  /** Data at a host offset in this file. */
  DATA: 2,
  /** Deflate-compressed data at a (byte) host offset in this file. */
  COMPRESSED: 3,
} as const;
export type ClusterState = (typeof ClusterState)[keyof typeof ClusterState];

/** Where one guest cluster of one image lives. */
export interface ClusterInfo {
  readonly state: ClusterState;
  /** Host offset of the data (DATA: cluster aligned; COMPRESSED: any byte), 0 when none. */
  readonly hostOffset: number;
  /** Bytes of compressed data to read at `hostOffset` (COMPRESSED only). */
  readonly compressedBytes: number;
  /** Offset in the file of the L2 entry that says so (0 when the L1 entry is empty). */
  readonly entryOffset: number;
}

const UNALLOCATED: ClusterInfo = { state: ClusterState.UNALLOCATED, hostOffset: 0, compressedBytes: 0, entryOffset: 0 };

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

  /** Opens a raw image; its virtual size is the file size. */
  static async open(file: string): Promise<RawReader> {
    const fh = await fs.open(file, 'r');
    const st = await fh.stat();
    return new RawReader(file, st.size, fh);
  }

  async read(offset: number, length: number, into: Buffer): Promise<void> {
    const n = Math.max(0, Math.min(length, this.virtualSize - offset));
    if (n > 0) await readExact(this.fh, this.path, into, n, offset, 'raw image data');
    into.fill(0, Math.max(0, n), length);
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}

/** How {@link Qcow2Reader.open} finds a backing file. */
export type BackingResolver = (name: string, format: string, from: Qcow2Reader) => Promise<ImageReader>;

/** Options of {@link Qcow2Reader.open}. */
export interface Qcow2OpenOptions {
  /**
   * `true` (default): open the backing chain, relative names against the image's folder;
   * `false`: do not (reads of unallocated clusters then give zeros); or a function that opens it.
   */
  readonly backing?: boolean | BackingResolver;
  /** Refuse backing names that are not a plain file name in the image's own folder. */
  readonly confined?: boolean;
}

/** What {@link Qcow2Reader.check} found: sizes, for reports. */
export interface CheckResult {
  readonly hostClusters: number;
  readonly dataClusters: number;
  readonly compressedClusters: number;
  readonly zeroClusters: number;
}

const decoder = new TextDecoder('utf-8', { fatal: true });

const KIND_META = 1;
const KIND_DATA = 2;
const KIND_COMPRESSED = 3;

/**
 * Reads a qcow2 image (v2 or v3; deflate-compressed clusters; no encryption, external data
 * or extended L2) and, through it, its backing chain. Every length read is checked (a short
 * read is an error, never zeros), every header field, L1/L2 entry and offset is checked against
 * the file size, the alignment and the reserved bits before it is used; each failure is an
 * {@link ImageFormatError} naming the file and the offset. {@link check} adds what
 * `qemu-img check` checks: overlapping clusters and refcounts. L2 tables are read on demand
 * and the last 16 are cached.
 */
export class Qcow2Reader implements ImageReader {
  readonly backing: ImageReader | null;
  private readonly l2Cache = new Map<number, Buffer>();
  private readonly l2Entries: number;
  private lastCompressedHost = -1;
  private readonly lastCompressed: Buffer;

  private constructor(
    readonly path: string,
    private readonly fh: fs.FileHandle,
    /** Size of the file in bytes. */
    readonly fileSize: number,
    readonly version: number,
    readonly clusterBits: number,
    readonly virtualSize: number,
    private readonly l1: BigUint64Array,
    private readonly l1Offset: number,
    private readonly refcountTableOffset: number,
    private readonly refcountTableClusters: number,
    readonly refcountOrder: number,
    readonly snapshots: number,
    /** The backing file name as the header holds it, or null. */
    readonly backingFile: string | null,
    /** The backing format from the header extension ('' when absent). */
    readonly backingFormat: string,
    backing: ImageReader | null,
  ) {
    this.backing = backing;
    this.l2Entries = this.clusterSize / 8;
    this.lastCompressed = Buffer.alloc(this.clusterSize);
  }

  /** Bytes per cluster. */
  get clusterSize(): number {
    return 2 ** this.clusterBits;
  }

  /** Guest clusters of the virtual disk. */
  get guestClusters(): number {
    return Math.ceil(this.virtualSize / this.clusterSize);
  }

  /**
   * Opens `file` and (unless told otherwise) its backing chain, validating the header, the
   * header extensions, the backing file name and the L1 table.
   */
  static async open(file: string, options: Qcow2OpenOptions = {}, depth = 0): Promise<Qcow2Reader> {
    if (depth > 64) throw new ImageFormatError(file, null, 'backing chain deeper than 64 images (a loop?)');
    const fh = await fs.open(file, 'r');
    let backing: ImageReader | null = null;
    try {
      const fileSize = (await fh.stat()).size;
      const bad = (offset: number | null, message: string): ImageFormatError => new ImageFormatError(file, offset, message);
      if (fileSize < 72) throw bad(0, `expected a qcow2 header of at least 72 bytes, the file has ${fileSize} (truncated or not an image)`);
      let head = Buffer.alloc(Math.min(fileSize, 4096));
      await readExact(fh, file, head, head.length, 0, 'qcow2 header');
      const magic = head.readUInt32BE(0);
      if (magic !== QCOW2_MAGIC) throw bad(0, `bad magic 0x${magic.toString(16)}: expected 0x${QCOW2_MAGIC.toString(16)} ("QFI\\xfb"), this is not a qcow2 image`);
      const version = head.readUInt32BE(4);
      if (version !== 2 && version !== 3) throw bad(4, `qcow2 version ${version}: expected 2 or 3`);
      const clusterBits = head.readUInt32BE(20);
      if (clusterBits < 9 || clusterBits > 21) throw bad(20, `cluster_bits ${clusterBits}: expected 9 to 21`);
      const cs = 2 ** clusterBits;
      if (cs > head.length && fileSize > head.length) {
        head = Buffer.alloc(Math.min(cs, fileSize));
        await readExact(fh, file, head, head.length, 0, 'qcow2 header cluster');
      }
      const virtualSize64 = head.readBigUInt64BE(24);
      if (virtualSize64 > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(24, `virtual size ${virtualSize64} is larger than this reader handles (2^53 bytes)`);
      const virtualSize = Number(virtualSize64);
      const crypt = head.readUInt32BE(32);
      if (crypt !== 0) throw new NotSupportedError(`${file}: encrypted qcow2 images (crypt_method ${crypt}) are not supported`);
      const l1Size = head.readUInt32BE(36);
      const l1Offset = Number(head.readBigUInt64BE(40));
      const rtOffset = Number(head.readBigUInt64BE(48));
      const rtClusters = head.readUInt32BE(56);
      const snapshots = head.readUInt32BE(60);
      const snapshotsOffset = Number(head.readBigUInt64BE(64));
      let refcountOrder = 4;
      let headerLength = 72;
      let compressionType = COMPRESSION_DEFLATE;
      if (version === 3) {
        if (head.length < 104) throw bad(0, `expected a version 3 header of at least 104 bytes, the file has ${fileSize}`);
        const incompatible = head.readBigUInt64BE(72);
        if ((incompatible & INCOMPAT_DIRTY) !== 0n) throw bad(72, 'the image is marked dirty (it was not closed cleanly); `qemu-img check -r all` repairs it, but a backup image should never be dirty');
        if ((incompatible & INCOMPAT_CORRUPT) !== 0n) throw bad(72, 'the image is marked corrupt by qemu');
        if ((incompatible & INCOMPAT_EXTERNAL_DATA) !== 0n) throw new NotSupportedError(`${file}: qcow2 images with an external data file are not supported`);
        if ((incompatible & INCOMPAT_EXTENDED_L2) !== 0n) throw new NotSupportedError(`${file}: qcow2 images with extended L2 entries are not supported`);
        if ((incompatible & ~INCOMPAT_KNOWN) !== 0n) throw new NotSupportedError(`${file}: unknown incompatible qcow2 features 0x${incompatible.toString(16)}`);
        refcountOrder = head.readUInt32BE(96);
        if (refcountOrder > 6) throw bad(96, `refcount_order ${refcountOrder}: expected 0 to 6`);
        headerLength = head.readUInt32BE(100);
        if (headerLength < 104 || headerLength % 8 !== 0 || headerLength > Math.min(cs, head.length)) {
          throw bad(100, `header_length ${headerLength}: expected a multiple of 8 from 104 to the cluster size ${cs}`);
        }
        if ((incompatible & INCOMPAT_COMPRESSION_TYPE) !== 0n) {
          if (headerLength < 112) throw bad(100, `the compression type feature is set but header_length ${headerLength} has no compression_type field`);
          compressionType = head.readUInt8(104);
          if (compressionType === COMPRESSION_ZSTD) {
            throw new NotSupportedError(`${file}: zstd compressed clusters (compression_type 1) are not supported (Node 20 has no zstd); convert with \`qemu-img convert -O qcow2 -o compression_type=zlib\``);
          }
          if (compressionType !== COMPRESSION_DEFLATE) throw bad(104, `compression_type ${compressionType}: expected 0 (deflate) or 1 (zstd)`);
        } else if (headerLength > 104 && head.readUInt8(104) !== 0) {
          throw bad(104, `compression_type ${head.readUInt8(104)} without the compression type feature bit: expected 0`);
        }
      }
      // Tables: aligned, inside the file, not in the header cluster.
      const guestClusters = Math.ceil(virtualSize / cs);
      const needL1 = Math.ceil(guestClusters / (cs / 8));
      if (l1Size < needL1) throw bad(36, `l1_size ${l1Size} is too small for a ${virtualSize}-byte disk with ${cs}-byte clusters: expected at least ${needL1}`);
      if (l1Size * 8 > MAX_L1_BYTES) throw bad(36, `l1_size ${l1Size} is larger than qemu allows (${MAX_L1_BYTES / 8})`);
      if (l1Size > 0) checkTable(bad, 40, 'L1 table', l1Offset, l1Size * 8, cs, fileSize);
      if (rtClusters === 0) throw bad(56, 'refcount_table_clusters is 0: expected a refcount table');
      if (rtClusters * cs > MAX_REFTABLE_BYTES) throw bad(56, `refcount_table_clusters ${rtClusters} is larger than qemu allows`);
      checkTable(bad, 48, 'refcount table', rtOffset, rtClusters * cs, cs, fileSize);
      if (snapshots > 0) checkTable(bad, 64, 'snapshot table', snapshotsOffset, 1, cs, fileSize);
      // Header extensions, bounded by the header cluster.
      let backingFormat = '';
      let pos = headerLength;
      for (;;) {
        if (pos + 8 > head.length) throw bad(pos, `header extensions run past the header cluster (${head.length} bytes) without an end marker`);
        const type = head.readUInt32BE(pos);
        const len = head.readUInt32BE(pos + 4);
        if (type === EXT_END) break;
        if (pos + 8 + len > head.length) throw bad(pos, `header extension 0x${type.toString(16)} of ${len} bytes runs past the header cluster`);
        if (type === EXT_BACKING_FORMAT) backingFormat = head.toString('latin1', pos + 8, pos + 8 + len);
        pos += 8 + Math.ceil(len / 8) * 8;
      }
      // Backing file name: inside the header cluster, valid UTF-8, no NUL, no path escape.
      let backingFile: string | null = null;
      const bfOffset = Number(head.readBigUInt64BE(8));
      const bfSize = head.readUInt32BE(16);
      if (bfOffset !== 0) {
        if (bfSize === 0 || bfSize > MAX_BACKING_NAME) throw bad(16, `backing_file_size ${bfSize}: expected 1 to ${MAX_BACKING_NAME}`);
        if (bfOffset < pos + 8 || bfOffset + bfSize > Math.min(cs, head.length)) {
          throw bad(8, `backing file name at ${bfOffset} (${bfSize} bytes) is not inside the header cluster after the extensions`);
        }
        const raw = head.subarray(bfOffset, bfOffset + bfSize);
        try {
          backingFile = decoder.decode(raw);
        } catch {
          throw bad(bfOffset, 'the backing file name is not valid UTF-8');
        }
        if (backingFile.includes('\0')) throw bad(bfOffset, `the backing file name contains a NUL byte: ${JSON.stringify(backingFile)}`);
        if (options.confined === true && (backingFile.includes('/') || backingFile.includes('\\') || backingFile === '.' || backingFile === '..')) {
          throw bad(bfOffset, `backing file name ${JSON.stringify(backingFile)} leaves the backup folder: expected a plain file name next to the image`);
        }
        if (backingFormat !== '' && backingFormat !== 'qcow2' && backingFormat !== 'raw') {
          throw new NotSupportedError(`${file}: backing format "${backingFormat}" is not supported (qcow2 or raw)`);
        }
      } else if (bfSize !== 0) {
        throw bad(16, `backing_file_size ${bfSize} without a backing_file_offset`);
      }
      // L1 table: every entry checked once, here.
      const l1 = new BigUint64Array(l1Size);
      if (l1Size > 0) {
        const l1Buf = Buffer.alloc(l1Size * 8);
        await readExact(fh, file, l1Buf, l1Buf.length, l1Offset, 'L1 table');
        for (let i = 0; i < l1Size; i++) {
          const e = l1Buf.readBigUInt64BE(i * 8);
          l1[i] = e;
          const at = l1Offset + i * 8;
          if ((e & L1_RESERVED) !== 0n) throw bad(at, `L1 entry ${i} (0x${e.toString(16)}) has reserved bits set`);
          const off = Number(e & OFFSET_MASK);
          if (off === 0) {
            if (e !== 0n) throw bad(at, `L1 entry ${i} (0x${e.toString(16)}) has flags but no L2 table offset`);
            continue;
          }
          if (off % cs !== 0) throw bad(at, `L1 entry ${i}: L2 table offset ${off} is not aligned to the cluster size ${cs}`);
          if (off < cs || off + cs > fileSize) throw bad(at, `L1 entry ${i}: L2 table at ${off} is outside the file (${fileSize} bytes) or in the header cluster`);
          if (i >= needL1) throw bad(at, `L1 entry ${i} points to an L2 table beyond the end of the ${virtualSize}-byte disk`);
        }
      }
      const reader = new Qcow2Reader(file, fh, fileSize, version, clusterBits, virtualSize, l1, l1Offset, rtOffset, rtClusters, refcountOrder, snapshots, backingFile, backingFormat, null);
      if (backingFile !== null && options.backing !== false) {
        if (typeof options.backing === 'function') backing = await options.backing(backingFile, backingFormat, reader);
        else {
          const resolved = path.isAbsolute(backingFile) ? backingFile : path.join(path.dirname(file), backingFile);
          backing = backingFormat === 'raw' ? await RawReader.open(resolved) : await Qcow2Reader.open(resolved, options, depth + 1);
        }
        (reader as { backing: ImageReader | null }).backing = backing;
      }
      return reader;
    } catch (err) {
      await fh.close().catch(() => {});
      await backing?.close().catch(() => {});
      throw err;
    }
  }

  /** What this image (not its chain) holds for guest cluster `index`, and where; validated. */
  async clusterAt(index: number): Promise<ClusterInfo> {
    if (!Number.isInteger(index) || index < 0 || index >= this.guestClusters) {
      throw new InvalidArgumentError(`guest cluster ${index} is outside the ${this.guestClusters} clusters of ${this.path}`);
    }
    const l1e = this.l1[Math.floor(index / this.l2Entries)] ?? 0n;
    const l2Offset = Number(l1e & OFFSET_MASK);
    if (l2Offset === 0) return UNALLOCATED;
    const l2 = await this.l2Table(l2Offset);
    const slot = index % this.l2Entries;
    return this.decodeL2(l2.readBigUInt64BE(slot * 8), index, l2Offset + slot * 8);
  }

  /** Decodes and validates one L2 entry of guest cluster `index`, found at file offset `at`. */
  private decodeL2(e: bigint, index: number, at: number): ClusterInfo {
    if (e === 0n) return UNALLOCATED;
    const cs = this.clusterSize;
    const bad = (message: string): ImageFormatError => new ImageFormatError(this.path, at, `L2 entry of guest offset ${index * cs} (0x${e.toString(16)}): ${message}`);
    if ((e & OFLAG_COMPRESSED) !== 0n) {
      if ((e & OFLAG_COPIED) !== 0n) throw bad('a compressed cluster must not have the COPIED flag');
      const shift = compressedShift(this.clusterBits);
      const host = Number(e & ((1n << BigInt(shift)) - 1n));
      const sectors = Number((e >> BigInt(shift)) & ((1n << BigInt(62 - shift)) - 1n)) + 1;
      const bytes = sectors * 512 - (host % 512);
      if (host < cs || host >= this.fileSize) throw bad(`compressed data at ${host} is outside the file (${this.fileSize} bytes) or in the header cluster`);
      // The last sector may run past the end of the file (qemu reads zeros there); inflate
      // then decides whether the data is whole.
      return { state: ClusterState.COMPRESSED, hostOffset: host, compressedBytes: Math.min(bytes, this.fileSize - host), entryOffset: at };
    }
    if ((e & L2_RESERVED) !== 0n) throw bad('reserved bits are set');
    const host = Number(e & OFFSET_MASK);
    if ((e & OFLAG_ZERO) !== 0n && this.version < 3) throw bad('bit 0 is reserved in a version 2 image');
    if (host !== 0) {
      if (host % cs !== 0) throw bad(`host offset ${host} is not aligned to the cluster size ${cs}`);
      if (host < cs || host + Math.min(cs, this.virtualSize - index * cs) > this.fileSize) {
        throw bad(`cluster at host offset ${host} is outside the file (${this.fileSize} bytes) or in the header cluster`);
      }
    }
    if ((e & OFLAG_ZERO) !== 0n) return { state: ClusterState.ZERO, hostOffset: host, compressedBytes: 0, entryOffset: at };
    if (host === 0) throw bad('flags without a host offset');
    return { state: ClusterState.DATA, hostOffset: host, compressedBytes: 0, entryOffset: at };
  }

  private async l2Table(offset: number): Promise<Buffer> {
    let t = this.l2Cache.get(offset);
    if (t === undefined) {
      t = Buffer.alloc(this.clusterSize);
      await readExact(this.fh, this.path, t, this.clusterSize, offset, 'L2 table');
      if (this.l2Cache.size >= 16) this.l2Cache.delete(this.l2Cache.keys().next().value as number);
      this.l2Cache.set(offset, t);
    }
    return t;
  }

  /** Reads `length` bytes of this file at host `offset` (checked: never short). */
  async readHost(into: Uint8Array, length: number, offset: number, what: string): Promise<void> {
    await readExact(this.fh, this.path, into, length, offset, what);
  }

  /** Reads host bytes at `offset` into `parts`, one after the other (a scatter read). */
  async readHostv(parts: readonly Uint8Array[], offset: number, what: string): Promise<void> {
    await readExactv(this.fh, this.path, parts, offset, what);
  }

  /** Inflates the compressed cluster `info` (guest cluster `index`) into `into` (a whole cluster). */
  async readCompressed(index: number, info: ClusterInfo, into: Buffer): Promise<void> {
    if (this.lastCompressedHost !== info.hostOffset) {
      const buf = Buffer.alloc(info.compressedBytes);
      await readExact(this.fh, this.path, buf, buf.length, info.hostOffset, `compressed cluster of guest offset ${index * this.clusterSize}`);
      let out: Buffer;
      try {
        out = inflateRawSync(buf, { maxOutputLength: this.clusterSize });
      } catch (err) {
        throw new ImageFormatError(this.path, info.hostOffset, `compressed cluster of guest offset ${index * this.clusterSize} does not inflate: ${(err as Error).message}`, { cause: err });
      }
      if (out.length !== this.clusterSize) {
        throw new ImageFormatError(this.path, info.hostOffset, `compressed cluster of guest offset ${index * this.clusterSize} inflates to ${out.length} bytes: expected ${this.clusterSize}`);
      }
      out.copy(this.lastCompressed);
      this.lastCompressedHost = info.hostOffset;
    }
    this.lastCompressed.copy(into, 0, 0, this.clusterSize);
  }

  async read(offset: number, length: number, into: Buffer): Promise<void> {
    if (offset < 0 || length < 0 || !Number.isSafeInteger(offset + length)) throw new InvalidArgumentError(`read of ${length} bytes at ${offset} from ${this.path}`);
    const cs = this.clusterSize;
    let scratch: Buffer | null = null;
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / cs);
      const inCluster = pos % cs;
      const n = Math.min(length - done, cs - inCluster);
      const target = into.subarray(done, done + n);
      if (pos >= this.virtualSize) target.fill(0);
      else {
        const info = await this.clusterAt(index);
        if (info.state === ClusterState.DATA) await readExact(this.fh, this.path, target, n, info.hostOffset + inCluster, `data of guest offset ${pos}`);
        else if (info.state === ClusterState.COMPRESSED) {
          scratch ??= Buffer.alloc(cs);
          await this.readCompressed(index, info, scratch);
          scratch.copy(target, 0, inCluster, inCluster + n);
        } else if (info.state === ClusterState.ZERO || this.backing === null) target.fill(0);
        else await this.backing.read(pos, n, target);
      }
      done += n;
    }
  }

  /**
   * Checks the structure of this image (not its chain) as `qemu-img check` does: every L2
   * entry, every refcount table entry and block, no cluster used twice (metadata or data), no
   * cluster outside the file, COPIED flags, and every stored refcount equal to the count of
   * references. Calls `visit` with each allocated guest cluster, in ascending order.
   * Throws the first {@link ImageFormatError} found.
   */
  async check(visit?: (index: number, info: ClusterInfo) => void): Promise<CheckResult> {
    const cs = this.clusterSize;
    const file = this.path;
    if (this.snapshots > 0) throw new NotSupportedError(`${file}: checking images with internal snapshots is not supported (${this.snapshots} snapshots)`);
    const hostClusters = Math.ceil(this.fileSize / cs);
    const refs = new Uint32Array(hostClusters);
    const kind = new Uint8Array(hostClusters);
    const copied: Array<[number, number]> = []; // [host cluster, entry offset]
    const mark = (offset: number, length: number, k: number, what: string, at: number): void => {
      const first = Math.floor(offset / cs);
      const last = Math.floor((offset + length - 1) / cs);
      for (let c = first; c <= last; c++) {
        if (c >= hostClusters) throw new ImageFormatError(file, at, `${what} at ${offset} (${length} bytes) runs past the end of the file (${this.fileSize} bytes)`);
        if (kind[c] !== 0 && !(kind[c] === KIND_COMPRESSED && k === KIND_COMPRESSED)) {
          throw new ImageFormatError(file, at, `${what} at ${offset} overlaps another ${kind[c] === KIND_META ? 'metadata' : 'data'} cluster at host offset ${c * cs}`);
        }
        kind[c] = k;
        refs[c] = (refs[c] as number) + 1;
      }
    };
    mark(0, cs, KIND_META, 'header', 0);
    if (this.l1.length > 0) mark(this.l1Offset, this.l1.length * 8, KIND_META, 'L1 table', 40);
    mark(this.refcountTableOffset, this.refcountTableClusters * cs, KIND_META, 'refcount table', 48);
    const table = Buffer.alloc(this.refcountTableClusters * cs);
    await readExact(this.fh, file, table, table.length, this.refcountTableOffset, 'refcount table');
    const blocks: number[] = [];
    for (let i = 0; i < table.length / 8; i++) {
      const e = table.readBigUInt64BE(i * 8);
      const at = this.refcountTableOffset + i * 8;
      const off = Number(e & OFFSET_MASK);
      if (e !== BigInt(off)) throw new ImageFormatError(file, at, `refcount table entry ${i} (0x${e.toString(16)}) has reserved bits set`);
      blocks.push(off);
      if (off === 0) continue;
      if (off % cs !== 0) throw new ImageFormatError(file, at, `refcount block offset ${off} is not aligned to the cluster size ${cs}`);
      if (off + cs > this.fileSize) throw new ImageFormatError(file, at, `refcount block at ${off} is outside the file (${this.fileSize} bytes)`);
      mark(off, cs, KIND_META, `refcount block ${i}`, at);
    }
    let dataClusters = 0;
    let compressedClusters = 0;
    let zeroClusters = 0;
    const l2 = Buffer.alloc(cs);
    for (let i = 0; i < this.l1.length; i++) {
      const l1e = this.l1[i] as bigint;
      const l2Offset = Number(l1e & OFFSET_MASK);
      if (l2Offset === 0) continue;
      mark(l2Offset, cs, KIND_META, `L2 table ${i}`, this.l1Offset + i * 8);
      if ((l1e & OFLAG_COPIED) !== 0n) copied.push([l2Offset / cs, this.l1Offset + i * 8]);
      await readExact(this.fh, file, l2, cs, l2Offset, `L2 table ${i}`);
      for (let j = 0; j < this.l2Entries; j++) {
        const e = l2.readBigUInt64BE(j * 8);
        if (e === 0n) continue;
        const index = i * this.l2Entries + j;
        const at = l2Offset + j * 8;
        if (index >= this.guestClusters) throw new ImageFormatError(file, at, `L2 entry for guest cluster ${index}, beyond the end of the ${this.virtualSize}-byte disk, is not empty`);
        const info = this.decodeL2(e, index, at);
        if (info.state === ClusterState.COMPRESSED) {
          compressedClusters++;
          const start = info.hostOffset - (info.hostOffset % 512);
          const sectors = Math.ceil((info.hostOffset % 512 + info.compressedBytes) / 512);
          mark(start, Math.min(sectors * 512, hostClusters * cs - start), KIND_COMPRESSED, `compressed cluster of guest offset ${index * cs}`, at);
        } else if (info.hostOffset !== 0) {
          mark(info.hostOffset, cs, KIND_DATA, `data cluster of guest offset ${index * cs}`, at);
          if ((e & OFLAG_COPIED) !== 0n) copied.push([info.hostOffset / cs, at]);
        }
        if (info.state === ClusterState.DATA) dataClusters++;
        if (info.state === ClusterState.ZERO) zeroClusters++;
        visit?.(index, info);
      }
    }
    for (const [c, at] of copied) {
      if (refs[c] !== 1) throw new ImageFormatError(file, at, `the entry has the COPIED flag but the cluster at host offset ${c * cs} is referenced ${refs[c]} times`);
    }
    // Stored refcounts against the counted references.
    const bits = 2 ** this.refcountOrder;
    const perBlock = (cs * 8) / bits;
    const block = Buffer.alloc(cs);
    for (let b = 0; b < blocks.length; b++) {
      const off = blocks[b] as number;
      const first = b * perBlock;
      if (off === 0) {
        for (let c = first; c < Math.min(hostClusters, first + perBlock); c++) {
          if ((refs[c] as number) > 0) throw new ImageFormatError(file, this.refcountTableOffset + b * 8, `host cluster at offset ${c * cs} is in use but has no refcount block`);
        }
        continue;
      }
      await readExact(this.fh, file, block, cs, off, `refcount block ${b}`);
      for (let k = 0; k < perBlock; k++) {
        const c = first + k;
        const stored = refcountAt(block, k, bits);
        const expected = c < hostClusters ? (refs[c] as number) : 0;
        if (stored !== expected) {
          const at = off + Math.floor((k * bits) / 8);
          throw new ImageFormatError(
            file,
            at,
            c < hostClusters
              ? `refcount of the host cluster at offset ${c * cs} is ${stored}: expected ${expected} (the references counted as qemu-img check does)`
              : `refcount ${stored} for host offset ${c * cs}, beyond the end of the file (${this.fileSize} bytes): expected 0`,
          );
        }
      }
    }
    if (hostClusters > blocks.length * perBlock) {
      for (let c = blocks.length * perBlock; c < hostClusters; c++) {
        if ((refs[c] as number) > 0) throw new ImageFormatError(file, this.refcountTableOffset, `host cluster at offset ${c * cs} is in use but beyond what the refcount table covers`);
      }
    }
    return { hostClusters, dataClusters, compressedClusters, zeroClusters };
  }

  async close(): Promise<void> {
    await this.fh.close();
    await this.backing?.close();
  }
}

function refcountAt(block: Buffer, k: number, bits: number): number {
  if (bits === 16) return block.readUInt16BE(k * 2);
  if (bits === 8) return block.readUInt8(k);
  if (bits === 32) return block.readUInt32BE(k * 4);
  if (bits === 64) return Number(block.readBigUInt64BE(k * 8));
  // 1, 2, 4 bits: packed from the most significant bit? qemu packs from the least significant.
  const bitPos = k * bits;
  const byte = block.readUInt8(Math.floor(bitPos / 8));
  return (byte >> (bitPos % 8)) & ((1 << bits) - 1);
}

function checkTable(bad: (offset: number, message: string) => ImageFormatError, field: number, what: string, offset: number, length: number, cs: number, fileSize: number): void {
  if (offset % cs !== 0) throw bad(field, `${what} offset ${offset} is not aligned to the cluster size ${cs}`);
  if (offset < cs) throw bad(field, `${what} offset ${offset} is inside the header cluster`);
  if (offset + length > fileSize) throw bad(field, `${what} at ${offset} (${length} bytes) runs past the end of the file (${fileSize} bytes)`);
}

/** Opens an image by sniffing its magic: qcow2 (with its chain), else raw. */
export async function openImage(file: string): Promise<ImageReader> {
  const fh = await fs.open(file, 'r');
  const magic = Buffer.alloc(4);
  let n = 0;
  try {
    n = (await fh.read(magic, 0, 4, 0)).bytesRead;
  } finally {
    await fh.close();
  }
  return n === 4 && magic.readUInt32BE(0) === QCOW2_MAGIC ? Qcow2Reader.open(file) : RawReader.open(file);
}
