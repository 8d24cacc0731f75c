import net from 'node:net';
import tls from 'node:tls';
import {
  Bio,
  BioVec,
  BlkStatus,
  InvalidArgumentError,
  ReqFlag,
  ReqOp,
  SECTOR_SIZE,
  bioChain,
  bioSplitToLimits,
  blkStatusToErrno,
  blkdevBlockStatus,
  submitBio,
  type BlockDev,
  type BlockStatusExtent,
  type Disk,
} from '@blkfilter/bio';
import { allocationExtents, dirtyBitmapExtents } from './block-status.js';
import { getPayloadBuffer, putPayloadBuffer } from './buffer-pool.js';
import { exportFlags, exportReadOnly, resolveExport, type BitmapEntry, type ExportEntry, type NbdExportConfig } from './exports.js';
import {
  BASE_ALLOCATION,
  NBD_DEFAULT_PORT,
  NBD_INIT_MAGIC_HI,
  NBD_INIT_MAGIC_LO,
  NBD_MAX_EXTENTS,
  NBD_MAX_PAYLOAD,
  NBD_MAX_STRING,
  NBD_OPTS_MAGIC_HI,
  NBD_OPTS_MAGIC_LO,
  NBD_REP_MAGIC_HI,
  NBD_REP_MAGIC_LO,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  NbdClientFlag,
  NbdCmd,
  NbdCmdFlag,
  NbdErrno,
  NbdHandshakeFlag,
  NbdInfo,
  NbdOpt,
  NbdRep,
  NbdReplyFlag,
  NbdReplyType,
  NbdTransmissionFlag,
  QEMU_DIRTY_BITMAP_PREFIX,
  nbdCmdName,
  nbdErrnoName,
  nbdOptName,
} from './protocol.js';
import { ByteReader, writeU64 } from './reader.js';

/** TLS settings of a server (`NBD_OPT_STARTTLS`, Node's `tls` with a key and certificate). */
export interface NbdServerTlsOptions {
  /** PEM private key. */
  readonly key: string | Buffer;
  /** PEM certificate (chain). */
  readonly cert: string | Buffer;
  /** PEM CA certificates used to verify client certificates (with `requestCert`). */
  readonly ca?: string | Buffer | ReadonlyArray<string | Buffer>;
  /** Ask clients for a certificate and refuse those that do not verify against `ca`. */
  readonly requestCert?: boolean;
  /**
   * FORCEDTLS (default true): every option but STARTTLS and ABORT is refused with
   * `NBD_REP_ERR_TLS_REQD` until TLS is up. False: TLS is offered, plain text allowed.
   */
  readonly required?: boolean;
}

/** Where the server listens: TCP (`host`/`port`), a unix socket (`path`) or an inherited fd. */
export interface NbdListenOptions {
  /** TCP port (default 10809; 0 picks a free one). */
  readonly port?: number;
  /** Address to bind (default `127.0.0.1`). */
  readonly host?: string;
  /** A unix socket path instead of TCP. */
  readonly path?: string;
  /** An already-listening socket fd (systemd socket activation passes 3). */
  readonly fd?: number;
}

/** Where a listening server can be reached. */
export type NbdServerAddress =
  | { readonly kind: 'tcp'; readonly host: string; readonly port: number }
  | { readonly kind: 'unix'; readonly path: string }
  | { readonly kind: 'fd'; readonly fd: number };

/** A message from the server for its operator. */
export type NbdServerLog = (level: 'debug' | 'info' | 'warn', message: string) => void;

/** Options of {@link createNbdServer}. */
export interface NbdServerOptions {
  /** Exports by name; add more later with `server.addExport`. */
  readonly exports?: Readonly<Record<string, NbdExportConfig>>;
  /** The export a client gets when it asks for the empty name `""` and no export has that name. */
  readonly defaultExport?: string;
  /** Offer (and by default require) TLS. */
  readonly tls?: NbdServerTlsOptions;
  /** Requests in flight per connection before the server stops reading it (default 128). */
  readonly maxInFlightRequests?: number;
  /** Payload bytes in flight per connection before the server stops reading it (default 64 MiB). */
  readonly maxInFlightBytes?: number;
  /** Receives connection-level events (disconnects, protocol errors). Default: silent. */
  readonly log?: NbdServerLog;
}

const DEFAULT_MAX_REQUESTS = 128;
const DEFAULT_MAX_BYTES = 64 * 1024 * 1024;
/** Option payloads up to this size are parsed; larger ones are skipped and refused with ERR_TOO_BIG. */
const MAX_OPTION_BUFFERED = 64 * 1024;
/** A closing connection whose peer does not hang up is destroyed after this long. */
const LINGER_MS = 5_000;
/** Free request contexts kept per connection. */
const CTX_POOL_MAX = 256;
/** Offsets at or above 2^53 are past any device; checking the high word avoids rounding. */
const OFFSET_HI_LIMIT = 0x200000;

/**
 * Structured READs of at least this many bytes ask the backend for holes and send them as
 * OFFSET_HOLE chunks (as qemu-nbd does). Smaller ones skip the question: a 4 KiB random read
 * pays one comparison, and a hole that small saves little on the wire.
 */
const SPARSE_READ_MIN = 64 * 1024;

/**
 * Replies whose header and data fit in this many bytes are copied into the connection's reply
 * batch, which goes out as one write per event-loop turn (see {@link ReplyBatch}). Larger data
 * is written from its own buffer: copying it would cost more than the write it saves.
 */
const BATCH_COPY_MAX = 32 * 1024;
/** Size of a reply batch buffer; a full batch is written at once and a new one started. */
const BATCH_BYTES = 256 * 1024;
/** Free reply batches kept per connection. */
const BATCH_POOL_MAX = 4;

const NO_ZEROES_PAD = Buffer.alloc(124);
const EMPTY = Buffer.alloc(0);
const ZERO_CHUNK = 1024 * 1024;
let zeroBuffer: Buffer | null = null;
function zeros(): Buffer {
  return (zeroBuffer ??= Buffer.alloc(ZERO_CHUNK));
}

const PH_FLAGS = 0;
const PH_OPTIONS = 1;
const PH_TRANSMISSION = 2;
const PH_CLOSING = 3;
const PH_CLOSED = 4;

/** A metadata context selected with NBD_OPT_SET_META_CONTEXT. */
interface MetaContext {
  readonly id: number;
  readonly name: string;
  readonly bitmap: BitmapEntry | null;
}

const META_ID_BASE_ALLOCATION = 0;
const META_ID_DIRTY_BITMAP = 2;

/**
 * One request in flight on a connection. Pooled per connection: the reply header buffer, its
 * views, the bio and its end-io are made once and reused, so a request allocates nothing but
 * its payload buffer (which comes from the shared pool).
 */
class RequestCtx {
  readonly conn: ServerConnection;
  /** Reply header scratch; bytes 8..16 hold the request's cookie from parse time on. */
  readonly hdr = Buffer.alloc(32);
  readonly hdr16: Buffer;
  readonly hdr28: Buffer;
  readonly vec = new BioVec(Buffer.alloc(0), 0, 0);
  readonly vecs: BioVec[] = [this.vec];
  bio: Bio | null = null;
  type = 0;
  cmdFlags = 0;
  offset = 0;
  offHi = 0;
  length = 0;
  /** Not aligned to the logical block size: served by a bounce (READ) or read-modify-write. */
  unaligned = false;
  /** Where the reply's data starts in `buf` (an unaligned READ reads the covering blocks). */
  dataOff = 0;
  /** Payload buffer (pooled), or null. */
  buf: Buffer | null = null;
  /** Called once the reply left the socket (or could not): returns this context to the pool. */
  readonly flushed: (err?: Error | null) => void;
  /** End-io of this context's bios. */
  readonly bioDone: (bio: Bio) => void;

  constructor(conn: ServerConnection) {
    this.conn = conn;
    this.hdr16 = this.hdr.subarray(0, 16);
    this.hdr28 = this.hdr.subarray(0, 28);
    this.flushed = () => conn.release(this);
    this.bioDone = (bio) => conn.ioDone(this, bio);
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

/**
 * Replies written in one event-loop turn, copied into one buffer and sent with one
 * `socket.write` from a `setImmediate`: bio completions arrive one callback at a time from the
 * threadpool, and a write (and a wake-up of the client) per reply cost more than the requests
 * themselves at small sizes. The requests stay in flight until the batch has left the socket,
 * so the connection's limits still bound what the server holds for a slow reader.
 */
class ReplyBatch {
  /** From the shared payload pool while the batch is in use; EMPTY when it is free. */
  buf: Buffer = EMPTY;
  pos = 0;
  /** Requests answered in this batch, released once it is written. */
  readonly ctxs: RequestCtx[] = [];
  readonly written: () => void;

  constructor(conn: ServerConnection) {
    this.written = () => conn.batchWritten(this);
  }
}

/**
 * Unaligned writes in flight on one disk, as byte ranges of the whole disk (so that exports of
 * a disk and of its partitions share them), and the ones waiting for an overlapping one to
 * finish. Two read-modify-writes of one block must not overlap: each would write back the
 * other's bytes as they were before. Only unaligned requests come here; aligned ones never
 * look (see the README's limitations).
 */
class RmwLocks {
  readonly active: RmwOp[] = [];
  readonly waiting: RmwOp[] = [];

  private conflicts(op: RmwOp): boolean {
    const a = this.active;
    for (let i = 0; i < a.length; i++) {
      const o = a[i] as RmwOp;
      if (o.lockStart < op.lockEnd && op.lockStart < o.lockEnd) return true;
    }
    return false;
  }

  /** Starts `op` now, or once the ops overlapping it have finished. */
  acquire(op: RmwOp): void {
    if (this.conflicts(op)) {
      this.waiting.push(op);
      return;
    }
    this.active.push(op);
    op.start();
  }

  /** `op` is done: starts the waiting ops that no longer overlap an active one, in order. */
  release(op: RmwOp): void {
    const a = this.active;
    const i = a.indexOf(op);
    if (i >= 0) a.splice(i, 1);
    const w = this.waiting;
    if (w.length === 0) return;
    const ready: RmwOp[] = [];
    for (let j = 0; j < w.length; ) {
      const o = w[j] as RmwOp;
      if (this.conflicts(o)) {
        j++;
        continue;
      }
      w.splice(j, 1);
      a.push(o);
      ready.push(o);
    }
    // Started after the scan: an op may complete at once and release again.
    for (const o of ready) o.start();
  }
}

const rmwLocksByDisk = new WeakMap<Disk, RmwLocks>();

function rmwLocksFor(disk: Disk): RmwLocks {
  let l = rmwLocksByDisk.get(disk);
  if (l === undefined) {
    l = new RmwLocks();
    rmwLocksByDisk.set(disk, l);
  }
  return l;
}

/**
 * An unaligned WRITE or WRITE_ZEROES, done the way qemu-nbd does it: read the partial blocks
 * at the head and tail, merge the request's bytes (or zeros) into them, write them back, and
 * write the aligned middle as usual (from the payload, or as WRITE_ZEROES), FUA on every
 * piece. Holds the covering blocks in {@link RmwLocks} from the read to the last write.
 */
class RmwOp {
  readonly conn: ServerConnection;
  readonly ctx: RequestCtx;
  readonly dev: BlockDev;
  readonly locks: RmwLocks;
  /** The covering range on the whole disk, in bytes. */
  readonly lockStart: number;
  readonly lockEnd: number;
  /** Export offsets of the partial head and tail blocks, or -1. */
  readonly head: number;
  readonly tail: number;
  /** Whole blocks in the middle, export offsets [midStart, midEnd). */
  readonly midStart: number;
  readonly midEnd: number;
  readonly lbs: number;
  /** Flags of the writes: FUA, and NOUNMAP for the middle of a WRITE_ZEROES. */
  readonly fua: number;
  readonly nounmap: number;
  /** The partial blocks: head at 0, tail at lbs. */
  blocks: Buffer | null = null;

  constructor(conn: ServerConnection, ctx: RequestCtx, dev: BlockDev, lbs: number, fua: number, nounmap: number) {
    this.conn = conn;
    this.ctx = ctx;
    this.dev = dev;
    this.locks = rmwLocksFor(dev.disk);
    this.lbs = lbs;
    this.fua = fua;
    this.nounmap = nounmap;
    const start = ctx.offset;
    const end = start + ctx.length;
    const a0 = Math.floor(start / lbs) * lbs;
    const a1 = Math.ceil(end / lbs) * lbs;
    const base = dev.startSect * SECTOR_SIZE;
    this.lockStart = base + a0;
    this.lockEnd = base + a1;
    this.midStart = Math.ceil(start / lbs) * lbs;
    this.midEnd = Math.floor(end / lbs) * lbs;
    this.head = start !== a0 || end - a0 < lbs ? a0 : -1;
    const t = a1 - lbs;
    this.tail = end !== a1 && t !== this.head ? t : -1;
  }

  /** Reads the partial blocks (the lock is held). */
  start(): void {
    const lbs = this.lbs;
    const blocks = getPayloadBuffer(2 * lbs);
    this.blocks = blocks;
    let parent: Bio | null = null;
    let child: Bio | null = null;
    if (this.head >= 0) parent = new Bio(ReqOp.READ, this.dev, this.head / SECTOR_SIZE, lbs, [new BioVec(blocks, 0, lbs)]);
    if (this.tail >= 0) {
      const b = new Bio(ReqOp.READ, this.dev, this.tail / SECTOR_SIZE, lbs, [new BioVec(blocks, lbs, lbs)]);
      if (parent === null) parent = b;
      else child = b;
    }
    const p = parent as Bio;
    p.endIo = (bio) => this.merged(bio);
    if (child !== null) {
      bioChain(child, p);
      submitBio(child);
    }
    submitBio(p);
  }

  /** The partial blocks were read: merge, then write everything. */
  private merged(read: Bio): void {
    if (read.status !== BlkStatus.OK) {
      this.finish(read);
      return;
    }
    const ctx = this.ctx;
    const lbs = this.lbs;
    const blocks = this.blocks as Buffer;
    const data = ctx.type === NbdCmd.WRITE ? (ctx.buf as Buffer) : null;
    const start = ctx.offset;
    const end = start + ctx.length;
    const dev = this.dev;
    const pieces: Bio[] = [];
    for (let k = 0; k < 2; k++) {
      const blk = k === 0 ? this.head : this.tail;
      if (blk < 0) continue;
      const from = Math.max(start, blk);
      const to = Math.min(end, blk + lbs);
      const at = k * lbs + (from - blk);
      if (data !== null) data.copy(blocks, at, from - start, to - start);
      else blocks.fill(0, at, at + (to - from));
      const w = new Bio(ReqOp.WRITE, dev, blk / SECTOR_SIZE, lbs, [new BioVec(blocks, k * lbs, lbs)]);
      w.flags = this.fua;
      pieces.push(w);
    }
    const midLen = this.midEnd - this.midStart;
    if (midLen > 0) {
      const sector = this.midStart / SECTOR_SIZE;
      if (data !== null) {
        const w = new Bio(ReqOp.WRITE, dev, sector, midLen, [new BioVec(data, this.midStart - start, midLen)]);
        w.flags = this.fua;
        pieces.push(w);
      } else if (dev.disk.limits.maxWriteZeroesSectors > 0) {
        const w = new Bio(ReqOp.WRITE_ZEROES, dev, sector, midLen);
        w.flags = this.fua | this.nounmap;
        pieces.push(w);
      } else {
        const z = zeros();
        for (let done = 0; done < midLen; done += ZERO_CHUNK) {
          const n = Math.min(ZERO_CHUNK, midLen - done);
          const w = new Bio(ReqOp.WRITE, dev, sector + done / SECTOR_SIZE, n, [new BioVec(z, 0, n)]);
          w.flags = this.fua;
          pieces.push(w);
        }
      }
    }
    const parent = pieces[pieces.length - 1] as Bio;
    parent.endIo = (bio) => this.finish(bio);
    for (let i = 0; i < pieces.length - 1; i++) bioChain(pieces[i] as Bio, parent);
    for (let i = 0; i < pieces.length - 1; i++) submitSplit(pieces[i] as Bio);
    submitSplit(parent);
  }

  private finish(bio: Bio): void {
    const blocks = this.blocks;
    if (blocks !== null) {
      this.blocks = null;
      putPayloadBuffer(blocks);
    }
    this.locks.release(this);
    this.conn.ioDone(this.ctx, bio);
  }
}

/** Maps a failed bio to the NBD error a client sees. */
function errnoForBio(bio: Bio): number {
  switch (bio.status) {
    case BlkStatus.NOSPC:
      return NbdErrno.ENOSPC;
    case BlkStatus.INVAL:
      return NbdErrno.EINVAL;
    case BlkStatus.NOTSUPP:
      return NbdErrno.ENOTSUP;
    case BlkStatus.RESOURCE:
      return NbdErrno.ENOMEM;
    case BlkStatus.OFFLINE:
      return NbdErrno.ESHUTDOWN;
    default: {
      const code = bio.error?.code;
      if (code === 'EROFS' || code === 'EPERM') return NbdErrno.EPERM;
      return NbdErrno.EIO;
    }
  }
}

function submitSplit(bio: Bio): void {
  for (let s = bioSplitToLimits(bio); s !== null; s = bioSplitToLimits(bio)) submitBio(s);
  submitBio(bio);
}

/** @internal what a connection needs of its server. */
interface ServerCore {
  readonly exports: Map<string, ExportEntry>;
  readonly defaultExport: string | null;
  readonly tlsContext: tls.SecureContext | null;
  readonly tlsOptions: NbdServerTlsOptions | null;
  readonly maxRequests: number;
  readonly maxBytes: number;
  readonly log: NbdServerLog | null;
  closing: boolean;
  connectionClosed(conn: ServerConnection): void;
}

/** One client connection: handshake, then transmission. */
class ServerConnection {
  readonly core: ServerCore;
  socket: net.Socket;
  readonly peer: string;
  readonly reader = new ByteReader(16 * 1024);
  phase = PH_FLAGS;
  // Handshake state.
  fixedNewstyle = false;
  noZeroes = false;
  structured = false;
  tlsActive = false;
  metaExport: ExportEntry | null = null;
  metaContexts: MetaContext[] = [];
  skipLeft = 0;
  skipOption = 0;
  skipReply = 0;
  skipMessage = '';
  // Transmission state.
  exp: ExportEntry | null = null;
  device: BlockDev | null = null;
  exportSize = 0;
  lbs = 512;
  readOnly = true;
  flags = 0;
  /** Structured replies and a backend with an allocation map: large READs may send holes. */
  sparseReads = false;
  payloadCtx: RequestCtx | null = null;
  payloadLeft = 0;
  payloadPos = 0;
  discardLeft = 0;
  inflight = 0;
  inflightBytes = 0;
  paused = false;
  consuming = false;
  readonly freeCtx: RequestCtx[] = [];
  /** Replies not written yet (see {@link ReplyBatch}), and free batches. */
  batch: ReplyBatch | null = null;
  readonly freeBatches: ReplyBatch[] = [];
  flushScheduled = false;
  readonly onFlush = (): void => {
    this.flushScheduled = false;
    this.flushBatch();
  };
  lingerTimer: NodeJS.Timeout | null = null;
  closeReason = '';
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;
  readonly onData = (chunk: Buffer): void => this.handleData(chunk);
  readonly onError = (err: Error): void => this.debug(`socket error: ${err.message}`);
  readonly onClose = (): void => this.handleClose();

  constructor(core: ServerCore, socket: net.Socket) {
    this.core = core;
    this.socket = socket;
    this.peer = socket.remoteAddress !== undefined ? `${socket.remoteAddress}:${socket.remotePort ?? ''}` : 'unix';
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    if (typeof socket.setNoDelay === 'function' && socket.remoteAddress !== undefined) socket.setNoDelay(true);
    socket.on('data', this.onData);
    socket.on('error', this.onError);
    socket.on('close', this.onClose);
    // Newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags.
    const hello = Buffer.allocUnsafe(18);
    hello.writeUInt32BE(NBD_INIT_MAGIC_HI, 0);
    hello.writeUInt32BE(NBD_INIT_MAGIC_LO, 4);
    hello.writeUInt32BE(NBD_OPTS_MAGIC_HI, 8);
    hello.writeUInt32BE(NBD_OPTS_MAGIC_LO, 12);
    hello.writeUInt16BE(NbdHandshakeFlag.FIXED_NEWSTYLE | NbdHandshakeFlag.NO_ZEROES, 16);
    socket.write(hello);
  }

  private debug(message: string): void {
    this.core.log?.('debug', `nbd ${this.peer}: ${message}`);
  }

  private warn(message: string): void {
    this.core.log?.('warn', `nbd ${this.peer}: ${message}`);
  }

  // --- input ---------------------------------------------------------------------------------

  private handleData(chunk: Buffer): void {
    try {
      this.handleDataUnsafe(chunk);
    } catch (err) {
      // A bug must cost this connection, never the server.
      this.internalError(err);
    }
  }

  private internalError(err: unknown): void {
    this.core.log?.('warn', `nbd ${this.peer}: internal error, dropping the connection: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    this.consuming = false;
    this.socket.destroy();
  }

  private handleDataUnsafe(chunk: Buffer): void {
    if (this.phase >= PH_CLOSING) return;
    const r = this.reader;
    if (r.length === 0) {
      const used = this.consume(chunk, 0, chunk.length);
      if (used < chunk.length && this.phase < PH_CLOSING) r.push(chunk.subarray(used));
    } else {
      r.push(chunk);
      this.consumeReader();
    }
  }

  private consumeReader(): void {
    const r = this.reader;
    if (r.length === 0 || this.consuming) return;
    const used = this.consume(r.buf, r.start, r.end);
    if (this.phase >= PH_CLOSING) r.clear();
    else r.consumeTo(used);
  }

  /** Parses messages in `src[pos, end)`; returns the position of the first byte not used. */
  private consume(src: Buffer, pos: number, end: number): number {
    this.consuming = true;
    try {
      while (pos < end) {
        const phase = this.phase;
        if (phase === PH_TRANSMISSION) {
          if (this.payloadLeft > 0) {
            const ctx = this.payloadCtx as RequestCtx;
            const n = Math.min(this.payloadLeft, end - pos);
            src.copy(ctx.buf as Buffer, this.payloadPos, pos, pos + n);
            pos += n;
            this.payloadPos += n;
            this.payloadLeft -= n;
            if (this.payloadLeft === 0) {
              this.payloadCtx = null;
              this.executeWrite(ctx);
            }
            continue;
          }
          if (this.discardLeft > 0) {
            const n = Math.min(this.discardLeft, end - pos);
            pos += n;
            this.discardLeft -= n;
            continue;
          }
          if (this.inflight >= this.core.maxRequests || this.inflightBytes >= this.core.maxBytes) {
            this.pauseReading();
            break;
          }
          if (end - pos < NBD_REQUEST_SIZE) break;
          this.parseRequest(src, pos);
          pos += NBD_REQUEST_SIZE;
        } else if (phase === PH_OPTIONS) {
          if (this.skipLeft > 0) {
            const n = Math.min(this.skipLeft, end - pos);
            pos += n;
            this.skipLeft -= n;
            if (this.skipLeft === 0) this.sendOptReply(this.skipOption, this.skipReply, this.skipMessage);
            continue;
          }
          if (end - pos < 16) break;
          if (src.readUInt32BE(pos) !== NBD_OPTS_MAGIC_HI || src.readUInt32BE(pos + 4) !== NBD_OPTS_MAGIC_LO) {
            this.fail(`bad option magic 0x${src.toString('hex', pos, pos + 8)}: expected IHAVEOPT`);
            break;
          }
          const opt = src.readUInt32BE(pos + 8);
          const len = src.readUInt32BE(pos + 12);
          if (len > MAX_OPTION_BUFFERED) {
            if (len > NBD_MAX_PAYLOAD) {
              this.fail(`option ${nbdOptName(opt)} carries ${len} bytes, over the ${NBD_MAX_PAYLOAD}-byte limit`);
              break;
            }
            pos += 16;
            this.startSkip(opt, len);
            continue;
          }
          if (end - pos < 16 + len) break;
          const data = src.subarray(pos + 16, pos + 16 + len);
          pos += 16 + len;
          this.handleOption(opt, data);
          // After STARTTLS the rest of the plain-text stream is not ours to read.
          if (this.socket instanceof tls.TLSSocket && !this.tlsActive) return end;
        } else if (phase === PH_FLAGS) {
          if (end - pos < 4) break;
          const flags = src.readUInt32BE(pos);
          pos += 4;
          this.handleClientFlags(flags);
        } else {
          return end;
        }
      }
      return pos;
    } finally {
      this.consuming = false;
    }
  }

  private pauseReading(): void {
    if (!this.paused) {
      this.paused = true;
      this.socket.pause();
    }
  }

  private maybeResume(): void {
    if (!this.paused || this.consuming) return;
    if (this.inflight >= this.core.maxRequests || this.inflightBytes >= this.core.maxBytes) return;
    this.paused = false;
    this.consumeReader();
    if (!this.paused && this.phase === PH_TRANSMISSION) this.socket.resume();
  }

  // --- handshake -----------------------------------------------------------------------------

  private handleClientFlags(flags: number): void {
    const known = NbdClientFlag.FIXED_NEWSTYLE | NbdClientFlag.NO_ZEROES;
    if ((flags & ~known) !== 0) {
      this.fail(`unknown client flags 0x${flags.toString(16)}`);
      return;
    }
    this.fixedNewstyle = (flags & NbdClientFlag.FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & NbdClientFlag.NO_ZEROES) !== 0;
    this.phase = PH_OPTIONS;
  }

  private startSkip(opt: number, len: number): void {
    this.skipLeft = len;
    this.skipOption = opt;
    const known = opt >= NbdOpt.EXPORT_NAME && opt <= NbdOpt.SET_META_CONTEXT && opt !== NbdOpt.PEEK_EXPORT;
    this.skipReply = known ? NbdRep.ERR_TOO_BIG : NbdRep.ERR_UNSUP;
    this.skipMessage = known ? `option ${nbdOptName(opt)} of ${len} bytes is too large` : `unsupported option ${opt}`;
    if (!this.fixedNewstyle || opt === NbdOpt.EXPORT_NAME) this.fail(`option ${nbdOptName(opt)} of ${len} bytes is too large`);
  }

  private sendOptReply(opt: number, type: number, payload?: Buffer | string): void {
    const data = typeof payload === 'string' ? Buffer.from(payload.slice(0, NBD_MAX_STRING), 'utf8') : payload;
    const len = data === undefined ? 0 : data.length;
    const buf = Buffer.allocUnsafe(20 + len);
    buf.writeUInt32BE(NBD_REP_MAGIC_HI, 0);
    buf.writeUInt32BE(NBD_REP_MAGIC_LO, 4);
    buf.writeUInt32BE(opt, 8);
    buf.writeUInt32BE(type >>> 0, 12);
    buf.writeUInt32BE(len, 16);
    if (data !== undefined) data.copy(buf, 20);
    this.socket.write(buf);
  }

  private lookupExport(name: string): ExportEntry | undefined {
    const exp = this.core.exports.get(name);
    if (exp !== undefined || name !== '' || this.core.defaultExport === null) return exp;
    return this.core.exports.get(this.core.defaultExport);
  }

  private handleOption(opt: number, data: Buffer): void {
    const core = this.core;
    if (!this.fixedNewstyle && opt !== NbdOpt.EXPORT_NAME) {
      this.fail(`option ${nbdOptName(opt)} sent without fixed newstyle`);
      return;
    }
    if (core.tlsOptions !== null && core.tlsOptions.required !== false && !this.tlsActive) {
      // FORCEDTLS: only STARTTLS and ABORT before TLS.
      if (opt === NbdOpt.EXPORT_NAME) {
        this.fail('NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS');
        return;
      }
      if (opt !== NbdOpt.STARTTLS && opt !== NbdOpt.ABORT) {
        this.sendOptReply(opt, NbdRep.ERR_TLS_REQD, `option ${nbdOptName(opt)} not permitted before TLS: send NBD_OPT_STARTTLS first`);
        return;
      }
    }
    if (core.closing && opt !== NbdOpt.ABORT) {
      this.sendOptReply(opt, NbdRep.ERR_SHUTDOWN, 'server is shutting down');
      return;
    }
    switch (opt) {
      case NbdOpt.EXPORT_NAME:
        this.handleExportName(data);
        return;
      case NbdOpt.ABORT:
        this.sendOptReply(opt, NbdRep.ACK);
        this.beginClose('client sent NBD_OPT_ABORT');
        return;
      case NbdOpt.LIST:
        if (data.length !== 0) this.sendOptReply(opt, NbdRep.ERR_INVALID, 'NBD_OPT_LIST carries no data');
        else this.handleList();
        return;
      case NbdOpt.STARTTLS:
        this.handleStartTls(data);
        return;
      case NbdOpt.INFO:
      case NbdOpt.GO:
        this.handleInfo(opt, data);
        return;
      case NbdOpt.STRUCTURED_REPLY:
        if (data.length !== 0) this.sendOptReply(opt, NbdRep.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY carries no data');
        else if (this.structured) this.sendOptReply(opt, NbdRep.ERR_INVALID, 'structured replies already negotiated');
        else {
          this.structured = true;
          this.sendOptReply(opt, NbdRep.ACK);
        }
        return;
      case NbdOpt.LIST_META_CONTEXT:
      case NbdOpt.SET_META_CONTEXT:
        this.handleMetaContext(opt, data);
        return;
      default:
        this.sendOptReply(opt, NbdRep.ERR_UNSUP, `unsupported option ${nbdOptName(opt)}`);
    }
  }

  private handleExportName(data: Buffer): void {
    if (data.length > NBD_MAX_STRING) {
      this.fail(`NBD_OPT_EXPORT_NAME with a ${data.length}-byte name`);
      return;
    }
    const name = data.toString('utf8');
    const exp = this.lookupExport(name);
    if (exp === undefined || exp.device.disk.removed) {
      this.fail(`NBD_OPT_EXPORT_NAME for unknown export ${JSON.stringify(name)}`);
      return;
    }
    const reply = Buffer.alloc(10);
    writeU64(reply, exp.device.sizeBytes, 0);
    reply.writeUInt16BE(exportFlags(exp, this.structured), 8);
    this.socket.write(reply);
    if (!this.noZeroes) this.socket.write(NO_ZEROES_PAD);
    this.enterTransmission(exp);
  }

  private handleList(): void {
    for (const exp of this.core.exports.values()) {
      const name = Buffer.from(exp.name, 'utf8');
      const desc = Buffer.from(exp.description ?? '', 'utf8');
      const payload = Buffer.allocUnsafe(4 + name.length + desc.length);
      payload.writeUInt32BE(name.length, 0);
      name.copy(payload, 4);
      desc.copy(payload, 4 + name.length);
      this.sendOptReply(NbdOpt.LIST, NbdRep.SERVER, payload);
    }
    this.sendOptReply(NbdOpt.LIST, NbdRep.ACK);
  }

  private handleInfo(opt: number, data: Buffer): void {
    if (data.length < 6) {
      this.sendOptReply(opt, NbdRep.ERR_INVALID, `${nbdOptName(opt)} needs at least 6 bytes, got ${data.length}`);
      return;
    }
    const nameLen = data.readUInt32BE(0);
    if (nameLen > data.length - 6 || nameLen > NBD_MAX_STRING) {
      this.sendOptReply(opt, NbdRep.ERR_INVALID, `${nbdOptName(opt)}: name length ${nameLen} does not fit the option`);
      return;
    }
    const nreq = data.readUInt16BE(4 + nameLen);
    if (4 + nameLen + 2 + 2 * nreq !== data.length) {
      this.sendOptReply(opt, NbdRep.ERR_INVALID, `${nbdOptName(opt)}: ${nreq} information requests do not match the option length`);
      return;
    }
    let wantName = false;
    for (let i = 0; i < nreq; i++) {
      const req = data.readUInt16BE(4 + nameLen + 2 + 2 * i);
      if (req === NbdInfo.NAME) wantName = true;
    }
    const name = data.toString('utf8', 4, 4 + nameLen);
    const exp = this.lookupExport(name);
    if (exp === undefined || exp.device.disk.removed) {
      this.sendOptReply(opt, NbdRep.ERR_UNKNOWN, `export ${JSON.stringify(name.slice(0, 80))} not present`);
      return;
    }
    if (wantName) this.sendInfo(opt, NbdInfo.NAME, Buffer.from(exp.name, 'utf8'));
    if (exp.description !== null) this.sendInfo(opt, NbdInfo.DESCRIPTION, Buffer.from(exp.description, 'utf8'));
    const lbs = exp.device.disk.limits.logicalBlockSize;
    const sizes = Buffer.allocUnsafe(12);
    sizes.writeUInt32BE(lbs, 0);
    sizes.writeUInt32BE(Math.max(4096, lbs), 4);
    sizes.writeUInt32BE(NBD_MAX_PAYLOAD, 8);
    this.sendInfo(opt, NbdInfo.BLOCK_SIZE, sizes);
    const info = Buffer.allocUnsafe(10);
    writeU64(info, exp.device.sizeBytes, 0);
    info.writeUInt16BE(exportFlags(exp, this.structured), 8);
    this.sendInfo(opt, NbdInfo.EXPORT, info);
    this.sendOptReply(opt, NbdRep.ACK);
    if (opt === NbdOpt.GO) this.enterTransmission(exp);
  }

  private sendInfo(opt: number, type: number, payload: Buffer): void {
    const buf = Buffer.allocUnsafe(2 + payload.length);
    buf.writeUInt16BE(type, 0);
    payload.copy(buf, 2);
    this.sendOptReply(opt, NbdRep.INFO, buf);
  }

  private handleMetaContext(opt: number, data: Buffer): void {
    const isSet = opt === NbdOpt.SET_META_CONTEXT;
    if (isSet) {
      // SET replaces the previous selection even when it fails.
      this.metaExport = null;
      this.metaContexts = [];
      if (!this.structured) {
        this.sendOptReply(opt, NbdRep.ERR_INVALID, 'NBD_OPT_SET_META_CONTEXT needs structured replies negotiated first');
        return;
      }
    }
    const invalid = (why: string): void => this.sendOptReply(opt, NbdRep.ERR_INVALID, `${nbdOptName(opt)}: ${why}`);
    if (data.length < 8) return invalid('option too short');
    const nameLen = data.readUInt32BE(0);
    if (nameLen > NBD_MAX_STRING || 4 + nameLen + 4 > data.length) return invalid('inconsistent export name length');
    const name = data.toString('utf8', 4, 4 + nameLen);
    let pos = 4 + nameLen;
    const nq = data.readUInt32BE(pos);
    pos += 4;
    const queries: string[] = [];
    for (let i = 0; i < nq; i++) {
      if (pos + 4 > data.length) return invalid('inconsistent query count');
      const qlen = data.readUInt32BE(pos);
      pos += 4;
      if (pos + qlen > data.length) return invalid('inconsistent query length');
      // qemu skips over-long queries rather than failing the option.
      if (qlen <= NBD_MAX_STRING) queries.push(data.toString('utf8', pos, pos + qlen));
      pos += qlen;
    }
    if (pos !== data.length) return invalid('trailing bytes after the queries');
    const exp = this.lookupExport(name);
    if (exp === undefined) {
      this.sendOptReply(opt, NbdRep.ERR_UNKNOWN, `export ${JSON.stringify(name.slice(0, 80))} not present`);
      return;
    }
    const list = !isSet;
    let allocation = false;
    const bitmaps = exp.bitmaps.map(() => false);
    if (list && nq === 0) {
      allocation = true;
      bitmaps.fill(true);
    } else {
      for (const q of queries) {
        if (q.startsWith('base:')) {
          const leaf = q.slice(5);
          if ((leaf === '' && list) || leaf === 'allocation') allocation = true;
        } else if (q.startsWith('qemu:')) {
          const rest = q.slice(5);
          if (rest === '') {
            if (list) bitmaps.fill(true);
          } else if (rest.startsWith('dirty-bitmap:')) {
            const leaf = rest.slice('dirty-bitmap:'.length);
            if (leaf === '') {
              if (list) bitmaps.fill(true);
            } else {
              const i = exp.bitmaps.findIndex((b) => b.name === leaf);
              if (i >= 0) bitmaps[i] = true;
            }
          }
        }
        // Unknown namespaces are ignored, as the spec requires.
      }
    }
    const selected: MetaContext[] = [];
    if (allocation) selected.push({ id: META_ID_BASE_ALLOCATION, name: BASE_ALLOCATION, bitmap: null });
    exp.bitmaps.forEach((b, i) => {
      if (bitmaps[i] === true) selected.push({ id: META_ID_DIRTY_BITMAP + i, name: QEMU_DIRTY_BITMAP_PREFIX + b.name, bitmap: b });
    });
    for (const c of selected) {
      const nameBuf = Buffer.from(c.name, 'utf8');
      const payload = Buffer.allocUnsafe(4 + nameBuf.length);
      payload.writeUInt32BE(list ? 0 : c.id, 0);
      nameBuf.copy(payload, 4);
      this.sendOptReply(opt, NbdRep.META_CONTEXT, payload);
    }
    this.sendOptReply(opt, NbdRep.ACK);
    if (isSet) {
      this.metaExport = exp;
      this.metaContexts = selected;
    }
  }

  private handleStartTls(data: Buffer): void {
    const core = this.core;
    if (data.length !== 0) {
      this.sendOptReply(NbdOpt.STARTTLS, NbdRep.ERR_INVALID, 'NBD_OPT_STARTTLS carries no data');
      return;
    }
    if (core.tlsContext === null || core.tlsOptions === null) {
      this.sendOptReply(NbdOpt.STARTTLS, NbdRep.ERR_POLICY, 'TLS not configured on this server');
      return;
    }
    if (this.tlsActive) {
      this.sendOptReply(NbdOpt.STARTTLS, NbdRep.ERR_INVALID, 'TLS already negotiated');
      return;
    }
    this.sendOptReply(NbdOpt.STARTTLS, NbdRep.ACK);
    // The client sends nothing until it has our ACK, so no byte of its TLS handshake can have
    // been read yet: wrap the socket now, in this same tick.
    const raw = this.socket;
    raw.removeListener('data', this.onData);
    raw.removeListener('close', this.onClose);
    this.reader.clear();
    const secure = new tls.TLSSocket(raw, {
      isServer: true,
      secureContext: core.tlsContext,
      requestCert: core.tlsOptions.requestCert === true,
      rejectUnauthorized: core.tlsOptions.requestCert === true,
    });
    this.socket = secure;
    secure.on('secure', () => {
      this.tlsActive = true;
      // Negotiation state before STARTTLS does not survive it.
      this.structured = false;
      this.metaExport = null;
      this.metaContexts = [];
      this.debug('TLS established');
    });
    secure.on('data', this.onData);
    secure.on('error', (err: Error) => {
      this.warn(`TLS failed: ${err.message}`);
      secure.destroy();
    });
    secure.on('close', this.onClose);
  }

  private enterTransmission(exp: ExportEntry): void {
    this.exp = exp;
    this.device = exp.device;
    this.exportSize = exp.device.sizeBytes;
    this.lbs = exp.device.disk.limits.logicalBlockSize;
    this.readOnly = exportReadOnly(exp);
    this.flags = exportFlags(exp, this.structured);
    this.sparseReads = this.structured && exp.device.disk.backend.blockStatus !== undefined;
    if (this.metaExport !== exp) this.metaContexts = [];
    this.phase = PH_TRANSMISSION;
    this.debug(`serving export ${JSON.stringify(exp.name)} (${this.structured ? 'structured' : 'simple'} replies)`);
  }

  // --- transmission --------------------------------------------------------------------------

  private getCtx(): RequestCtx {
    this.inflight++;
    return this.freeCtx.pop() ?? new RequestCtx(this);
  }

  /** Returns a context whose reply has been written (or could not be): its buffer goes back. */
  release(ctx: RequestCtx): void {
    const buf = ctx.buf;
    if (buf !== null) {
      ctx.buf = null;
      this.inflightBytes -= buf.length;
      putPayloadBuffer(buf);
    }
    this.inflight--;
    if (this.freeCtx.length < CTX_POOL_MAX) this.freeCtx.push(ctx);
    if (this.phase === PH_CLOSING) {
      if (this.inflight === 0) this.finishClose();
    } else if (this.paused) {
      this.maybeResume();
    }
  }

  private attachBuffer(ctx: RequestCtx, size: number): Buffer {
    const buf = getPayloadBuffer(size);
    ctx.buf = buf;
    this.inflightBytes += buf.length;
    return buf;
  }

  private parseRequest(src: Buffer, pos: number): void {
    const magic = src.readUInt32BE(pos);
    if (magic !== NBD_REQUEST_MAGIC) {
      this.fail(`bad request magic 0x${magic.toString(16)}: expected 0x${NBD_REQUEST_MAGIC.toString(16)}`);
      return;
    }
    const type = src.readUInt16BE(pos + 6);
    if (type === NbdCmd.DISC) {
      this.beginClose('client sent NBD_CMD_DISC');
      return;
    }
    const ctx = this.getCtx();
    src.copy(ctx.hdr, 8, pos + 8, pos + 16);
    ctx.type = type;
    ctx.cmdFlags = src.readUInt16BE(pos + 4);
    const offHi = src.readUInt32BE(pos + 16);
    ctx.offHi = offHi;
    ctx.offset = offHi * 0x100000000 + src.readUInt32BE(pos + 20);
    const length = src.readUInt32BE(pos + 24);
    ctx.length = length;
    ctx.unaligned = false;
    ctx.dataOff = 0;
    if (type === NbdCmd.WRITE) {
      if (length > NBD_MAX_PAYLOAD) {
        // The payload cannot be taken; the stream is lost after this request.
        this.replyError(ctx, NbdErrno.EINVAL, `WRITE of ${length} bytes is over the ${NBD_MAX_PAYLOAD}-byte maximum payload`);
        this.fail(`WRITE of ${length} bytes is over the maximum payload`);
        return;
      }
      const err = this.check(ctx);
      if (err !== 0) {
        this.replyError(ctx, err, this.checkMessage);
        this.discardLeft = length;
        return;
      }
      if (length === 0) {
        this.replySimple(ctx, 0);
        return;
      }
      this.attachBuffer(ctx, length);
      this.payloadCtx = ctx;
      this.payloadLeft = length;
      this.payloadPos = 0;
      return;
    }
    const err = this.check(ctx);
    if (err !== 0) {
      this.replyError(ctx, err, this.checkMessage);
      return;
    }
    this.execute(ctx);
  }

  private checkMessage = '';

  /** Validates a request against the export; returns 0 or the NBD errno (message in checkMessage). */
  private check(ctx: RequestCtx): number {
    const type = ctx.type;
    const len = ctx.length;
    let valid: number = NbdCmdFlag.FUA;
    switch (type) {
      case NbdCmd.READ:
        if (this.structured) valid |= NbdCmdFlag.DF;
        break;
      case NbdCmd.WRITE:
      case NbdCmd.FLUSH:
      case NbdCmd.TRIM:
      case NbdCmd.CACHE:
        break;
      case NbdCmd.WRITE_ZEROES:
        valid |= NbdCmdFlag.NO_HOLE;
        if ((this.flags & NbdTransmissionFlag.SEND_FAST_ZERO) !== 0) valid |= NbdCmdFlag.FAST_ZERO;
        break;
      case NbdCmd.BLOCK_STATUS:
        valid |= NbdCmdFlag.REQ_ONE;
        break;
      default:
        this.checkMessage = `invalid request type ${type}`;
        return NbdErrno.EINVAL;
    }
    if ((ctx.cmdFlags & ~valid) !== 0) {
      this.checkMessage = `unsupported flags 0x${ctx.cmdFlags.toString(16)} for ${nbdCmdName(type)}`;
      return NbdErrno.EINVAL;
    }
    if (type === NbdCmd.FLUSH) return 0;
    if (this.readOnly && (type === NbdCmd.WRITE || type === NbdCmd.TRIM || type === NbdCmd.WRITE_ZEROES)) {
      this.checkMessage = `export ${JSON.stringify((this.exp as ExportEntry).name)} is read-only`;
      return NbdErrno.EPERM;
    }
    if (ctx.offHi >= OFFSET_HI_LIMIT || ctx.offset + len > this.exportSize) {
      this.checkMessage = `${nbdCmdName(type)} at ${ctx.offset} + ${len} is past the end of the export (${this.exportSize} bytes)`;
      return type === NbdCmd.WRITE || type === NbdCmd.WRITE_ZEROES ? NbdErrno.ENOSPC : NbdErrno.EINVAL;
    }
    switch (type) {
      case NbdCmd.READ:
        if (len > NBD_MAX_PAYLOAD) {
          this.checkMessage = `READ of ${len} bytes is over the ${NBD_MAX_PAYLOAD}-byte maximum payload`;
          return this.structured ? NbdErrno.EOVERFLOW : NbdErrno.EINVAL;
        }
        break;
      case NbdCmd.CACHE:
        if (len > NBD_MAX_PAYLOAD) {
          this.checkMessage = `CACHE of ${len} bytes is over the ${NBD_MAX_PAYLOAD}-byte maximum payload`;
          return NbdErrno.EOVERFLOW;
        }
        return 0;
      case NbdCmd.BLOCK_STATUS:
        if (len === 0) {
          this.checkMessage = 'BLOCK_STATUS needs a non-zero length';
          return NbdErrno.EINVAL;
        }
        if (this.metaContexts.length === 0) {
          this.checkMessage = 'BLOCK_STATUS without a metadata context negotiated (NBD_OPT_SET_META_CONTEXT)';
          return NbdErrno.EINVAL;
        }
        return 0;
      case NbdCmd.TRIM:
        return 0;
      default:
        break;
    }
    const lbs = this.lbs;
    if (ctx.offset % lbs !== 0 || len % lbs !== 0) {
      // The minimum block size is a hint to clients; like qemu-nbd, serve the others by
      // bouncing through the covering blocks (READ) or read-modify-write (WRITE, WRITE_ZEROES).
      if (Math.ceil((ctx.offset + len) / lbs) * lbs > this.exportSize) {
        this.checkMessage = `${nbdCmdName(type)} at ${ctx.offset} + ${len} ends in a partial block past the end of the export (${this.exportSize} bytes)`;
        return NbdErrno.EINVAL;
      }
      ctx.unaligned = true;
    }
    return 0;
  }

  private execute(ctx: RequestCtx): void {
    const dev = this.device as BlockDev;
    const fua = (ctx.cmdFlags & NbdCmdFlag.FUA) !== 0 ? ReqFlag.FUA : 0;
    const len = ctx.length;
    switch (ctx.type) {
      case NbdCmd.READ: {
        if (len === 0) {
          if (this.structured) this.replyNone(ctx);
          else this.replySimple(ctx, 0);
          return;
        }
        if (ctx.unaligned) {
          const lbs = this.lbs;
          const start = Math.floor(ctx.offset / lbs) * lbs;
          const size = Math.ceil((ctx.offset + len) / lbs) * lbs - start;
          ctx.dataOff = ctx.offset - start;
          const buf = this.attachBuffer(ctx, size);
          submitSplit(ctx.prepareBio(ReqOp.READ, dev, start / SECTOR_SIZE, size, buf, 0));
          return;
        }
        const buf = this.attachBuffer(ctx, len);
        submitSplit(ctx.prepareBio(ReqOp.READ, dev, ctx.offset / SECTOR_SIZE, len, buf, 0));
        return;
      }
      case NbdCmd.FLUSH:
        submitBio(ctx.prepareBio(ReqOp.FLUSH, dev, 0, 0, null, 0));
        return;
      case NbdCmd.TRIM: {
        // Advisory: round inward to whole blocks; a device without discard ignores it.
        const lbs = this.lbs;
        const start = Math.ceil(ctx.offset / lbs) * lbs;
        const end = Math.floor((ctx.offset + len) / lbs) * lbs;
        if (end <= start || dev.disk.limits.maxDiscardSectors === 0) {
          this.replySimple(ctx, 0);
          return;
        }
        submitSplit(ctx.prepareBio(ReqOp.DISCARD, dev, start / SECTOR_SIZE, end - start, null, fua));
        return;
      }
      case NbdCmd.WRITE_ZEROES:
        this.writeZeroes(ctx, dev, fua);
        return;
      case NbdCmd.CACHE: {
        const lbs = this.lbs;
        const start = Math.floor(ctx.offset / lbs) * lbs;
        const end = Math.min(this.exportSize, Math.ceil((ctx.offset + len) / lbs) * lbs);
        if (end <= start) {
          this.replySimple(ctx, 0);
          return;
        }
        // The actions of a READ, replying with just a status: the data lands in any cache
        // below (page cache, a CoW filter) and every filter sees the access.
        const buf = this.attachBuffer(ctx, end - start);
        submitSplit(ctx.prepareBio(ReqOp.READ, dev, start / SECTOR_SIZE, end - start, buf, 0));
        return;
      }
      case NbdCmd.BLOCK_STATUS:
        this.blockStatus(ctx);
        return;
      default:
        this.replyError(ctx, NbdErrno.EINVAL, `invalid request type ${ctx.type}`);
    }
  }

  private executeWrite(ctx: RequestCtx): void {
    if (this.phase !== PH_TRANSMISSION) {
      this.release(ctx);
      return;
    }
    const fua = (ctx.cmdFlags & NbdCmdFlag.FUA) !== 0 ? ReqFlag.FUA : 0;
    if (ctx.unaligned) {
      const op = new RmwOp(this, ctx, this.device as BlockDev, this.lbs, fua, 0);
      op.locks.acquire(op);
      return;
    }
    submitSplit(ctx.prepareBio(ReqOp.WRITE, this.device as BlockDev, ctx.offset / SECTOR_SIZE, ctx.length, ctx.buf, fua));
  }

  private writeZeroes(ctx: RequestCtx, dev: BlockDev, fua: number): void {
    const len = ctx.length;
    if (len === 0) {
      this.replySimple(ctx, 0);
      return;
    }
    const canZero = dev.disk.limits.maxWriteZeroesSectors > 0;
    if (!canZero && (ctx.cmdFlags & NbdCmdFlag.FAST_ZERO) !== 0) {
      this.replyError(ctx, NbdErrno.ENOTSUP, `"${dev.name}" has no WRITE_ZEROES: zeroing would be as slow as writing`);
      return;
    }
    if (ctx.unaligned) {
      // The partial blocks are written as data: FAST_ZERO still holds, it is two blocks at most.
      const nounmap = (ctx.cmdFlags & NbdCmdFlag.NO_HOLE) !== 0 ? ReqFlag.NOUNMAP : 0;
      const op = new RmwOp(this, ctx, dev, this.lbs, fua, nounmap);
      op.locks.acquire(op);
      return;
    }
    const sector = ctx.offset / SECTOR_SIZE;
    if (canZero) {
      const flags = fua | ((ctx.cmdFlags & NbdCmdFlag.NO_HOLE) !== 0 ? ReqFlag.NOUNMAP : 0);
      submitSplit(ctx.prepareBio(ReqOp.WRITE_ZEROES, dev, sector, len, null, flags));
      return;
    }
    // No WRITE_ZEROES below: write zeros from one shared buffer, every piece chained to the
    // last, which completes the request.
    const z = zeros();
    const last = Math.min(len, ZERO_CHUNK);
    const lastOffset = len - last;
    const parent = ctx.prepareBio(ReqOp.WRITE, dev, sector + lastOffset / SECTOR_SIZE, last, z, fua);
    for (let done = 0; done < lastOffset; done += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, lastOffset - done);
      const piece = new Bio(ReqOp.WRITE, dev, sector + done / SECTOR_SIZE, n, [new BioVec(z, 0, n)]);
      piece.flags = fua;
      bioChain(piece, parent);
      submitSplit(piece);
    }
    submitSplit(parent);
  }

  private blockStatus(ctx: RequestCtx): void {
    const contexts = this.metaContexts;
    const maxExtents = (ctx.cmdFlags & NbdCmdFlag.REQ_ONE) !== 0 ? 1 : NBD_MAX_EXTENTS;
    const offset = ctx.offset;
    const len = ctx.length;
    let async = false;
    let results: Array<number[] | Promise<number[]>>;
    try {
      results = contexts.map((c) => {
        if (c.bitmap === null) return allocationExtents(this.device as BlockDev, offset, len, maxExtents);
        async = true;
        return dirtyBitmapExtents(c.bitmap, offset, len, maxExtents);
      });
    } catch (err) {
      // The range was checked against the export's size at connect; the device may have shrunk.
      this.replyError(ctx, NbdErrno.EINVAL, `block status failed: ${err instanceof Error ? err.message : String(err)}`);
      return;
    }
    if (!async) {
      this.sendBlockStatus(ctx, contexts, results as number[][]);
      return;
    }
    Promise.all(results)
      .then(
        (extents) => this.sendBlockStatus(ctx, contexts, extents),
        (err: unknown) => this.replyError(ctx, NbdErrno.EIO, `block status failed: ${err instanceof Error ? err.message : String(err)}`),
      )
      .catch((err: unknown) => this.internalError(err));
  }

  private sendBlockStatus(ctx: RequestCtx, contexts: readonly MetaContext[], extents: readonly number[][]): void {
    if (this.phase === PH_CLOSED) {
      this.release(ctx);
      return;
    }
    let total = 0;
    for (const e of extents) total += 24 + 4 * e.length;
    const out = Buffer.allocUnsafe(total);
    let pos = 0;
    for (let i = 0; i < contexts.length; i++) {
      const e = extents[i] as number[];
      out.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, pos);
      out.writeUInt16BE(i === contexts.length - 1 ? NbdReplyFlag.DONE : 0, pos + 4);
      out.writeUInt16BE(NbdReplyType.BLOCK_STATUS, pos + 6);
      ctx.hdr.copy(out, pos + 8, 8, 16);
      out.writeUInt32BE(4 + 4 * e.length, pos + 16);
      out.writeUInt32BE((contexts[i] as MetaContext).id, pos + 20);
      pos += 24;
      for (let j = 0; j < e.length; j++) {
        out.writeUInt32BE(e[j] as number, pos);
        pos += 4;
      }
    }
    this.socket.write(out, ctx.flushed);
  }

  /** End-io of a request's bio (runs inside bio completion: must not throw). */
  ioDone(ctx: RequestCtx, bio: Bio): void {
    try {
      this.ioDoneUnsafe(ctx, bio);
    } catch (err) {
      this.internalError(err);
    }
  }

  private ioDoneUnsafe(ctx: RequestCtx, bio: Bio): void {
    if (this.phase === PH_CLOSED) {
      this.release(ctx);
      return;
    }
    if (bio.status !== BlkStatus.OK) {
      const err = bio.error;
      const message = err !== null ? err.message : `${nbdCmdName(ctx.type)} failed: ${blkStatusToErrno(bio.status)}`;
      this.replyError(ctx, errnoForBio(bio), message);
      return;
    }
    if (ctx.type === NbdCmd.READ) this.replyRead(ctx);
    else this.replySimple(ctx, 0);
  }

  // --- replies -------------------------------------------------------------------------------

  /**
   * Room for `n` bytes of reply in the current batch, for request `ctx`: returns the batch, its
   * `pos` at the start of the room (the caller advances it). Schedules the flush.
   */
  private batchFor(ctx: RequestCtx, n: number): ReplyBatch {
    let b = this.batch;
    if (b !== null && b.pos + n > b.buf.length) {
      this.flushBatch();
      b = null;
    }
    if (b === null) {
      b = this.freeBatches.pop() ?? new ReplyBatch(this);
      b.buf = getPayloadBuffer(BATCH_BYTES);
      this.batch = b;
      if (!this.flushScheduled) {
        this.flushScheduled = true;
        setImmediate(this.onFlush);
      }
    }
    b.ctxs.push(ctx);
    return b;
  }

  /** Writes the current batch, if any. */
  private flushBatch(): void {
    const b = this.batch;
    if (b === null) return;
    this.batch = null;
    if (this.phase === PH_CLOSED) {
      this.batchWritten(b);
      return;
    }
    this.socket.write(b.pos === b.buf.length ? b.buf : b.buf.subarray(0, b.pos), b.written);
  }

  /** A batch left the socket (or could not): its requests are done. */
  batchWritten(b: ReplyBatch): void {
    const ctxs = b.ctxs;
    const n = ctxs.length;
    putPayloadBuffer(b.buf);
    b.buf = EMPTY;
    b.pos = 0;
    for (let i = 0; i < n; i++) this.release(ctxs[i] as RequestCtx);
    ctxs.length = 0;
    if (this.freeBatches.length < BATCH_POOL_MAX) this.freeBatches.push(b);
  }

  /** Gives back a request's payload buffer early (its bytes were copied into a batch). */
  private dropBuffer(ctx: RequestCtx): void {
    const buf = ctx.buf;
    if (buf !== null) {
      ctx.buf = null;
      this.inflightBytes -= buf.length;
      putPayloadBuffer(buf);
    }
  }

  private replySimple(ctx: RequestCtx, errno: number): void {
    if (this.phase === PH_CLOSED) {
      this.release(ctx);
      return;
    }
    this.dropBuffer(ctx);
    const b = this.batchFor(ctx, 16);
    const out = b.buf;
    const pos = b.pos;
    out.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, pos);
    out.writeUInt32BE(errno, pos + 4);
    ctx.hdr.copy(out, pos + 8, 8, 16);
    b.pos = pos + 16;
  }

  private replyNone(ctx: RequestCtx): void {
    const b = this.batchFor(ctx, 20);
    const out = b.buf;
    const pos = b.pos;
    out.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, pos);
    out.writeUInt16BE(NbdReplyFlag.DONE, pos + 4);
    out.writeUInt16BE(NbdReplyType.NONE, pos + 6);
    ctx.hdr.copy(out, pos + 8, 8, 16);
    out.writeUInt32BE(0, pos + 16);
    b.pos = pos + 20;
  }

  private replyRead(ctx: RequestCtx): void {
    const len = ctx.length;
    if (this.sparseReads && len >= SPARSE_READ_MIN && (ctx.cmdFlags & NbdCmdFlag.DF) === 0 && !ctx.unaligned && this.replySparseRead(ctx)) return;
    const buf = ctx.buf as Buffer;
    const off = ctx.dataOff;
    const structured = this.structured;
    const hlen = structured ? 28 : 16;
    if (len + hlen <= BATCH_COPY_MAX) {
      const b = this.batchFor(ctx, len + hlen);
      const out = b.buf;
      const pos = b.pos;
      if (structured) {
        out.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, pos);
        out.writeUInt16BE(NbdReplyFlag.DONE, pos + 4);
        out.writeUInt16BE(NbdReplyType.OFFSET_DATA, pos + 6);
        ctx.hdr.copy(out, pos + 8, 8, 16);
        out.writeUInt32BE(len + 8, pos + 16);
        writeU64(out, ctx.offset, pos + 20);
      } else {
        out.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, pos);
        out.writeUInt32BE(0, pos + 4);
        ctx.hdr.copy(out, pos + 8, 8, 16);
      }
      buf.copy(out, pos + hlen, off, off + len);
      b.pos = pos + hlen + len;
      this.dropBuffer(ctx);
      return;
    }
    const data = off === 0 && len === buf.length ? buf : buf.subarray(off, off + len);
    const h = ctx.hdr;
    const s = this.socket;
    s.cork();
    if (structured) {
      h.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
      h.writeUInt16BE(NbdReplyFlag.DONE, 4);
      h.writeUInt16BE(NbdReplyType.OFFSET_DATA, 6);
      h.writeUInt32BE(len + 8, 16);
      writeU64(h, ctx.offset, 20);
      s.write(ctx.hdr28);
    } else {
      h.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
      h.writeUInt32BE(0, 4);
      s.write(ctx.hdr16);
    }
    s.write(data, ctx.flushed);
    s.uncork();
  }

  /**
   * Replies to a structured READ whose data is in `ctx.buf` with OFFSET_DATA chunks for data
   * and OFFSET_HOLE chunks for the backend's holes, in order, the last one flagged DONE. The
   * read bio ran over the whole range regardless, so every filter saw it; asking for holes only
   * after it completed is as good as before: a hole reads as zeros at the moment of the answer,
   * within the request's lifetime. Returns false (nothing sent) when the range has no hole or
   * the backend cannot tell: the caller sends one data chunk.
   */
  private replySparseRead(ctx: RequestCtx): boolean {
    const len = ctx.length;
    let extents: BlockStatusExtent[] | null;
    try {
      extents = blkdevBlockStatus(this.device as BlockDev, ctx.offset, len);
    } catch {
      return false;
    }
    if (extents === null || extents.length === 0) return false;
    let holes = false;
    let covered = 0;
    for (let i = 0; i < extents.length; i++) {
      const e = extents[i] as BlockStatusExtent;
      if (e.hole) holes = true;
      covered += e.length;
    }
    // Nothing to save, or an answer that does not tile the request: send the data.
    if (!holes || covered !== len) return false;
    const buf = ctx.buf as Buffer;
    const n = extents.length;
    // One buffer for every chunk header (and hole payload): 32 bytes each.
    const heads = Buffer.allocUnsafe(32 * n);
    const s = this.socket;
    s.cork();
    let pos = 0;
    for (let i = 0; i < n; i++) {
      const e = extents[i] as BlockStatusExtent;
      const h = heads.subarray(32 * i, 32 * i + 32);
      h.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
      h.writeUInt16BE(i === n - 1 ? NbdReplyFlag.DONE : 0, 4);
      ctx.hdr.copy(h, 8, 8, 16);
      writeU64(h, ctx.offset + pos, 20);
      const last = i === n - 1;
      if (e.hole) {
        h.writeUInt16BE(NbdReplyType.OFFSET_HOLE, 6);
        h.writeUInt32BE(12, 16);
        h.writeUInt32BE(e.length, 28);
        if (last) s.write(h, ctx.flushed);
        else s.write(h);
      } else {
        h.writeUInt16BE(NbdReplyType.OFFSET_DATA, 6);
        h.writeUInt32BE(e.length + 8, 16);
        s.write(h.subarray(0, 28));
        const data = buf.subarray(pos, pos + e.length);
        if (last) s.write(data, ctx.flushed);
        else s.write(data);
      }
      pos += e.length;
    }
    s.uncork();
    return true;
  }

  private replyError(ctx: RequestCtx, errno: number, message: string): void {
    if (this.phase === PH_CLOSED) {
      this.release(ctx);
      return;
    }
    this.debug(`${nbdCmdName(ctx.type)} at ${ctx.offset} + ${ctx.length}: ${nbdErrnoName(errno)}: ${message}`);
    if (!this.structured) {
      this.replySimple(ctx, errno);
      return;
    }
    let msg = Buffer.from(message, 'utf8');
    if (msg.length > 1024) msg = msg.subarray(0, 1024);
    this.dropBuffer(ctx);
    const b = this.batchFor(ctx, 26 + msg.length);
    const out = b.buf;
    const pos = b.pos;
    out.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, pos);
    out.writeUInt16BE(NbdReplyFlag.DONE, pos + 4);
    out.writeUInt16BE(NbdReplyType.ERROR, pos + 6);
    ctx.hdr.copy(out, pos + 8, 8, 16);
    out.writeUInt32BE(6 + msg.length, pos + 16);
    out.writeUInt32BE(errno, pos + 20);
    out.writeUInt16BE(msg.length, pos + 24);
    msg.copy(out, pos + 26);
    b.pos = pos + 26 + msg.length;
  }

  // --- closing -------------------------------------------------------------------------------

  /** A protocol violation: stop reading, finish what is in flight, hang up. */
  private fail(reason: string): void {
    this.warn(`disconnecting: ${reason}`);
    this.beginClose(reason);
  }

  /**
   * Stops reading; requests in flight finish and are answered, then the socket is ended (and
   * destroyed if the peer lingers).
   */
  beginClose(reason: string): void {
    if (this.phase >= PH_CLOSING) return;
    this.phase = PH_CLOSING;
    this.closeReason = reason;
    this.debug(`closing: ${reason}`);
    this.socket.pause();
    this.reader.clear();
    const pending = this.payloadCtx;
    if (pending !== null) {
      this.payloadCtx = null;
      this.payloadLeft = 0;
      this.release(pending);
    }
    if (this.inflight === 0) this.finishClose();
  }

  private finishClose(): void {
    if (this.lingerTimer !== null || this.phase === PH_CLOSED) return;
    this.socket.end();
    // Read and drop whatever the peer still sends, so its close is seen at once; a paused
    // socket with unread data would only go at the linger timeout.
    this.socket.resume();
    this.lingerTimer = setTimeout(() => this.socket.destroy(), LINGER_MS);
    this.lingerTimer.unref();
  }

  /** Hangs up at once (server close timeout). */
  destroy(): void {
    this.socket.destroy();
  }

  private handleClose(): void {
    if (this.phase === PH_CLOSED) return;
    this.phase = PH_CLOSED;
    if (this.lingerTimer !== null) clearTimeout(this.lingerTimer);
    this.lingerTimer = null;
    this.reader.clear();
    const pending = this.payloadCtx;
    if (pending !== null) {
      this.payloadCtx = null;
      this.payloadLeft = 0;
      this.release(pending);
    }
    this.core.connectionClosed(this);
    this.resolveClosed();
  }
}

/**
 * An NBD server whose exports are blkfilter block devices: every request from a client becomes
 * bios submitted with `submitBio`, so attached filters (CBT, snapshots) see all of them. Create
 * with {@link createNbdServer}, then {@link NbdServer.listen}.
 */
export class NbdServer {
  private readonly core: ServerCore;
  private readonly connections = new Set<ServerConnection>();
  private netServer: net.Server | null = null;
  private addr: NbdServerAddress | null = null;
  private closePromise: Promise<void> | null = null;

  /** @internal use {@link createNbdServer}. */
  constructor(options: NbdServerOptions) {
    const maxRequests = options.maxInFlightRequests ?? DEFAULT_MAX_REQUESTS;
    const maxBytes = options.maxInFlightBytes ?? DEFAULT_MAX_BYTES;
    if (!Number.isInteger(maxRequests) || maxRequests < 1) {
      throw new InvalidArgumentError(`maxInFlightRequests must be a whole number >= 1, got ${String(maxRequests)}`);
    }
    if (!Number.isInteger(maxBytes) || maxBytes < 1) {
      throw new InvalidArgumentError(`maxInFlightBytes must be a whole number >= 1, got ${String(maxBytes)}`);
    }
    const tlsOptions = options.tls ?? null;
    let tlsContext: tls.SecureContext | null = null;
    if (tlsOptions !== null) {
      const ca = tlsOptions.ca;
      tlsContext = tls.createSecureContext({
        key: tlsOptions.key,
        cert: tlsOptions.cert,
        ...(ca !== undefined ? { ca: Array.isArray(ca) ? [...ca] : (ca as string | Buffer) } : {}),
        minVersion: 'TLSv1.2',
      });
    }
    const connections = this.connections;
    this.core = {
      exports: new Map(),
      defaultExport: options.defaultExport ?? null,
      tlsContext,
      tlsOptions,
      maxRequests,
      maxBytes,
      log: options.log ?? null,
      closing: false,
      connectionClosed(conn) {
        connections.delete(conn);
      },
    };
    for (const [name, config] of Object.entries(options.exports ?? {})) this.addExport(name, config);
  }

  /**
   * Adds (or replaces) export `name`. Connections already serving the old one keep it. Throws
   * `InvalidArgumentError` for a bad config and `NoSuchDeviceError` for an unknown device name.
   */
  addExport(name: string, config: NbdExportConfig): void {
    this.core.exports.set(name, resolveExport(name, config));
  }

  /** Removes export `name` for new clients (connected ones keep it); false if there was none. */
  removeExport(name: string): boolean {
    return this.core.exports.delete(name);
  }

  /** The export names, in the order `NBD_OPT_LIST` reports them. */
  get exportNames(): string[] {
    return [...this.core.exports.keys()];
  }

  /** Open client connections. */
  get connectionCount(): number {
    return this.connections.size;
  }

  /** Where the server listens, once {@link NbdServer.listen} resolved; else null. */
  get address(): NbdServerAddress | null {
    return this.addr;
  }

  /**
   * Starts listening: a TCP port on 127.0.0.1 (default 10809; 0 for any free port), a unix
   * socket `path`, or an inherited listening `fd` (systemd socket activation: `{ fd: 3 }`).
   * Resolves with the address once listening.
   */
  listen(options: NbdListenOptions | number = {}): Promise<NbdServerAddress> {
    const opts: NbdListenOptions = typeof options === 'number' ? { port: options } : options;
    if (this.netServer !== null) throw new InvalidArgumentError('this NBD server is already listening; create another to listen elsewhere');
    const server = net.createServer({ pauseOnConnect: false }, (socket) => this.accept(socket));
    this.netServer = server;
    return new Promise<NbdServerAddress>((resolve, reject) => {
      const onError = (err: Error): void => {
        this.netServer = null;
        reject(err);
      };
      server.once('error', onError);
      const done = (): void => {
        server.removeListener('error', onError);
        server.on('error', (err) => this.core.log?.('warn', `nbd server error: ${err.message}`));
        const a = server.address();
        if (opts.fd !== undefined) this.addr = { kind: 'fd', fd: opts.fd };
        else if (typeof a === 'string') this.addr = { kind: 'unix', path: a };
        else if (a !== null) this.addr = { kind: 'tcp', host: a.address, port: a.port };
        else this.addr = { kind: 'unix', path: opts.path ?? '' };
        resolve(this.addr);
      };
      if (opts.fd !== undefined) server.listen({ fd: opts.fd }, done);
      else if (opts.path !== undefined) server.listen({ path: opts.path }, done);
      else server.listen({ port: opts.port ?? NBD_DEFAULT_PORT, host: opts.host ?? '127.0.0.1' }, done);
    });
  }

  private accept(socket: net.Socket): void {
    this.serveSocket(socket);
  }

  /**
   * Serves one already-connected socket (inetd style, a socket pair, a test double): sends the
   * handshake greeting and handles the connection like an accepted one. Refused (destroyed)
   * once the server is closing.
   */
  serveSocket(socket: net.Socket): void {
    if (this.core.closing) {
      socket.destroy();
      return;
    }
    const conn = new ServerConnection(this.core, socket);
    this.connections.add(conn);
    this.core.log?.('debug', `nbd ${conn.peer}: connected`);
  }

  /**
   * Stops accepting connections, lets requests in flight finish and be answered, then closes
   * every connection. Connections still open after `timeoutMs` (default 10 s) are destroyed.
   */
  close(options: { timeoutMs?: number } = {}): Promise<void> {
    if (this.closePromise !== null) return this.closePromise;
    this.core.closing = true;
    const timeoutMs = options.timeoutMs ?? 10_000;
    const server = this.netServer;
    const listening = new Promise<void>((resolve) => {
      if (server === null || !server.listening) resolve();
      else server.close(() => resolve());
    });
    for (const conn of this.connections) conn.beginClose('server shutting down');
    const all = Promise.all([...this.connections].map((c) => c.closed));
    let timer: NodeJS.Timeout | null = null;
    const timeout = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        for (const conn of this.connections) conn.destroy();
        resolve();
      }, timeoutMs);
    });
    this.closePromise = Promise.race([all.then(() => undefined), timeout])
      .then(() => Promise.all([...this.connections].map((c) => c.closed)))
      .then(() => listening)
      .finally(() => {
        if (timer !== null) clearTimeout(timer);
      });
    return this.closePromise;
  }
}

/**
 * Creates an NBD server over blkfilter devices (fixed newstyle handshake, structured replies,
 * block status with `base:allocation` and `qemu:dirty-bitmap:<name>`, TLS when configured).
 * Exports are read-only unless `writable: true`. Throws for a bad configuration; call
 * `listen()` to start serving.
 */
export function createNbdServer(options: NbdServerOptions = {}): NbdServer {
  return new NbdServer(options);
}
