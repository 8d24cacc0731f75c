import type net from 'node:net';
import type tls from 'node:tls';
import type { Bio } from '@blkfilter/bio';
import type { BudgetWaiter } from './budget.js';
import { forgetPayloadBuffer, getPayloadBuffer, payloadBufferBytes, putPayloadBuffer } from './buffer-pool.js';
import { adoptSocket, type DirectReadSink } from './direct-read.js';
import type { ExportEntry, MetaContext } from './exports.js';
import { Handshake, type HandshakeHost } from './handshake.js';
import { NBD_MAX_PAYLOAD, NBD_REQUEST_MAGIC, NbdCmd, NbdErrno } from './protocol.js';
import { ByteReader } from './reader.js';
import { ReplyWriter } from './reply.js';
import { RequestCtx } from './request-ctx.js';
import type { ConnectionHandle, ServerCore } from './server-options.js';
import { Transmission, type TransmissionHost } from './transmission.js';
import { RequestParser, type RequestHeader, type RequestSink } from './wire.js';

/** A closing connection whose peer does not hang up is destroyed after this long. */
const LINGER_MS = 5_000;
/** Free request contexts kept per connection. */
const CTX_POOL_MAX = 256;
/** Bytes a direct-read connection reads at once outside payloads (Node reads 64 KiB too). */
const READ_BUFFER_SIZE = 64 * 1024;
/**
 * Payload left, in bytes, from which the rest of a WRITE is read straight into its buffer.
 * Below it, the payload and the requests after it come in one read and the copy is cheaper
 * than a read more.
 */
const DIRECT_MIN = 32 * 1024;

const PH_HANDSHAKE = 0;
const PH_TRANSMISSION = 1;
const PH_CLOSING = 2;
const PH_CLOSED = 3;

/**
 * One client connection (nbdkit's connections.c): reads the socket, hands the bytes to the
 * handshake and then to the request parser, holds the limits on what is in flight (it stops
 * reading past them), and closes in order: stop reading, answer what is in flight, hang up.
 */
export class ServerConnection implements ConnectionHandle, HandshakeHost, TransmissionHost, RequestSink, BudgetWaiter, DirectReadSink {
  readonly core: ServerCore;
  socket: net.Socket;
  readonly peer: string;
  readonly reader = new ByteReader(16 * 1024);
  phase = PH_HANDSHAKE;
  readonly handshake: Handshake;
  readonly parser = new RequestParser();
  readonly writer: ReplyWriter;
  /** Set once an export is chosen. */
  tx: Transmission | null = null;
  /** The WRITE whose payload is arriving, or null (payload bytes of a refused WRITE are dropped). */
  payloadCtx: RequestCtx | null = null;
  inflight = 0;
  inflightBytes = 0;
  paused = false;
  consuming = false;
  readonly freeCtx: RequestCtx[] = [];
  lingerTimer: NodeJS.Timeout | null = null;
  closeReason = '';
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;
  /** Where reads land when the socket is in user-buffer mode (`direct`), else null. */
  readonly readBuf: Buffer | null;
  /**
   * The view of a WRITE's buffer the socket reads into next, or null. The buffer stays out of
   * the pool while the socket holds it: see {@link ServerConnection.dropPayload}.
   */
  directTarget: Uint8Array | null = null;
  readonly onData = (chunk: Buffer): void => this.handleData(chunk, chunk.length);
  readonly onError = (err: Error): void => this.debug(`socket error: ${err.message}`);
  readonly onClose = (): void => this.handleClose();

  /**
   * Serves `socket`. With `direct`, the socket must come from a server with `pauseOnConnect`:
   * it is moved to user-buffer mode ({@link adoptSocket}), or resumed if it cannot be.
   */
  constructor(core: ServerCore, socket: net.Socket, direct = false) {
    this.core = core;
    this.readBuf = direct ? Buffer.allocUnsafe(READ_BUFFER_SIZE) : null;
    if (direct) {
      const adopted = adoptSocket(socket, this);
      if (adopted !== null) {
        socket = adopted;
      } else {
        this.readBuf = null;
        socket.resume();
      }
    }
    this.socket = socket;
    this.peer = socket.remoteAddress !== undefined ? `${socket.remoteAddress}:${socket.remotePort ?? ''}` : 'unix';
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    this.handshake = new Handshake(this, core);
    this.writer = new ReplyWriter(this, socket, core.budget);
    if (typeof socket.setNoDelay === 'function' && socket.remoteAddress !== undefined) socket.setNoDelay(true);
    if (this.readBuf === null) socket.on('data', this.onData);
    socket.on('error', this.onError);
    socket.on('close', this.onClose);
    this.handshake.greet();
  }

  debug(message: string): void {
    this.core.log?.('debug', `nbd ${this.peer}: ${message}`);
  }

  warn(message: string): void {
    this.core.log?.('warn', `nbd ${this.peer}: ${message}`);
  }

  get stopped(): boolean {
    return this.phase >= PH_CLOSING;
  }

  // --- input ---------------------------------------------------------------------------------

  private handleData(chunk: Buffer, n: number): void {
    try {
      this.handleDataUnsafe(chunk, n);
    } catch (err) {
      // A bug must cost this connection, never the server.
      this.internalError(err);
    }
  }

  internalError(err: unknown): void {
    this.core.log?.('warn', `nbd ${this.peer}: internal error, dropping the connection: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    this.consuming = false;
    this.socket.destroy();
  }

  /** Parses the first `n` bytes of `chunk` (a socket chunk, or the read buffer in direct mode). */
  private handleDataUnsafe(chunk: Buffer, n: number): void {
    if (this.phase >= PH_CLOSING) return;
    const r = this.reader;
    if (r.length === 0) {
      const used = this.consume(chunk, 0, n);
      if (used < n && this.phase < PH_CLOSING) r.push(chunk.subarray(used, n));
    } else {
      r.push(n === chunk.length ? chunk : chunk.subarray(0, n));
      this.consumeReader();
    }
  }

  // --- direct reads (user-buffer mode) -----------------------------------------------------------

  nextReadBuffer(): Uint8Array {
    const ctx = this.payloadCtx;
    const left = this.parser.payloadLeft;
    // The reader is empty whenever a payload is in progress (the parser takes every byte it
    // has as payload); checked anyway, so that bytes can never arrive out of order.
    if (ctx !== null && left >= DIRECT_MIN && this.reader.length === 0 && this.phase === PH_TRANSMISSION) {
      const pos = ctx.payloadPos;
      const target = (ctx.buf as Buffer).subarray(pos, pos + left);
      this.directTarget = target;
      return target;
    }
    this.directTarget = null;
    return this.readBuf as Buffer;
  }

  readDone(n: number, buf: Uint8Array): void {
    if (buf !== this.directTarget) {
      this.handleData(this.readBuf as Buffer, n);
      return;
    }
    this.directTarget = null;
    // A payload dropped while this read was pending (the connection is closing): its bytes
    // landed in a buffer nobody uses any more.
    const ctx = this.payloadCtx;
    if (ctx === null || this.phase !== PH_TRANSMISSION) return;
    this.core.directPayloadBytes += n;
    ctx.payloadPos += n;
    if (this.parser.payloadArrived(n) > 0) return;
    try {
      this.payloadDone(ctx);
    } catch (err) {
      this.internalError(err);
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
      // The handshake may end inside this chunk: the requests after it are parsed at once.
      if (this.phase === PH_HANDSHAKE) pos = this.handshake.consume(src, pos, end);
      if (this.phase === PH_TRANSMISSION) pos = this.parser.parse(src, pos, end, this);
      return this.phase >= PH_CLOSING ? end : pos;
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
    // The buffered header (if any) is asked about again by requestReady: it may pause again.
    this.paused = false;
    this.consumeReader();
    if (!this.paused && this.phase === PH_TRANSMISSION) this.socket.resume();
  }

  // --- handshake host ------------------------------------------------------------------------

  swapSocket(secure: tls.TLSSocket): void {
    const raw = this.socket;
    raw.removeListener('data', this.onData);
    raw.removeListener('close', this.onClose);
    this.reader.clear();
    this.socket = secure;
    this.writer.socket = secure;
    secure.on('data', this.onData);
    secure.on('close', this.onClose);
  }

  /** The export this connection serves, once past the handshake; else null. */
  get exportName(): string | null {
    return this.tx === null ? null : this.tx.exp.name;
  }

  enterTransmission(exp: ExportEntry, structured: boolean, metaContexts: readonly MetaContext[]): void {
    this.tx = new Transmission(this, this.writer, exp, structured, metaContexts);
    this.phase = PH_TRANSMISSION;
    this.debug(`serving export ${JSON.stringify(exp.name)} (${structured ? 'structured' : 'simple'} replies)`);
  }

  // --- requests ------------------------------------------------------------------------------

  requestReady(h: RequestHeader): boolean {
    if (this.phase !== PH_TRANSMISSION) return false;
    if (this.inflight >= this.core.maxRequests || this.inflightBytes >= this.core.maxBytes) {
      this.pauseReading();
      return false;
    }
    const cost = this.requestBytes(h);
    if (cost > 0 && !this.core.budget.fits(cost, this.inflight === 0)) {
      this.pauseReading();
      this.core.budget.wait(this);
      return false;
    }
    return true;
  }

  /**
   * The payload bytes request `h` will hold (its pool size class): a WRITE's data, a READ's or
   * CACHE's covering blocks. 0 for what holds none, or what is refused before taking any.
   */
  private requestBytes(h: RequestHeader): number {
    const type = h.type;
    const len = h.length;
    if (len === 0 || len > NBD_MAX_PAYLOAD) return 0;
    if (type === NbdCmd.WRITE) return payloadBufferBytes(len);
    if (type !== NbdCmd.READ && type !== NbdCmd.CACHE) return 0;
    // Unaligned: the covering blocks, up to one block more on each side.
    const lbs = (this.tx as Transmission).lbs;
    return payloadBufferBytes(h.offset % lbs === 0 && len % lbs === 0 ? len : len + 2 * lbs);
  }

  budgetWake(): void {
    if (this.phase === PH_TRANSMISSION) this.maybeResume();
  }

  request(h: RequestHeader): number {
    if (h.magic !== NBD_REQUEST_MAGIC) {
      this.fail(`bad request magic 0x${h.magic.toString(16)}: expected 0x${NBD_REQUEST_MAGIC.toString(16)}`);
      return 0;
    }
    const type = h.type;
    if (type === NbdCmd.DISC) {
      this.beginClose('client sent NBD_CMD_DISC');
      return 0;
    }
    const tx = this.tx as Transmission;
    const ctx = this.getCtx();
    ctx.type = type;
    ctx.cmdFlags = h.flags;
    ctx.cookieHi = h.cookieHi;
    ctx.cookieLo = h.cookieLo;
    ctx.offHi = h.offHi;
    ctx.offset = h.offset;
    const length = h.length;
    ctx.length = length;
    ctx.unaligned = false;
    ctx.dataOff = 0;
    ctx.startTime = tx.stats !== null ? performance.now() : -1;
    if (type === NbdCmd.WRITE) {
      if (length > NBD_MAX_PAYLOAD) {
        // The payload cannot be taken; the stream is lost after this request.
        this.writer.error(ctx, NbdErrno.EINVAL, `WRITE of ${length} bytes is over the ${NBD_MAX_PAYLOAD}-byte maximum payload`);
        this.fail(`WRITE of ${length} bytes is over the maximum payload`);
        return 0;
      }
      const err = tx.check(ctx);
      if (err !== 0) {
        // Answered now; the payload is read and dropped.
        this.writer.error(ctx, err, tx.checkMessage);
        return length;
      }
      if (length === 0) {
        this.writer.simple(ctx, 0);
        return 0;
      }
      this.attachBuffer(ctx, length);
      ctx.payloadPos = 0;
      this.payloadCtx = ctx;
      return length;
    }
    const err = tx.check(ctx);
    if (err !== 0) this.writer.error(ctx, err, tx.checkMessage);
    else tx.execute(ctx);
    return 0;
  }

  requestPayload(src: Buffer, pos: number, n: number, last: boolean): void {
    const ctx = this.payloadCtx;
    if (ctx === null) return;
    src.copy(ctx.buf as Buffer, ctx.payloadPos, pos, pos + n);
    ctx.payloadPos += n;
    if (last) this.payloadDone(ctx);
  }

  /** The last byte of the payload of `ctx` arrived: the WRITE runs (or goes, when closing). */
  private payloadDone(ctx: RequestCtx): void {
    this.payloadCtx = null;
    if (this.phase !== PH_TRANSMISSION) this.release(ctx);
    else (this.tx as Transmission).write(ctx);
  }

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
      this.core.budget.give(buf.length);
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

  attachBuffer(ctx: RequestCtx, size: number): Buffer {
    const buf = getPayloadBuffer(size);
    ctx.buf = buf;
    this.inflightBytes += buf.length;
    this.core.budget.take(buf.length);
    return buf;
  }

  dropBuffer(ctx: RequestCtx): void {
    const buf = ctx.buf;
    if (buf !== null) {
      ctx.buf = null;
      this.inflightBytes -= buf.length;
      this.core.budget.give(buf.length);
      putPayloadBuffer(buf);
    }
  }

  ioDone(ctx: RequestCtx, bio: Bio): void {
    try {
      (this.tx as Transmission).complete(ctx, bio);
    } catch (err) {
      this.internalError(err);
    }
  }

  // --- closing -------------------------------------------------------------------------------

  /** A protocol violation: stop reading, finish what is in flight, hang up. */
  fail(reason: string): void {
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
    this.dropPayload();
    if (this.inflight === 0) this.finishClose();
  }

  /** A WRITE whose payload will not arrive now: its context goes back. */
  private dropPayload(): void {
    this.parser.reset();
    const pending = this.payloadCtx;
    if (pending === null) return;
    this.payloadCtx = null;
    const target = this.directTarget;
    const buf = pending.buf;
    if (target !== null && buf !== null && target.buffer === buf.buffer) {
      // The socket still reads into this buffer: it must not go back to the pool, where another
      // request could get it. It is left to the garbage collector once the socket lets go.
      pending.buf = null;
      this.inflightBytes -= buf.length;
      this.core.budget.give(buf.length);
      forgetPayloadBuffer(buf);
    }
    this.release(pending);
  }

  private finishClose(): void {
    if (this.lingerTimer !== null || this.phase === PH_CLOSED) return;
    this.socket.end();
    // Read and drop whatever the peer still sends, so its close is seen at once; a paused
    // socket with unread data would only go at the linger timeout.
    this.socket.resume();
    this.lingerTimer = setTimeout(() => {
      this.debug(`peer did not hang up within ${LINGER_MS} ms: destroying the socket`);
      this.socket.destroy();
    }, LINGER_MS);
    this.lingerTimer.unref();
  }

  /** Hangs up at once (server close timeout). */
  destroy(): void {
    this.socket.destroy();
  }

  private handleClose(): void {
    if (this.phase === PH_CLOSED) return;
    this.phase = PH_CLOSED;
    this.writer.closed = true;
    if (this.lingerTimer !== null) clearTimeout(this.lingerTimer);
    this.lingerTimer = null;
    this.reader.clear();
    this.dropPayload();
    this.core.budget.forget(this);
    this.core.connectionClosed(this);
    this.resolveClosed();
  }
}
