// One connection of the NBD client: its socket, its reply parser and the requests it carries.
// The backend (client.ts) owns the slots, the bios and the reconnect policy; a connection only
// moves bytes and reports replies and its own loss, through the ConnOwner interface.
import type net from 'node:net';
import { copyToBioVecs, zeroBioVecs, type BioVec, type Bio, type BlkError } from '@blkfilter/bio';
import { R_DATA, R_HEADER, type ClientIo, type Slot, type SlotTable } from './client-request.js';
import { NbdConnectionError, NbdProtocolError } from './errors.js';
import { NbdCmd, NbdErrno, NbdReplyFlag, NbdReplyType, nbdCmdName, nbdErrnoName } from './protocol.js';
import { ByteReader, readU64 } from './reader.js';
import { ReplyHeader, decodeReply, encodeRequest } from './wire.js';

/** The backend, as a connection sees it. */
export interface ConnOwner extends SlotTable {
  /** The connection's socket failed, closed or broke the protocol. Called once per socket. */
  connLost(conn: ClientConn, err: BlkError): void;
}

/** One socket to the server and the parser of its replies. */
export class ClientConn {
  readonly index: number;
  /** The socket, while the connection is up. */
  socket: net.Socket | null = null;
  /** NBD requests sent on this connection and not answered. */
  inflight = 0;
  /** NBD requests sent on this connection since the backend was created (a statistic). */
  sent = 0;
  /** A reconnect of this connection is scheduled or under way. */
  reconnecting = false;
  /** Consecutive failed reconnect attempts (drives the backoff). */
  attempts = 0;
  private readonly owner: ConnOwner;
  private readonly description: string;
  private readonly structured: boolean;
  private readonly reader = new ByteReader(64 * 1024);
  private readonly replyHeader = new ReplyHeader();
  private state = R_HEADER;
  private dataSlot: Slot | null = null;
  private dataLeft = 0;
  private dataPos = 0;
  private dataChunkDone = false;
  /**
   * The socket corked by the first request of the current callback, uncorked from a microtask
   * once the callback returns: the requests one callback submits (an NBD server forwarding a
   * burst it parsed from one read) leave in one writev, not one write syscall each (on a 2-core
   * machine the syscall per request was 23% of a proxy's time), and none waits for the next
   * event-loop turn (a setImmediate added ~20 us to every request at QD1).
   */
  private corked: net.Socket | null = null;
  private readonly onUncork = (): void => {
    const s = this.corked;
    this.corked = null;
    s?.uncork();
  };

  constructor(index: number, owner: ConnOwner, description: string, structured: boolean) {
    this.index = index;
    this.owner = owner;
    this.description = description;
    this.structured = structured;
  }

  get up(): boolean {
    return this.socket !== null;
  }

  /** Takes over a negotiated socket; `leftover` are bytes read past the handshake. */
  attach(socket: net.Socket, leftover: Buffer | null): void {
    this.socket = socket;
    this.inflight = 0;
    this.resetParser();
    // Listeners per socket, not per request; a socket that was dropped is ignored from then on.
    socket.on('data', (chunk: Buffer) => {
      if (this.socket === socket) this.onData(chunk);
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      if (this.socket === socket) {
        this.lost(new NbdConnectionError(err.code ?? 'ENOTCONN', `connection to NBD server ${this.description} failed: ${err.message}`, { cause: err }));
      }
    });
    socket.on('close', () => {
      if (this.socket === socket) this.lost(new NbdConnectionError('ECONNRESET', `NBD server ${this.description} closed the connection`));
    });
    if (leftover !== null) this.onData(leftover);
  }

  /** Forgets the socket (destroying it) without reporting a loss: the owner decided. */
  drop(): net.Socket | null {
    const s = this.socket;
    this.socket = null;
    this.inflight = 0;
    this.resetParser();
    return s;
  }

  private lost(err: BlkError): void {
    const s = this.drop();
    s?.destroy();
    this.owner.connLost(this, err);
  }

  private resetParser(): void {
    this.reader.clear();
    this.state = R_HEADER;
    this.dataSlot = null;
    this.dataLeft = 0;
  }

  /** Sends `slot` (header, then the WRITE payload from `vecs`). */
  send(slot: Slot, vecs: readonly BioVec[] | null): void {
    const socket = this.socket as net.Socket;
    slot.conn = this.index;
    this.inflight++;
    this.sent++;
    encodeRequest(slot.hdr, 0, slot.flags, slot.cmd, slot.gen, slot.index, slot.offset, slot.length);
    // The header and payload stay untouched until written: a slot (and its bio) is not reused
    // before its reply, which comes after the request left.
    if (this.corked !== socket) {
      socket.cork();
      this.corked = socket;
      queueMicrotask(this.onUncork);
    }
    socket.write(slot.hdr);
    if (vecs === null) return;
    let i = 0;
    let p = slot.bioPos;
    let n = slot.length;
    while (i < vecs.length && p >= (vecs[i] as BioVec).length) {
      p -= (vecs[i] as BioVec).length;
      i++;
    }
    while (n > 0 && i < vecs.length) {
      const v = vecs[i] as BioVec;
      const k = Math.min(n, v.length - p);
      const start = v.offset + p;
      socket.write(v.buffer.subarray(start, start + k));
      n -= k;
      p = 0;
      i++;
    }
  }

  // --- replies -------------------------------------------------------------------------------

  private onData(chunk: Buffer): void {
    const r = this.reader;
    const socket = this.socket;
    if (r.length === 0) {
      const used = this.consume(chunk, 0, chunk.length);
      if (used < chunk.length && this.socket === socket) r.push(chunk.subarray(used));
    } else {
      r.push(chunk);
      const used = this.consume(r.buf, r.start, r.end);
      if (this.socket !== socket) r.clear();
      else r.consumeTo(used);
    }
  }

  private done(slot: Slot): void {
    this.inflight--;
    this.owner.slotDone(slot);
  }

  private consume(src: Buffer, pos: number, end: number): number {
    const socket = this.socket;
    while (pos < end && this.socket === socket) {
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
          if (this.dataChunkDone) this.done(slot);
        }
        continue;
      }
      const h = this.replyHeader;
      const hlen = decodeReply(src, pos, end, h);
      if (hlen === 0) break;
      if (hlen < 0 || (h.structured && !this.structured)) {
        this.protocolError(`bad reply magic 0x${src.readUInt32BE(pos).toString(16)}`);
        return pos;
      }
      if (!h.structured) {
        const slot = this.find(h, src, pos + 8);
        if (slot === null) return pos;
        const errno = h.errno;
        pos += hlen;
        if (errno !== 0) {
          slot.errno = errno;
          slot.message = `${nbdCmdName(slot.cmd)} at ${slot.offset} + ${slot.length} failed on the NBD server ${this.description}: ${nbdErrnoName(errno)}`;
          this.done(slot);
        } else if (slot.cmd === NbdCmd.READ && slot.length > 0) {
          this.startData(slot, slot.bioPos, slot.length, true);
        } else {
          this.done(slot);
        }
        continue;
      }
      const type = h.type;
      const length = h.length;
      const done = (h.flags & NbdReplyFlag.DONE) !== 0;
      if (type === NbdReplyType.OFFSET_DATA) {
        if (end - pos < 28) break;
        const slot = this.find(h, src, pos + 8);
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
      const slot = this.find(h, src, pos + 8);
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
          slot.message = `${nbdCmdName(slot.cmd)} at ${slot.offset} + ${slot.length} failed on the NBD server ${this.description}: ${nbdErrnoName(slot.errno)}${text ? ` (${text})` : ''}`;
        }
      } else {
        this.protocolError(`unexpected structured reply type ${type} to ${nbdCmdName(slot.cmd)}`);
        return pos;
      }
      if (done) this.done(slot);
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

  private find(h: ReplyHeader, src: Buffer, pos: number): Slot | null {
    const slot = this.owner.lookup(this.index, h.cookieHi, h.cookieLo);
    if (slot === null) this.protocolError(`reply for cookie 0x${src.toString('hex', pos, pos + 8)}, which names no request in flight`);
    return slot;
  }

  private protocolError(message: string): void {
    this.lost(new NbdProtocolError(`NBD server ${this.description} broke the protocol: ${message}`));
  }
}
