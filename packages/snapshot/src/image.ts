import {
  Bio,
  blkdevBlockStatus,
  BlkStatus,
  createDiskSync,
  copyFromBioVecs,
  copyToBioVecs,
  describeBio,
  NotSupportedError,
  opName,
  ReqOp,
  SECTOR_SIZE,
  sliceBioVecs,
  type BackendCapabilities,
  type BlkError,
  type BlockBackend,
  type BlockStatusExtent,
  type CompletionSink,
  type Disk,
} from '@blkfilter/bio';
import type { FilterContext, FilterNext } from '@blkfilter/registry';
import { COPIED, type ChunkWaiter, type SnapshotDevice } from './cow.js';

/** One image bio on its way: split into pieces of one chunk each, completed once by a counter. */
class ImageRequest {
  readonly image: SnapshotImageBackend;
  readonly bio: Bio;
  readonly sink: CompletionSink;
  remaining: number;
  status: BlkStatus;
  error: BlkError | null;

  constructor(image: SnapshotImageBackend, bio: Bio, sink: CompletionSink) {
    this.image = image;
    this.bio = bio;
    this.sink = sink;
    this.remaining = 1;
    this.status = BlkStatus.OK;
    this.error = null;
  }
}

/** The part of an image bio that falls in one chunk. */
class ImagePiece implements ChunkWaiter {
  readonly req: ImageRequest;
  readonly chunk: number;
  /** Byte offset within the chunk. */
  readonly offset: number;
  readonly length: number;
  /** Byte offset within the image bio's data. */
  readonly dataPos: number;

  constructor(req: ImageRequest, chunk: number, offset: number, length: number, dataPos: number) {
    this.req = req;
    this.chunk = chunk;
    this.offset = offset;
    this.length = length;
    this.dataPos = dataPos;
  }

  chunkReady(): void {
    this.req.image.dispatchPiece(this);
  }

  chunkFailed(): void {
    this.req.image.pieceFailed(this);
  }
}

function originReadEndIo(bio: Bio): void {
  const piece = bio.private as ImagePiece;
  piece.req.image.originReadDone(piece, bio);
}

const IMAGE_CAPABILITIES: BackendCapabilities = Object.freeze({ writeCache: false, discard: true, writeZeroes: true });

/**
 * The backend of a snapshot image disk: reads return the original device's data of the instant
 * of take (from diff storage for chunks saved since, else from the original under the chunk
 * lock); writes, discards and write-zeroes change the saved copy in diff storage, never the
 * original. Created by `Snapshot.take()`; not constructed by users.
 */
export class SnapshotImageBackend implements BlockBackend {
  readonly description: string;
  readonly sizeBytes: number;
  readonly readOnly = false;
  readonly minIoSize = SECTOR_SIZE;
  readonly capabilities = IMAGE_CAPABILITIES;
  /** @internal */
  readonly device: SnapshotDevice;

  /** @internal */
  constructor(device: SnapshotDevice) {
    this.device = device;
    this.sizeBytes = device.bdev.nrSects * SECTOR_SIZE;
    this.description = `snapshot ${device.core.id} of "${device.name}"`;
  }

  /** The snapshot's id. */
  get snapshotId(): string {
    return this.device.core.id;
  }

  /** The name of the original device. */
  get original(): string {
    return this.device.name;
  }

  async close(): Promise<void> {}

  /**
   * Holes and data of the image (see `BlockBackend.blockStatus`): a chunk saved in diff storage
   * is data; a chunk not saved is what the original device holds now, and while it is not
   * saved that is what it held at the take (copy-on-write saves a chunk before any write
   * reaches it, and the chunk state turns COPIED before the held writes go on), so its holes
   * are the original's (`blkdevBlockStatus`). The answer stays true for the image after it was
   * given: a hole of a chunk not yet saved reads as zeros later too, from the original or from
   * the saved copy (only a write to the image changes the image). Chunks whose original cannot
   * tell are data; null (all data) when copy-on-write has stopped and the image no longer reads.
   */
  blockStatus(offset: number, length: number): BlockStatusExtent[] | null {
    const dev = this.device;
    const state = dev.state;
    if (state === null || dev.core.corruptedError !== null) return null;
    const out: BlockStatusExtent[] = [];
    const push = (n: number, hole: boolean): void => {
      const last = out[out.length - 1];
      if (last !== undefined && last.hole === hole) out[out.length - 1] = { length: last.length + n, hole };
      else out.push({ length: n, hole });
    };
    const cs = dev.chunkSize;
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const copied = state[Math.floor(pos / cs)] === COPIED;
      // The run of chunks in the same state from here.
      let c = Math.floor(pos / cs) + 1;
      while (c * cs < end && (state[c] === COPIED) === copied) c++;
      const stop = Math.min(end, c * cs);
      const original = copied ? null : blkdevBlockStatus(dev.bdev, pos, stop - pos);
      if (original === null) push(stop - pos, false);
      else for (const e of original) push(e.length, e.hole);
      pos = stop;
    }
    return out;
  }

  /** An image bio: split into chunk pieces, each served from diff storage or the original. */
  queueBio(bio: Bio, sink: CompletionSink): void {
    const dev = this.device;
    const op = bio.op;
    if (op !== ReqOp.READ && op !== ReqOp.WRITE && op !== ReqOp.DISCARD && op !== ReqOp.WRITE_ZEROES) {
      if (bio.error === null) bio.error = new NotSupportedError(`${describeBio(bio)}: a snapshot image does not support ${opName(op)}`);
      sink.complete(bio, BlkStatus.NOTSUPP);
      return;
    }
    const corrupted = dev.core.corruptedError;
    if (corrupted !== null || dev.state === null) {
      if (bio.error === null) bio.error = corrupted ?? dev.stoppedError();
      sink.complete(bio, BlkStatus.IOERR);
      return;
    }
    if (op !== ReqOp.READ) {
      // So that CBT on the original counts it: the next incremental backup must copy it.
      (dev.ctx as FilterContext).rangesChanged([{ sector: bio.sector, sectors: bio.size / SECTOR_SIZE }]);
    }
    const req = new ImageRequest(this, bio, sink);
    const chunkSize = dev.chunkSize;
    let byte = bio.sector * SECTOR_SIZE;
    const end = byte + bio.size;
    let pos = 0;
    while (byte < end) {
      const c = Math.floor(byte / chunkSize);
      const off = byte - c * chunkSize;
      const len = Math.min(chunkSize - off, end - byte);
      req.remaining++;
      this.dispatchPiece(new ImagePiece(req, c, off, len, pos));
      byte += len;
      pos += len;
    }
    this.pieceDone(req, BlkStatus.OK, null);
  }

  /** @internal Serves one piece: from diff storage if its chunk is saved, else from the original under the chunk lock. */
  dispatchPiece(p: ImagePiece): void {
    const dev = this.device;
    const state = dev.state;
    if (state === null || dev.core.corruptedError !== null) {
      this.pieceFailed(p);
      return;
    }
    const c = p.chunk;
    if (state[c] === COPIED) {
      this.pieceFromStorage(p);
      return;
    }
    if (p.req.bio.op !== ReqOp.READ) {
      // A write to the image first saves the chunk, then changes the saved copy.
      dev.saveBeforeImageWrite(c, p);
      return;
    }
    // A writer waiting for this chunk is not starved: the read then takes the saved copy.
    if (!dev.beginOriginRead(c, p)) return;
    const bio = p.req.bio;
    const rb = new Bio(
      ReqOp.READ,
      dev.bdev,
      c * dev.chunkSectors + p.offset / SECTOR_SIZE,
      p.length,
      p.dataPos === 0 && p.length === bio.size ? bio.vecs : sliceBioVecs(bio.vecs, p.dataPos, p.length),
    );
    rb.private = p;
    rb.endIo = originReadEndIo;
    // Below the CoW filter, not through submitBio: a freeze of the original would otherwise hold
    // this read while a held write waits for its chunk lock, and never drain.
    (dev.next as FilterNext).submit(rb);
  }

  /** @internal an image read of the original completed. */
  originReadDone(p: ImagePiece, rb: Bio): void {
    this.device.endOriginRead(p.chunk);
    if (rb.status !== BlkStatus.OK) this.pieceDone(p.req, rb.status, rb.error);
    else if (this.device.core.corruptedError !== null) this.pieceFailed(p);
    else this.pieceDone(p.req, BlkStatus.OK, null);
  }

  private pieceFromStorage(p: ImagePiece): void {
    const dev = this.device;
    const storage = dev.core.storage;
    const slot = dev.slots.get(p.chunk) as number;
    const bio = p.req.bio;
    const op = bio.op;
    const mem = storage.memory(slot);
    if (mem !== null) {
      if (op === ReqOp.READ) copyToBioVecs(bio.vecs, p.dataPos, mem, p.offset, p.length);
      else if (op === ReqOp.WRITE) copyFromBioVecs(bio.vecs, p.dataPos, mem, p.offset, p.length);
      else mem.fill(0, p.offset, p.offset + p.length);
      this.pieceDone(p.req, BlkStatus.OK, null);
      return;
    }
    if (op === ReqOp.READ) {
      const tmp = Buffer.allocUnsafe(p.length);
      storage.read(slot, p.offset, tmp, p.length, (err) => {
        if (err !== null) this.storageFailed(p, err);
        else {
          copyToBioVecs(bio.vecs, p.dataPos, tmp, 0, p.length);
          this.pieceDone(p.req, BlkStatus.OK, null);
        }
      });
      return;
    }
    const tmp = op === ReqOp.WRITE ? Buffer.allocUnsafe(p.length) : Buffer.alloc(p.length);
    if (op === ReqOp.WRITE) copyFromBioVecs(bio.vecs, p.dataPos, tmp, 0, p.length);
    storage.write(slot, p.offset, tmp, p.length, (err) => {
      if (err !== null) this.storageFailed(p, err);
      else this.pieceDone(p.req, BlkStatus.OK, null);
    });
  }

  private storageFailed(p: ImagePiece, err: BlkError): void {
    // The image can no longer be trusted (blksnap marks the snapshot corrupted too).
    this.device.core.corrupt(err, this.device.name);
    this.pieceDone(p.req, BlkStatus.IOERR, err);
  }

  /** @internal */
  pieceFailed(p: ImagePiece): void {
    this.pieceDone(p.req, BlkStatus.IOERR, this.device.core.corruptedError ?? this.device.stoppedError());
  }

  private pieceDone(req: ImageRequest, status: BlkStatus, error: BlkError | null): void {
    if (status !== BlkStatus.OK && req.status === BlkStatus.OK) {
      req.status = status;
      req.error = error;
    }
    if (--req.remaining !== 0) return;
    const bio = req.bio;
    if (req.error !== null && bio.error === null) bio.error = req.error;
    req.sink.complete(bio, req.status);
  }
}

/** Creates the image disk of `dev` (same geometry and limits as the original), named `name`. */
export function createImageDisk(dev: SnapshotDevice, name: string): Disk {
  const l = dev.bdev.disk.limits;
  return createDiskSync({
    name,
    backend: new SnapshotImageBackend(dev),
    logicalBlockSize: l.logicalBlockSize,
    physicalBlockSize: l.physicalBlockSize,
    limits: {
      maxSectors: l.maxSectors,
      maxSegments: l.maxSegments,
      discardGranularity: l.discardGranularity,
      maxDiscardSectors: l.maxDiscardSectors,
      maxWriteZeroesSectors: l.maxWriteZeroesSectors,
    },
  });
}
