import fs from 'node:fs';
import {
  Bio,
  BlkStatus,
  copyFromBioVecs,
  copyToBioVecs,
  InvalidArgumentError,
  ReqFlag,
  ReqOp,
  SECTOR_SIZE,
  sliceBioVecs,
  type BackendCapabilities,
  type BlockBackend,
  type BlockStatusExtent,
  type CompletionSink,
} from '@blkfilter/bio';
import { isZero } from './chain.js';

/** Options of {@link OverlayBackend}. */
export interface OverlayOptions {
  /** The read-only device below (a backup point). */
  readonly base: BlockBackend;
  /** A raw file for the overlay (created sparse at the base's size if missing), or null for memory. */
  readonly file: string | null;
  /**
   * Live restore: data read from the base is also written into the overlay (where the guest
   * did not write meanwhile), and {@link OverlayBackend.fillStep} copies the rest.
   */
  readonly copyOnRead?: boolean;
  /**
   * Sectors already in the overlay (a resumed live restore): one bit per 512-byte sector,
   * sector `s` at bit `s & 7` of byte `s >> 3`.
   */
  readonly present?: Uint8Array;
  /**
   * The overlay file is new and sparse (a live restore's target): zeros filled from the base
   * are marked present without being written, they already read as zeros.
   */
  readonly freshSparse?: boolean;
  /** Called after each FLUSH made the overlay durable (a live restore saves its map here). */
  readonly onDurable?: (present: Uint8Array) => void;
}

const CAPABILITIES: BackendCapabilities = { writeCache: true, discard: false, writeZeroes: true };
const MEMORY_PAGE = 64 << 10;

/** A read whose pieces come from the base: completes its parent when the last piece is done. */
class PieceGroup {
  parent: Bio | null = null;
  sink: CompletionSink | null = null;
  remaining = 0;
  status: BlkStatus = BlkStatus.OK;
}

/**
 * A writable device over a read-only one: writes go to the overlay (a sparse raw file, or
 * memory), never to the base; reads come from the overlay where it was written (one bit per
 * sector says so) and from the base elsewhere. The overlay's data path is synchronous
 * (`pread`/`pwrite` on the page cache, completing before `queueBio` returns); only FLUSH waits
 * for an `fdatasync`, and only reads of the base may complete later.
 *
 * With `copyOnRead` it is a live restore: base data that is read is also written into the
 * overlay where the guest has not written, and {@link fillStep} copies the rest in the
 * background, never over the guest's writes (the check of the map and the write of the fill
 * happen in one synchronous step, and a guest write marks its sectors when it is queued).
 */
export class OverlayBackend implements BlockBackend {
  readonly description: string;
  readonly sizeBytes: number;
  readonly readOnly = false;
  readonly minIoSize = SECTOR_SIZE;
  readonly capabilities = CAPABILITIES;
  readonly base: BlockBackend;
  /** One bit per sector: in the overlay. */
  readonly present: Uint8Array;
  /** Sectors in the overlay; `sizeBytes / 512` when all of it is. */
  presentSectors = 0;
  private readonly sectors: number;
  private readonly copyOnRead: boolean;
  private readonly freshSparse: boolean;
  private readonly fd: number;
  private readonly pages: Map<number, Buffer> | null;
  private readonly onDurable: ((present: Uint8Array) => void) | null;
  private scratch = Buffer.alloc(1 << 20);
  private readonly pieceSink: CompletionSink;
  private flushing: Bio[] = [];
  private flushWaiting: Bio[] = [];
  private flushSink: CompletionSink | null = null;
  private readonly onFlushed: (err: NodeJS.ErrnoException | null) => void;
  private closed = false;

  constructor(options: OverlayOptions) {
    const base = options.base;
    this.base = base;
    this.sizeBytes = base.sizeBytes;
    this.sectors = Math.floor(base.sizeBytes / SECTOR_SIZE);
    this.copyOnRead = options.copyOnRead === true;
    this.freshSparse = options.freshSparse === true;
    this.onDurable = options.onDurable ?? null;
    this.present = options.present ?? new Uint8Array(Math.ceil(this.sectors / 8));
    if (this.present.length !== Math.ceil(this.sectors / 8)) throw new InvalidArgumentError(`overlay map of ${this.present.length} bytes does not fit ${this.sectors} sectors`);
    for (let s = 0; s < this.sectors; s++) if (this.isPresent(s)) this.presentSectors++;
    if (options.file === null) {
      this.fd = -1;
      this.pages = new Map();
      this.description = `overlay in memory over ${base.description}`;
    } else {
      this.fd = fs.openSync(options.file, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
      if (fs.fstatSync(this.fd).size < this.sizeBytes) fs.ftruncateSync(this.fd, this.sizeBytes);
      this.pages = null;
      this.description = `overlay ${options.file} over ${base.description}`;
    }
    this.pieceSink = { complete: (piece, status) => this.pieceDone(piece, status) };
    this.onFlushed = (err) => this.flushed(err);
  }

  /** True when sector `s` is in the overlay. */
  isPresent(s: number): boolean {
    return ((this.present[s >>> 3] as number) & (1 << (s & 7))) !== 0;
  }

  private mark(first: number, count: number): void {
    for (let s = first; s < first + count; s++) {
      const i = s >>> 3;
      const bit = 1 << (s & 7);
      const b = this.present[i] as number;
      if ((b & bit) === 0) {
        this.present[i] = b | bit;
        this.presentSectors++;
      }
    }
  }

  /** Sectors from `s` (before `end`) with the same presence as `s`. */
  private runFrom(s: number, end: number): number {
    const p = this.isPresent(s);
    let e = s + 1;
    while (e < end && this.isPresent(e) === p) e++;
    return e;
  }

  queueBio(bio: Bio, sink: CompletionSink): void {
    if (this.closed) {
      sink.complete(bio, BlkStatus.OFFLINE);
      return;
    }
    const first = bio.sector;
    const count = bio.size / SECTOR_SIZE;
    switch (bio.op) {
      case ReqOp.READ:
        this.read(bio, sink, first, first + count);
        return;
      case ReqOp.WRITE:
      case ReqOp.WRITE_ZEROES: {
        // Marked first: a fill that runs after this point leaves these sectors alone.
        this.mark(first, count);
        const status = bio.op === ReqOp.WRITE ? this.writeTop(bio.sector * SECTOR_SIZE, bio, null) : this.writeTop(bio.sector * SECTOR_SIZE, null, bio.size);
        // FUA (and PREFLUSH, which the write itself cannot order here): complete after a sync.
        if (status === BlkStatus.OK && (bio.flags & (ReqFlag.FUA | ReqFlag.PREFLUSH)) !== 0) this.flush(bio, sink);
        else sink.complete(bio, status);
        return;
      }
      case ReqOp.FLUSH:
        this.flush(bio, sink);
        return;
      default:
        sink.complete(bio, BlkStatus.NOTSUPP);
    }
  }

  private read(bio: Bio, sink: CompletionSink, first: number, end: number): void {
    const firstEnd = this.runFrom(first, end);
    if (firstEnd === end && this.isPresent(first)) {
      sink.complete(bio, this.readTop(bio, first * SECTOR_SIZE, 0, bio.size));
      return;
    }
    // Pieces from the base (and the overlay's runs copied now): the parent completes with the last.
    const group = new PieceGroup();
    group.parent = bio;
    group.sink = sink;
    group.remaining = 1; // held until every piece is issued
    for (let s = first; s < end; ) {
      const e = this.runFrom(s, end);
      const pos = (s - first) * SECTOR_SIZE;
      const len = (e - s) * SECTOR_SIZE;
      if (this.isPresent(s)) {
        const st = this.readTop(bio, s * SECTOR_SIZE, pos, len);
        if (st !== BlkStatus.OK && group.status === BlkStatus.OK) group.status = st;
      } else {
        const piece = new Bio(ReqOp.READ, bio.bdev, s, len, sliceBioVecs(bio.vecs, pos, len));
        piece.private = group;
        group.remaining++;
        this.base.queueBio(piece, this.pieceSink);
      }
      s = e;
    }
    this.groupDone(group);
  }

  private pieceDone(piece: Bio, status: BlkStatus): void {
    const group = piece.private as PieceGroup;
    if (status !== BlkStatus.OK) {
      if (group.status === BlkStatus.OK) group.status = status;
    } else if (this.copyOnRead && !this.closed) {
      const len = piece.size;
      if (this.scratch.length < len) this.scratch = Buffer.alloc(len);
      copyFromBioVecs(piece.vecs, 0, this.scratch, 0, len);
      this.fill(piece.sector, this.scratch.subarray(0, len));
    }
    this.groupDone(group);
  }

  private groupDone(group: PieceGroup): void {
    if (--group.remaining > 0) return;
    const bio = group.parent as Bio;
    const sink = group.sink as CompletionSink;
    group.parent = null;
    group.sink = null;
    sink.complete(bio, group.status);
  }

  /**
   * Writes base data `data` (of sectors from `sector`) into the overlay where it is still
   * absent, and marks it present; one synchronous step, so no guest write can slip between the
   * check and the write. Returns the sectors written.
   */
  fill(sector: number, data: Buffer): number {
    const end = sector + data.length / SECTOR_SIZE;
    let written = 0;
    for (let s = sector; s < end; ) {
      const e = this.runFrom(s, end);
      if (!this.isPresent(s)) {
        const off = (s - sector) * SECTOR_SIZE;
        const len = (e - s) * SECTOR_SIZE;
        const skip = this.freshSparse && isZero(data.subarray(off, off + len));
        if (!skip && this.putTop(s * SECTOR_SIZE, data, off, len) !== BlkStatus.OK) return written;
        this.mark(s, e - s);
        written += e - s;
      }
      s = e;
    }
    return written;
  }

  /** The first absent sector at or after `from`, or -1 when the overlay holds everything. */
  nextAbsent(from: number): number {
    for (let s = from; s < this.sectors; s++) {
      if (this.present[s >>> 3] === 0xff && (s & 7) === 0) {
        s += 7;
        continue;
      }
      if (!this.isPresent(s)) return s;
    }
    return -1;
  }

  private readTop(bio: Bio, offset: number, pos: number, len: number): BlkStatus {
    if (this.scratch.length < len) this.scratch = Buffer.alloc(len);
    const st = this.getTop(offset, this.scratch, len);
    if (st === BlkStatus.OK) copyToBioVecs(bio.vecs, pos, this.scratch, 0, len);
    return st;
  }

  private writeTop(offset: number, bio: Bio | null, zeroBytes: number | null): BlkStatus {
    const len = bio !== null ? bio.size : (zeroBytes as number);
    if (this.scratch.length < len) this.scratch = Buffer.alloc(len);
    if (bio !== null) copyFromBioVecs(bio.vecs, 0, this.scratch, 0, len);
    else this.scratch.fill(0, 0, len);
    return this.putTop(offset, this.scratch, 0, len);
  }

  private getTop(offset: number, into: Buffer, len: number): BlkStatus {
    try {
      if (this.pages !== null) {
        for (let done = 0; done < len; ) {
          const p = Math.floor((offset + done) / MEMORY_PAGE);
          const inPage = (offset + done) % MEMORY_PAGE;
          const n = Math.min(len - done, MEMORY_PAGE - inPage);
          const page = this.pages.get(p);
          if (page === undefined) into.fill(0, done, done + n);
          else page.copy(into, done, inPage, inPage + n);
          done += n;
        }
        return BlkStatus.OK;
      }
      for (let done = 0; done < len; ) {
        const got = fs.readSync(this.fd, into, done, len - done, offset + done);
        if (got === 0) return BlkStatus.IOERR;
        done += got;
      }
      return BlkStatus.OK;
    } catch {
      return BlkStatus.IOERR;
    }
  }

  private putTop(offset: number, data: Buffer, from: number, len: number): BlkStatus {
    try {
      if (this.pages !== null) {
        for (let done = 0; done < len; ) {
          const p = Math.floor((offset + done) / MEMORY_PAGE);
          const inPage = (offset + done) % MEMORY_PAGE;
          const n = Math.min(len - done, MEMORY_PAGE - inPage);
          let page = this.pages.get(p);
          if (page === undefined) {
            page = Buffer.alloc(MEMORY_PAGE);
            this.pages.set(p, page);
          }
          data.copy(page, inPage, from + done, from + done + n);
          done += n;
        }
        return BlkStatus.OK;
      }
      for (let done = 0; done < len; ) done += fs.writeSync(this.fd, data, from + done, len - done, offset + done);
      return BlkStatus.OK;
    } catch (err) {
      return (err as NodeJS.ErrnoException).code === 'ENOSPC' ? BlkStatus.NOSPC : BlkStatus.IOERR;
    }
  }

  // FLUSH: one fdatasync at a time; bios that arrive meanwhile wait for the next one.
  private flush(bio: Bio, sink: CompletionSink): void {
    if (this.fd < 0) {
      sink.complete(bio, BlkStatus.OK);
      return;
    }
    this.flushSink = sink;
    this.flushWaiting.push(bio);
    if (this.flushing.length === 0) this.startFlush();
  }

  private startFlush(): void {
    const t = this.flushing;
    this.flushing = this.flushWaiting;
    this.flushWaiting = t;
    fs.fdatasync(this.fd, this.onFlushed);
  }

  private flushed(err: NodeJS.ErrnoException | null): void {
    if (err === null && this.onDurable !== null) {
      try {
        this.onDurable(this.present);
      } catch {
        err = new Error('saving the overlay map failed') as NodeJS.ErrnoException;
      }
    }
    const done = this.flushing;
    this.flushing = [];
    for (const b of done) (this.flushSink as CompletionSink).complete(b, err === null ? BlkStatus.OK : BlkStatus.IOERR);
    if (this.flushWaiting.length > 0) this.startFlush();
  }

  /** Makes the overlay durable now (fdatasync), then calls `onDurable`. */
  syncNow(): void {
    if (this.fd >= 0) fs.fdatasyncSync(this.fd);
    this.onDurable?.(this.present);
  }

  blockStatus(offset: number, length: number): BlockStatusExtent[] | null {
    const base = this.base.blockStatus?.(offset, length) ?? null;
    if (base === null) return null;
    // A sector in the overlay is data, whatever the base says.
    const out: BlockStatusExtent[] = [];
    let pos = offset;
    for (const e of base) {
      for (let p = pos; p < pos + e.length; ) {
        const s = Math.floor(p / SECTOR_SIZE);
        const next = Math.min(pos + e.length, (s + 1) * SECTOR_SIZE);
        const hole = e.hole && !this.isPresent(s);
        const last = out[out.length - 1];
        if (last !== undefined && last.hole === hole) out[out.length - 1] = { length: last.length + next - p, hole };
        else out.push({ length: next - p, hole });
        p = next;
      }
      pos += e.length;
    }
    return out;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.fd >= 0) fs.closeSync(this.fd);
    await this.base.close();
  }
}
