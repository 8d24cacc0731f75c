import type net from 'node:net';
import { blkdevBlockStatus, type BlockDev, type BlockStatusExtent } from '@blkfilter/bio';
import type { BufferBudget } from './budget.js';
import { getPayloadBuffer, putPayloadBuffer } from './buffer-pool.js';
import { NbdCmdFlag, NbdReplyFlag, NbdReplyType, nbdCmdName, nbdErrnoName } from './protocol.js';
import { writeU64 } from './reader.js';
import type { CtxOwner, RequestCtx } from './request-ctx.js';
import { encodeSimpleReply, encodeStructuredReply } from './wire.js';

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
/** Longest error message sent in an error chunk. */
const MAX_ERROR_MESSAGE = 1024;

const EMPTY = Buffer.alloc(0);

/** What the reply writer needs of its connection, beyond handing contexts back. */
export interface ReplyHost extends CtxOwner {
  /** Gives back a request's payload buffer early (its bytes were copied into a batch). */
  dropBuffer(ctx: RequestCtx): void;
  /** A message for the operator's debug log. */
  debug(message: string): void;
  /** Requests of the connection taken and not released (answered ones wait in batches). */
  readonly inflight: number;
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

  constructor(writer: ReplyWriter) {
    this.written = () => writer.batchWritten(this);
  }
}

/**
 * The reply side of one connection in transmission: serializes simple and structured replies
 * for request contexts, batching small ones, and hands each context back to its connection
 * once its reply has left the socket (or the connection closed first).
 */
export class ReplyWriter {
  readonly host: ReplyHost;
  socket: net.Socket;
  /** Structured replies were negotiated. */
  structured = false;
  /** Structured replies and a backend with an allocation map: large READs may send holes. */
  sparseReads = false;
  device: BlockDev | null = null;
  /** The connection is closed: nothing more is written, contexts go straight back. */
  closed = false;
  /** Replies not written yet (see {@link ReplyBatch}), and free batches. */
  private batch: ReplyBatch | null = null;
  private readonly freeBatches: ReplyBatch[] = [];
  private flushScheduled = false;
  private readonly onFlush = (): void => {
    this.flushScheduled = false;
    this.flushBatch();
  };
  private microScheduled = false;
  /**
   * When every request in flight is answered in the batch, nothing else is coming that could
   * share its write: it goes at the end of the current callback instead of the next turn's
   * setImmediate (an event-loop iteration saved on every request at QD1).
   */
  private readonly onMicroFlush = (): void => {
    this.microScheduled = false;
    const b = this.batch;
    if (b !== null && b.ctxs.length === this.host.inflight) this.flushBatch();
  };

  /** The server-wide budget that batch buffers count against. */
  readonly budget: BufferBudget;

  constructor(host: ReplyHost, socket: net.Socket, budget: BufferBudget) {
    this.host = host;
    this.socket = socket;
    this.budget = budget;
  }

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
      this.budget.take(BATCH_BYTES);
      this.batch = b;
      if (!this.flushScheduled) {
        this.flushScheduled = true;
        setImmediate(this.onFlush);
      }
    }
    b.ctxs.push(ctx);
    if (b.ctxs.length === this.host.inflight && !this.microScheduled) {
      this.microScheduled = true;
      queueMicrotask(this.onMicroFlush);
    }
    return b;
  }

  /** Writes the current batch, if any. */
  flushBatch(): void {
    const b = this.batch;
    if (b === null) return;
    this.batch = null;
    if (this.closed) {
      this.batchWritten(b);
      return;
    }
    const s = this.socket;
    if (s.writableLength > 0 && b.pos <= BATCH_BYTES / 4) {
      // The client is not keeping up, so this batch will wait in the socket: hold it in a
      // buffer its size rather than 256 KiB (a stalled client then costs what it was sent).
      const small = getPayloadBuffer(b.pos);
      b.buf.copy(small, 0, 0, b.pos);
      putPayloadBuffer(b.buf);
      this.budget.give(BATCH_BYTES - small.length);
      b.buf = small;
    }
    s.write(b.pos === b.buf.length ? b.buf : b.buf.subarray(0, b.pos), b.written);
  }

  /** A batch left the socket (or could not): its requests are done. */
  batchWritten(b: ReplyBatch): void {
    const ctxs = b.ctxs;
    const n = ctxs.length;
    this.budget.give(b.buf.length);
    putPayloadBuffer(b.buf);
    b.buf = EMPTY;
    b.pos = 0;
    for (let i = 0; i < n; i++) this.host.release(ctxs[i] as RequestCtx);
    ctxs.length = 0;
    if (this.freeBatches.length < BATCH_POOL_MAX) this.freeBatches.push(b);
  }

  /** A simple reply with `errno` (0: success, no data). */
  simple(ctx: RequestCtx, errno: number): void {
    if (this.closed) {
      this.host.release(ctx);
      return;
    }
    this.host.dropBuffer(ctx);
    const b = this.batchFor(ctx, 16);
    encodeSimpleReply(b.buf, b.pos, errno, ctx.cookieHi, ctx.cookieLo);
    b.pos += 16;
  }

  /** A structured NONE chunk flagged DONE (a zero-length READ). */
  none(ctx: RequestCtx): void {
    const b = this.batchFor(ctx, 20);
    encodeStructuredReply(b.buf, b.pos, NbdReplyFlag.DONE, NbdReplyType.NONE, ctx.cookieHi, ctx.cookieLo, 0);
    b.pos += 20;
  }

  /** The reply to a READ whose data is in `ctx.buf` from `ctx.dataOff`. */
  read(ctx: RequestCtx): void {
    const len = ctx.length;
    if (this.sparseReads && len >= SPARSE_READ_MIN && (ctx.cmdFlags & NbdCmdFlag.DF) === 0 && !ctx.unaligned && this.sparseRead(ctx)) return;
    const buf = ctx.buf as Buffer;
    const off = ctx.dataOff;
    const structured = this.structured;
    const hlen = structured ? 28 : 16;
    if (len + hlen <= BATCH_COPY_MAX) {
      const b = this.batchFor(ctx, len + hlen);
      const out = b.buf;
      const pos = b.pos;
      if (structured) {
        encodeStructuredReply(out, pos, NbdReplyFlag.DONE, NbdReplyType.OFFSET_DATA, ctx.cookieHi, ctx.cookieLo, len + 8);
        writeU64(out, ctx.offset, pos + 20);
      } else {
        encodeSimpleReply(out, pos, 0, ctx.cookieHi, ctx.cookieLo);
      }
      buf.copy(out, pos + hlen, off, off + len);
      b.pos = pos + hlen + len;
      this.host.dropBuffer(ctx);
      return;
    }
    const data = off === 0 && len === buf.length ? buf : buf.subarray(off, off + len);
    const h = ctx.hdr;
    const s = this.socket;
    s.cork();
    if (structured) {
      encodeStructuredReply(h, 0, NbdReplyFlag.DONE, NbdReplyType.OFFSET_DATA, ctx.cookieHi, ctx.cookieLo, len + 8);
      writeU64(h, ctx.offset, 20);
      s.write(ctx.hdr28);
    } else {
      encodeSimpleReply(h, 0, 0, ctx.cookieHi, ctx.cookieLo);
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
  private sparseRead(ctx: RequestCtx): boolean {
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
      const last = i === n - 1;
      const flags = last ? NbdReplyFlag.DONE : 0;
      if (e.hole) {
        encodeStructuredReply(h, 0, flags, NbdReplyType.OFFSET_HOLE, ctx.cookieHi, ctx.cookieLo, 12);
        writeU64(h, ctx.offset + pos, 20);
        h.writeUInt32BE(e.length, 28);
        if (last) s.write(h, ctx.flushed);
        else s.write(h);
      } else {
        encodeStructuredReply(h, 0, flags, NbdReplyType.OFFSET_DATA, ctx.cookieHi, ctx.cookieLo, e.length + 8);
        writeU64(h, ctx.offset + pos, 20);
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

  /** An error reply: a simple one, or an ERROR chunk with `message` when structured. */
  error(ctx: RequestCtx, errno: number, message: string): void {
    if (this.closed) {
      this.host.release(ctx);
      return;
    }
    this.host.debug(`${nbdCmdName(ctx.type)} at ${ctx.offset} + ${ctx.length}: ${nbdErrnoName(errno)}: ${message}`);
    if (!this.structured) {
      this.simple(ctx, errno);
      return;
    }
    let msg = Buffer.from(message, 'utf8');
    if (msg.length > MAX_ERROR_MESSAGE) msg = msg.subarray(0, MAX_ERROR_MESSAGE);
    this.host.dropBuffer(ctx);
    const b = this.batchFor(ctx, 26 + msg.length);
    const out = b.buf;
    const pos = b.pos;
    encodeStructuredReply(out, pos, NbdReplyFlag.DONE, NbdReplyType.ERROR, ctx.cookieHi, ctx.cookieLo, 6 + msg.length);
    out.writeUInt32BE(errno, pos + 20);
    out.writeUInt16BE(msg.length, pos + 24);
    msg.copy(out, pos + 26);
    b.pos = pos + 26 + msg.length;
  }

  /**
   * The reply to BLOCK_STATUS: one chunk per context (`ids[i]`, flat `[length, flags, ...]`
   * pairs in `extents[i]`), the last flagged DONE.
   */
  blockStatus(ctx: RequestCtx, ids: readonly number[], extents: readonly number[][]): void {
    if (this.closed) {
      this.host.release(ctx);
      return;
    }
    let total = 0;
    for (const e of extents) total += 24 + 4 * e.length;
    const out = Buffer.allocUnsafe(total);
    let pos = 0;
    for (let i = 0; i < ids.length; i++) {
      const e = extents[i] as number[];
      encodeStructuredReply(out, pos, i === ids.length - 1 ? NbdReplyFlag.DONE : 0, NbdReplyType.BLOCK_STATUS, ctx.cookieHi, ctx.cookieLo, 4 + 4 * e.length);
      out.writeUInt32BE(ids[i] as number, pos + 20);
      pos += 24;
      for (let j = 0; j < e.length; j++) {
        out.writeUInt32BE(e[j] as number, pos);
        pos += 4;
      }
    }
    this.socket.write(out, ctx.flushed);
  }
}
