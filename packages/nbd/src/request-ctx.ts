import { Bio, BioVec, type BlockDev, type ReqOp } from '@blkfilter/bio';

/**
 * What a request context calls back into: the connection that owns it. An interface rather
 * than the connection's class, so that the context, the reply writer and the read-modify-write
 * code never import the connection (which imports them).
 */
export interface CtxOwner {
  /** The reply left the socket (or could not): the context and its buffer go back. */
  release(ctx: RequestCtx): void;
  /** End-io of the context's bio (runs inside bio completion: must not throw). */
  ioDone(ctx: RequestCtx, bio: Bio): void;
}

/**
 * One request in flight on a connection. Pooled per connection: the reply header buffer, its
 * views, the bio and its end-io are made once and reused, so a request allocates nothing but
 * its payload buffer (which comes from the shared pool).
 */
export class RequestCtx {
  readonly owner: CtxOwner;
  /** Reply header scratch for replies written from their own buffer (large READs). */
  readonly hdr = Buffer.alloc(32);
  readonly hdr16: Buffer;
  readonly hdr28: Buffer;
  readonly vec = new BioVec(Buffer.alloc(0), 0, 0);
  readonly vecs: BioVec[] = [this.vec];
  bio: Bio | null = null;
  type = 0;
  cmdFlags = 0;
  /** The request's cookie, echoed in every reply. */
  cookieHi = 0;
  cookieLo = 0;
  offset = 0;
  offHi = 0;
  length = 0;
  /** Not aligned to the logical block size: served by a bounce (READ) or read-modify-write. */
  unaligned = false;
  /** Where the reply's data starts in `buf` (an unaligned READ reads the covering blocks). */
  dataOff = 0;
  /** Payload buffer (pooled), or null. */
  buf: Buffer | null = null;
  /** Where the next WRITE payload byte lands in `buf`. */
  payloadPos = 0;
  /** `performance.now()` when the request arrived, on an export that keeps stats; else -1. */
  startTime = -1;
  /** Called once the reply left the socket (or could not): returns this context to the pool. */
  readonly flushed: (err?: Error | null) => void;
  /** End-io of this context's bios. */
  readonly bioDone: (bio: Bio) => void;

  constructor(owner: CtxOwner) {
    this.owner = owner;
    this.hdr16 = this.hdr.subarray(0, 16);
    this.hdr28 = this.hdr.subarray(0, 28);
    this.flushed = () => owner.release(this);
    this.bioDone = (bio) => owner.ioDone(this, bio);
  }

  /** The context's bio, reset for a new I/O. */
  prepareBio(op: ReqOp, dev: BlockDev, sector: number, size: number, data: Buffer | null, flags: number): Bio {
    let vecs: BioVec[] | undefined;
    if (data !== null) {
      this.vec.buffer = data;
      this.vec.offset = 0;
      this.vec.length = size;
      vecs = this.vecs;
    }
    let bio = this.bio;
    if (bio === null) {
      bio = new Bio(op, dev, sector, size, vecs);
      bio.endIo = this.bioDone;
      bio.private = this;
      this.bio = bio;
    } else {
      bio.reset(op, dev, sector, size, vecs);
    }
    bio.flags = flags;
    return bio;
  }
}
