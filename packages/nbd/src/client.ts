import net from 'node:net';
import {
  BlkError,
  BlkStatus,
  InvalidArgumentError,
  ReqFlag,
  ReqOp,
  SECTOR_SIZE,
  type BackendCapabilities,
  type Bio,
  type BioVec,
  type BlockBackend,
  type CompletionSink,
  copyToBioVecs,
  zeroBioVecs,
} from '@blkfilter/bio';
import { negotiate, type NbdBlockSizes, type Negotiated } from './client-handshake.js';
import { ClientIo, R_DATA, R_HEADER, Slot, TRIM_ZERO_MAX, statusForErrno } from './client-request.js';
import { NbdConnectionError, NbdProtocolError, NbdRequestError } from './errors.js';
import {
  NBD_DEFAULT_PORT,
  NBD_MAX_PAYLOAD,
  NBD_MAX_STRING,
  NBD_REQUEST_SIZE,
  NbdCmd,
  NbdCmdFlag,
  NbdErrno,
  NbdReplyFlag,
  NbdReplyType,
  NbdTransmissionFlag,
  nbdCmdName,
  nbdErrnoName,
} from './protocol.js';
import { ByteReader, readU64 } from './reader.js';
import { ReplyHeader, decodeReply, encodeRequest } from './wire.js';

export type { NbdBlockSizes } from './client-handshake.js';

/** Where and what {@link NbdClientBackend.connect} connects to. */
export interface NbdClientOptions {
  /** TCP host (default `127.0.0.1`). */
  readonly host?: string;
  /** TCP port (default 10809). */
  readonly port?: number;
  /** A unix socket path instead of TCP. */
  readonly path?: string;
  /** The export to use (default `""`, the server's default export). */
  readonly exportName?: string;
  /** Give up connecting and negotiating after this long (default 10 s). */
  readonly connectTimeoutMs?: number;
}

// --- transmission ----------------------------------------------------------------------------

/**
 * A block backend on an NBD server: `createDisk({ name, backend: await NbdClientBackend.connect(...) })`
 * puts a device on any NBD server (qemu-nbd, nbdkit, ours). Negotiates fixed newstyle, structured
 * replies and `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`; maps READ, WRITE, FLUSH, DISCARD (TRIM)
 * and WRITE_ZEROES bios to pipelined requests, FUA included. Every bio completes exactly once;
 * when the server goes away, bios in flight complete with IOERR and an {@link NbdConnectionError},
 * and later ones fail at once.
 */
export class NbdClientBackend implements BlockBackend {
  readonly description: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly minIoSize: number;
  readonly capabilities: BackendCapabilities;
  /** The export's transmission flags (`NbdTransmissionFlag`). */
  readonly transmissionFlags: number;
  /** Size constraints the server advertised. */
  readonly blockSizes: NbdBlockSizes;
  /** True when the server agreed to structured replies. */
  readonly structuredReplies: boolean;
  private readonly socket: net.Socket;
  private readonly reader = new ByteReader(64 * 1024);
  private readonly replyHeader = new ReplyHeader();
  private readonly slots: Slot[] = [];
  private readonly freeSlots: Slot[] = [];
  private readonly freeIos: ClientIo[] = [];
  private readonly maxPayload: number;
  private inflight = 0;
  private dead: BlkError | null = null;
  private closing: Promise<void> | null = null;
  private readonly closedPromise: Promise<void>;
  private state = R_HEADER;
  private dataSlot: Slot | null = null;
  private dataLeft = 0;
  private dataPos = 0;
  private dataChunkDone = false;
  private drainWaiter: (() => void) | null = null;

  private constructor(n: Negotiated, description: string) {
    this.socket = n.socket;
    this.description = description;
    this.sizeBytes = n.size;
    this.transmissionFlags = n.flags;
    this.readOnly = (n.flags & NbdTransmissionFlag.READ_ONLY) !== 0;
    this.blockSizes = n.blockSizes;
    this.structuredReplies = n.structured;
    this.minIoSize = n.blockSizes.minimum > SECTOR_SIZE ? n.blockSizes.minimum : SECTOR_SIZE;
    const max = n.blockSizes.maximum;
    this.maxPayload = Math.max(this.minIoSize, Math.min(NBD_MAX_PAYLOAD, max - (max % this.minIoSize)));
    this.capabilities = Object.freeze({
      writeCache: (n.flags & NbdTransmissionFlag.SEND_FLUSH) !== 0,
      discard: (n.flags & NbdTransmissionFlag.SEND_TRIM) !== 0,
      writeZeroes: (n.flags & NbdTransmissionFlag.SEND_WRITE_ZEROES) !== 0,
    });
    const socket = this.socket;
    this.closedPromise = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err: NodeJS.ErrnoException) => {
      this.die(new NbdConnectionError(err.code ?? 'ENOTCONN', `connection to NBD server ${this.description} failed: ${err.message}`, { cause: err }));
    });
    socket.on('close', () => {
      this.die(new NbdConnectionError('ECONNRESET', `NBD server ${this.description} closed the connection`));
    });
    if (n.leftover !== null) this.onData(n.leftover);
  }

  /**
   * Connects to an NBD server over TCP or a unix socket and negotiates the export. Throws
   * {@link NbdConnectionError} (cannot connect, timeout), {@link NbdExportNotFoundError},
   * {@link NbdOptionError} or {@link NbdProtocolError}; an export whose minimum block size is
   * over 4096 is refused with `InvalidArgumentError`.
   */
  static async connect(options: NbdClientOptions = {}): Promise<NbdClientBackend> {
    const exportName = options.exportName ?? '';
    if (Buffer.byteLength(exportName, 'utf8') > NBD_MAX_STRING) {
      throw new InvalidArgumentError(`NBD export name is over ${NBD_MAX_STRING} bytes`);
    }
    const where =
      options.path !== undefined
        ? `nbd+unix:///${exportName}?socket=${options.path}`
        : `nbd://${options.host ?? '127.0.0.1'}:${options.port ?? NBD_DEFAULT_PORT}/${exportName}`;
    const timeoutMs = options.connectTimeoutMs ?? 10_000;
    const socket =
      options.path !== undefined ? net.connect({ path: options.path }) : net.connect({ host: options.host ?? '127.0.0.1', port: options.port ?? NBD_DEFAULT_PORT });
    const timer = setTimeout(() => {
      socket.destroy(new NbdConnectionError('ETIMEDOUT', `connecting to NBD server ${where} timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    try {
      await new Promise<void>((resolve, reject) => {
        const onError = (err: NodeJS.ErrnoException): void => {
          reject(
            BlkError.isInstance(err)
              ? err
              : new NbdConnectionError(err.code ?? 'ENOTCONN', `cannot connect to NBD server ${where}: ${err.message}`, { cause: err }),
          );
        };
        socket.once('error', onError);
        socket.once('connect', () => {
          socket.removeListener('error', onError);
          resolve();
        });
      });
      if (options.path === undefined) socket.setNoDelay(true);
      return await NbdClientBackend.negotiateOn(socket, exportName, where);
    } catch (err) {
      socket.destroy();
      if (BlkError.isInstance(err)) throw err;
      throw new NbdConnectionError('ENOTCONN', `NBD negotiation with ${where} failed: ${String(err)}`, { cause: err });
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Negotiates `exportName` over an already-connected socket (a unix socket pair, a socket
   * you wrapped yourself) and returns the backend that owns it from then on. Throws like
   * {@link NbdClientBackend.connect}; the socket is destroyed on failure.
   */
  static async fromSocket(socket: net.Socket, options: { exportName?: string; description?: string } = {}): Promise<NbdClientBackend> {
    const exportName = options.exportName ?? '';
    try {
      return await NbdClientBackend.negotiateOn(socket, exportName, options.description ?? `nbd socket/${exportName}`);
    } catch (err) {
      socket.destroy();
      throw err;
    }
  }

  private static async negotiateOn(socket: net.Socket, exportName: string, where: string): Promise<NbdClientBackend> {
    const n = await negotiate(socket, exportName);
    if (n.blockSizes.minimum > 4096) {
      throw new InvalidArgumentError(`NBD export ${where} needs ${n.blockSizes.minimum}-byte alignment; blkfilter devices support 512 or 4096`);
    }
    return new NbdClientBackend(n, where);
  }

  /** True until the connection is lost or closed. */
  get connected(): boolean {
    return this.dead === null;
  }

  /** NBD requests sent and not answered. */
  get inFlight(): number {
    return this.inflight;
  }

  // --- submission ----------------------------------------------------------------------------

  queueBio(bio: Bio, sink: CompletionSink): void {
    if (this.dead !== null) {
      if (bio.error === null) bio.error = this.dead;
      sink.complete(bio, BlkStatus.IOERR);
      return;
    }
    const io = this.freeIos.pop() ?? new ClientIo();
    io.bio = bio;
    io.sink = sink;
    io.outstanding = 0;
    io.status = BlkStatus.OK;
    io.error = null;
    const op = bio.op;
    if (op === ReqOp.FLUSH) {
      io.stage = 2;
      this.sendFlush(io);
      return;
    }
    if ((bio.flags & ReqFlag.PREFLUSH) !== 0 && this.capabilities.writeCache) {
      io.stage = 0;
      this.sendFlush(io);
      return;
    }
    io.stage = 1;
    this.sendMain(io);
  }

  private sendFlush(io: ClientIo): void {
    const slot = this.getSlot(io, NbdCmd.FLUSH, 0, 0, 0);
    io.outstanding++;
    this.writeHeader(slot, 0);
  }

  private sendMain(io: ClientIo): void {
    const bio = io.bio as Bio;
    const op = bio.op;
    const base = bio.sector * SECTOR_SIZE;
    const size = bio.size;
    let cmd: number;
    let max: number;
    let flags = 0;
    switch (op) {
      case ReqOp.READ:
        cmd = NbdCmd.READ;
        max = this.maxPayload;
        break;
      case ReqOp.WRITE:
        cmd = NbdCmd.WRITE;
        max = this.maxPayload;
        break;
      case ReqOp.DISCARD:
        cmd = NbdCmd.TRIM;
        max = TRIM_ZERO_MAX;
        break;
      case ReqOp.WRITE_ZEROES:
        cmd = NbdCmd.WRITE_ZEROES;
        max = TRIM_ZERO_MAX;
        if ((bio.flags & ReqFlag.NOUNMAP) !== 0) flags |= NbdCmdFlag.NO_HOLE;
        break;
      default:
        this.finish(io, BlkStatus.NOTSUPP, null);
        return;
    }
    const fuaWanted = (bio.flags & ReqFlag.FUA) !== 0 && op !== ReqOp.READ;
    if (fuaWanted && (this.transmissionFlags & NbdTransmissionFlag.SEND_FUA) !== 0) flags |= NbdCmdFlag.FUA;
    if (size === 0) {
      this.finish(io, BlkStatus.OK, null);
      return;
    }
    const vecs = bio.vecs;
    const socket = this.socket;
    let pos = 0;
    // Count every part before sending any, so a reply arriving early cannot complete the bio.
    io.outstanding += Math.ceil(size / max);
    socket.cork();
    while (pos < size) {
      const n = Math.min(max, size - pos);
      const slot = this.getSlot(io, cmd, base + pos, n, pos);
      this.writeHeader(slot, flags);
      if (cmd === NbdCmd.WRITE) this.writeData(vecs, pos, n);
      pos += n;
    }
    socket.uncork();
  }

  private writeData(vecs: readonly BioVec[], pos: number, n: number): void {
    let i = 0;
    let p = pos;
    while (i < vecs.length && p >= (vecs[i] as BioVec).length) {
      p -= (vecs[i] as BioVec).length;
      i++;
    }
    while (n > 0 && i < vecs.length) {
      const v = vecs[i] as BioVec;
      const k = Math.min(n, v.length - p);
      const start = v.offset + p;
      this.socket.write(v.buffer.subarray(start, start + k));
      n -= k;
      p = 0;
      i++;
    }
  }

  private getSlot(io: ClientIo, cmd: number, offset: number, length: number, bioPos: number): Slot {
    let slot = this.freeSlots.pop();
    if (slot === undefined) {
      slot = new Slot(this.slots.length);
      this.slots.push(slot);
    }
    slot.gen = (slot.gen + 1) >>> 0;
    slot.io = io;
    slot.cmd = cmd;
    slot.offset = offset;
    slot.length = length;
    slot.bioPos = bioPos;
    slot.errno = 0;
    slot.message = '';
    this.inflight++;
    return slot;
  }

  private writeHeader(slot: Slot, flags: number): void {
    encodeRequest(slot.hdr, 0, flags, slot.cmd, slot.gen, slot.index, slot.offset, slot.length);
    this.socket.write(slot.hdr);
  }

  // --- replies -------------------------------------------------------------------------------

  private onData(chunk: Buffer): void {
    if (this.dead !== null) return;
    const r = this.reader;
    if (r.length === 0) {
      const used = this.consume(chunk, 0, chunk.length);
      if (used < chunk.length && this.dead === null) r.push(chunk.subarray(used));
    } else {
      r.push(chunk);
      const used = this.consume(r.buf, r.start, r.end);
      if (this.dead !== null) r.clear();
      else r.consumeTo(used);
    }
  }

  private consume(src: Buffer, pos: number, end: number): number {
    while (pos < end && this.dead === null) {
      if (this.state === R_DATA) {
        const slot = this.dataSlot as Slot;
        const n = Math.min(this.dataLeft, end - pos);
        const io = slot.io as ClientIo;
        copyToBioVecs((io.bio as Bio).vecs, this.dataPos, src, pos, n);
        pos += n;
        this.dataPos += n;
        this.dataLeft -= n;
        if (this.dataLeft === 0) {
          this.state = R_HEADER;
          this.dataSlot = null;
          if (this.dataChunkDone) this.slotDone(slot);
        }
        continue;
      }
      const h = this.replyHeader;
      const hlen = decodeReply(src, pos, end, h);
      if (hlen === 0) break;
      if (hlen < 0 || (h.structured && !this.structuredReplies)) {
        this.protocolError(`bad reply magic 0x${src.readUInt32BE(pos).toString(16)}`);
        return pos;
      }
      if (!h.structured) {
        const slot = this.lookup(h, src, pos + 8);
        if (slot === null) return pos;
        const errno = h.errno;
        pos += hlen;
        if (errno !== 0) {
          slot.errno = errno;
          slot.message = `${nbdCmdName(slot.cmd)} at ${slot.offset} + ${slot.length} failed on the NBD server: ${nbdErrnoName(errno)}`;
          this.slotDone(slot);
        } else if (slot.cmd === NbdCmd.READ && slot.length > 0) {
          this.startData(slot, slot.bioPos, slot.length, true);
        } else {
          this.slotDone(slot);
        }
        continue;
      }
      const type = h.type;
      const length = h.length;
      const done = (h.flags & NbdReplyFlag.DONE) !== 0;
      if (type === NbdReplyType.OFFSET_DATA) {
        if (end - pos < 28) break;
        const slot = this.lookup(h, src, pos + 8);
        if (slot === null) return pos;
        const offset = readU64(src, pos + 20);
        const n = length - 8;
        if (length < 9 || slot.cmd !== NbdCmd.READ || offset < slot.offset || offset + n > slot.offset + slot.length) {
          this.protocolError(`OFFSET_DATA chunk at ${offset} + ${n} outside the request at ${slot.offset} + ${slot.length}`);
          return pos;
        }
        pos += 28;
        this.startData(slot, slot.bioPos + (offset - slot.offset), n, done);
        continue;
      }
      if (length > 64 * 1024) {
        this.protocolError(`structured reply chunk of type ${type} with ${length} bytes`);
        return pos;
      }
      if (end - pos < 20 + length) break;
      const slot = this.lookup(h, src, pos + 8);
      if (slot === null) return pos;
      const p = pos + 20;
      pos += 20 + length;
      if (type === NbdReplyType.NONE) {
        if (length !== 0) {
          this.protocolError('NONE chunk with a payload');
          return pos;
        }
      } else if (type === NbdReplyType.OFFSET_HOLE) {
        const offset = readU64(src, p);
        const n = src.readUInt32BE(p + 8);
        if (length !== 12 || slot.cmd !== NbdCmd.READ || offset < slot.offset || offset + n > slot.offset + slot.length) {
          this.protocolError(`OFFSET_HOLE chunk at ${offset} + ${n} outside the request at ${slot.offset} + ${slot.length}`);
          return pos;
        }
        zeroBioVecs(((slot.io as ClientIo).bio as Bio).vecs, slot.bioPos + (offset - slot.offset), n);
      } else if ((type & 0x8000) !== 0) {
        if (length < 6) {
          this.protocolError('error chunk shorter than 6 bytes');
          return pos;
        }
        const errno = src.readUInt32BE(p);
        const mlen = Math.min(src.readUInt16BE(p + 4), length - 6);
        if (slot.errno === 0) {
          slot.errno = errno === 0 ? NbdErrno.EINVAL : errno;
          const text = src.toString('utf8', p + 6, p + 6 + mlen);
          slot.message = `${nbdCmdName(slot.cmd)} at ${slot.offset} + ${slot.length} failed on the NBD server: ${nbdErrnoName(slot.errno)}${text ? ` (${text})` : ''}`;
        }
      } else {
        this.protocolError(`unexpected structured reply type ${type} to ${nbdCmdName(slot.cmd)}`);
        return pos;
      }
      if (done) this.slotDone(slot);
    }
    return pos;
  }

  private startData(slot: Slot, bioPos: number, n: number, done: boolean): void {
    this.state = R_DATA;
    this.dataSlot = slot;
    this.dataLeft = n;
    this.dataPos = bioPos;
    this.dataChunkDone = done;
  }

  private lookup(h: ReplyHeader, src: Buffer, pos: number): Slot | null {
    const gen = h.cookieHi;
    const index = h.cookieLo;
    const slot = this.slots[index];
    if (slot === undefined || slot.io === null || slot.gen !== gen) {
      this.protocolError(`reply for cookie 0x${src.toString('hex', pos, pos + 8)}, which names no request in flight`);
      return null;
    }
    return slot;
  }

  private slotDone(slot: Slot): void {
    const io = slot.io as ClientIo;
    slot.io = null;
    this.freeSlots.push(slot);
    if (--this.inflight === 0 && this.drainWaiter !== null) {
      const w = this.drainWaiter;
      this.drainWaiter = null;
      // A stage may send its next request (FLUSH after a write) right after this: look again later.
      queueMicrotask(() => {
        if (this.inflight === 0 || this.dead !== null) w();
        else this.drainWaiter = w;
      });
    }
    if (slot.errno !== 0 && io.status === BlkStatus.OK) {
      io.status = statusForErrno(slot.errno);
      io.error = new NbdRequestError(slot.errno, slot.message);
      if (slot.errno === NbdErrno.ESHUTDOWN) this.shutdownRequested();
    }
    if (--io.outstanding > 0) return;
    this.stageDone(io);
  }

  private stageDone(io: ClientIo): void {
    if (io.status !== BlkStatus.OK || this.dead !== null) {
      this.finish(io, io.status === BlkStatus.OK ? BlkStatus.IOERR : io.status, io.error ?? this.dead);
      return;
    }
    const bio = io.bio as Bio;
    if (io.stage === 0) {
      io.stage = 1;
      this.sendMain(io);
      return;
    }
    if (
      io.stage === 1 &&
      (bio.flags & ReqFlag.FUA) !== 0 &&
      bio.op !== ReqOp.READ &&
      (this.transmissionFlags & NbdTransmissionFlag.SEND_FUA) === 0 &&
      this.capabilities.writeCache
    ) {
      // No FUA on the wire: make the data stable with a FLUSH before completing.
      io.stage = 2;
      this.sendFlush(io);
      return;
    }
    this.finish(io, BlkStatus.OK, null);
  }

  private finish(io: ClientIo, status: BlkStatus, error: BlkError | null): void {
    const bio = io.bio as Bio;
    const sink = io.sink as CompletionSink;
    io.bio = null;
    io.sink = null;
    io.error = null;
    this.freeIos.push(io);
    if (status !== BlkStatus.OK && error !== null && bio.error === null) bio.error = error;
    sink.complete(bio, status);
  }

  private shutdownRequested(): void {
    // NBD_ESHUTDOWN: the server is going away; the spec wants a soft disconnect from us.
    if (this.closing === null) void this.close();
  }

  private protocolError(message: string): void {
    const err = new NbdProtocolError(`NBD server ${this.description} broke the protocol: ${message}`);
    this.die(err);
    this.socket.destroy();
  }

  /** Fails every request in flight and every later bio with `err`. */
  private die(err: BlkError): void {
    if (this.dead !== null) return;
    this.dead = err;
    this.reader.clear();
    this.state = R_HEADER;
    this.dataSlot = null;
    const ios = new Set<ClientIo>();
    for (const slot of this.slots) {
      if (slot.io !== null) {
        ios.add(slot.io);
        slot.io = null;
      }
    }
    this.inflight = 0;
    const w = this.drainWaiter;
    this.drainWaiter = null;
    if (w !== null) w();
    for (const io of ios) {
      if (io.bio !== null) this.finish(io, BlkStatus.IOERR, err);
    }
  }

  /**
   * Waits for requests in flight, sends `NBD_CMD_DISC` and closes the connection. Later bios
   * fail with IOERR. Called by `Disk.remove()` once its bios drained.
   */
  close(): Promise<void> {
    if (this.closing !== null) return this.closing;
    this.closing = (async () => {
      if (this.dead === null) {
        if (this.inflight > 0) {
          await new Promise<void>((resolve) => {
            this.drainWaiter = resolve;
          });
        }
      }
      if (this.dead === null) {
        const disc = Buffer.alloc(NBD_REQUEST_SIZE);
        encodeRequest(disc, 0, 0, NbdCmd.DISC, 0, 0, 0, 0);
        this.dead = new NbdConnectionError('ENOTCONN', `NBD connection to ${this.description} was closed`);
        this.socket.end(disc);
        const t = setTimeout(() => this.socket.destroy(), 2000);
        await this.closedPromise;
        clearTimeout(t);
      } else {
        this.socket.destroy();
        await this.closedPromise;
      }
    })();
    return this.closing;
  }
}
