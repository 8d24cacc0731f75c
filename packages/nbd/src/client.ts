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
  type BlockBackend,
  type CompletionSink,
} from '@blkfilter/bio';
import { ClientConn, type ConnOwner } from './client-conn.js';
import { negotiate, type NbdBlockSizes, type NbdClientTlsOptions, type Negotiated } from './client-handshake.js';
import { ClientIo, Slot, TRIM_ZERO_MAX, statusForErrno } from './client-request.js';
import { NbdConnectionError, NbdProtocolError, NbdRequestError } from './errors.js';
import { NBD_DEFAULT_PORT, NBD_MAX_PAYLOAD, NBD_MAX_STRING, NBD_REQUEST_SIZE, NbdCmd, NbdCmdFlag, NbdErrno, NbdTransmissionFlag } from './protocol.js';
import { encodeRequest } from './wire.js';

export type { NbdBlockSizes, NbdClientTlsOptions } from './client-handshake.js';

/** Where and what {@link NbdClientBackend.connect} connects to, and how it keeps the connection. */
export interface NbdClientOptions {
  /** TCP host (default `127.0.0.1`). */
  readonly host?: string;
  /** TCP port (default 10809). */
  readonly port?: number;
  /** A unix socket path instead of TCP. */
  readonly path?: string;
  /** The export to use (default `""`, the server's default export). */
  readonly exportName?: string;
  /** Give up one connect-and-negotiate attempt after this long (default 10 s). */
  readonly connectTimeoutMs?: number;
  /** TLS (`NBD_OPT_STARTTLS`) with certificate verification or a PSK; default none. */
  readonly tls?: NbdClientTlsOptions;
  /**
   * Connections to open when the server advertises `NBD_FLAG_CAN_MULTI_CONN` (default 1).
   * Each request goes to the one with the fewest in flight (ties in turn); a FLUSH goes to
   * every one. Without the flag: one.
   */
  readonly connections?: number;
  /**
   * How long to keep reconnecting while no connection is up (default 60 s; 0 turns reconnect
   * off). Requests in flight wait and are replayed; after this long they fail with IOERR.
   */
  readonly retryForMs?: number;
  /** First delay between reconnect attempts (default 50 ms), doubling up to `maxRetryDelayMs` (default 1 s). */
  readonly retryDelayMs?: number;
  readonly maxRetryDelayMs?: number;
  /**
   * Opens the transport of each connection, first and every reconnect (default: TCP or the
   * unix socket above). For tunnels, and for tests that cut connections.
   */
  readonly connectSocket?: () => net.Socket;
  /** Text naming the server in messages (default: the `nbd://` URI). */
  readonly description?: string;
}

/** {@link NbdClientBackend.state}: `degraded` while a connection is being re-established. */
export type NbdClientState = 'connected' | 'degraded' | 'failed' | 'closed';

/** What {@link NbdClientBackend.status} reports (plain data, for `status --json`). */
export interface NbdClientStatus {
  readonly server: string;
  readonly state: NbdClientState;
  readonly connections: number;
  readonly connectionsUp: number;
  /** Successful reconnects since the backend was created. */
  readonly reconnects: number;
  /** Requests sent per connection since the backend was created. */
  readonly requestsPerConnection: readonly number[];
  /** Requests waiting for a connection to be replayed on. */
  readonly waitingForReplay: number;
  /** The last connection error, while degraded or failed. */
  readonly lastError: string | null;
}

/** Opens one negotiated connection. */
type Opener = () => Promise<Negotiated>;

function describe(options: NbdClientOptions): string {
  const exportName = options.exportName ?? '';
  const s = options.tls !== undefined ? 's' : '';
  return options.path !== undefined
    ? `nbd${s}+unix:///${exportName}?socket=${options.path}`
    : `nbd${s}://${options.host ?? '127.0.0.1'}:${options.port ?? NBD_DEFAULT_PORT}/${exportName}`;
}

function makeOpener(options: NbdClientOptions, where: string): Opener {
  const exportName = options.exportName ?? '';
  const timeoutMs = options.connectTimeoutMs ?? 10_000;
  // The name a server certificate must carry: the host, or `localhost` for a unix socket.
  const host = options.host ?? (options.path !== undefined ? 'localhost' : '127.0.0.1');
  return async () => {
    const socket =
      options.connectSocket !== undefined
        ? options.connectSocket()
        : options.path !== undefined
          ? net.connect({ path: options.path })
          : net.connect({ host: options.host ?? '127.0.0.1', port: options.port ?? NBD_DEFAULT_PORT });
    const timer = setTimeout(() => {
      socket.destroy(new NbdConnectionError('ETIMEDOUT', `connecting to NBD server ${where} timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    try {
      if (socket.connecting || socket.destroyed) {
        await new Promise<void>((resolve, reject) => {
          const onError = (err: NodeJS.ErrnoException): void => {
            reject(BlkError.isInstance(err) ? err : new NbdConnectionError(err.code ?? 'ENOTCONN', `cannot connect to NBD server ${where}: ${err.message}`, { cause: err }));
          };
          if (socket.destroyed) {
            onError(new NbdConnectionError('ENOTCONN', `cannot connect to NBD server ${where}: the socket was closed`));
            return;
          }
          socket.once('error', onError);
          socket.once('connect', () => {
            socket.removeListener('error', onError);
            resolve();
          });
        });
      }
      if (options.path === undefined && options.connectSocket === undefined) socket.setNoDelay(true);
      const n = await negotiate(socket, exportName, options.tls ?? null, host);
      if (n.socket !== socket && options.path === undefined) n.socket.setNoDelay(true);
      return n;
    } catch (err) {
      socket.destroy();
      if (BlkError.isInstance(err)) throw err;
      throw new NbdConnectionError('ENOTCONN', `NBD negotiation with ${where} failed: ${String(err)}`, { cause: err });
    } finally {
      clearTimeout(timer);
    }
  };
}

// --- transmission ----------------------------------------------------------------------------

/**
 * A block backend on an NBD server: `createDisk({ name, backend: await NbdClientBackend.connect(...) })`
 * puts a device on any NBD server (qemu-nbd, nbdkit, Ceph's rbd-nbd, ours). Negotiates fixed
 * newstyle (TLS first when asked), structured replies and `NBD_OPT_GO` with
 * `NBD_INFO_BLOCK_SIZE`; maps READ, WRITE, FLUSH, DISCARD (TRIM) and WRITE_ZEROES bios to
 * pipelined requests, FUA included, over one or (multi-conn) several connections.
 *
 * Every bio completes exactly once. When a connection is lost, its requests wait; the backend
 * reconnects with backoff and replays them (block I/O is idempotent), and bios complete only
 * when their requests are answered. A write that overlaps an earlier write not yet completed
 * waits for it, so a replay never lands over newer data. While no connection is up for
 * `retryForMs`, every waiting bio and every later one completes with IOERR and an
 * {@link NbdConnectionError} naming the server.
 */
export class NbdClientBackend implements BlockBackend, ConnOwner {
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
  /** True when the server advertised `NBD_FLAG_CAN_MULTI_CONN`. */
  readonly multiConn: boolean;
  private readonly conns: ClientConn[] = [];
  private readonly slots: Slot[] = [];
  private readonly freeSlots: Slot[] = [];
  private readonly freeIos: ClientIo[] = [];
  /** Requests waiting for a connection (lost with theirs, or none up), oldest first. */
  private readonly pending: Slot[] = [];
  /** Changes (WRITE, WRITE_ZEROES, DISCARD) not completed, in submission order. */
  private readonly changes: ClientIo[] = [];
  private blockedCount = 0;
  private readonly maxPayload: number;
  private readonly opener: Opener | null;
  private readonly retryForMs: number;
  private readonly retryDelayMs: number;
  private readonly maxRetryDelayMs: number;
  private readonly timers: Array<ReturnType<typeof setTimeout> | null> = [];
  private outageTimer: ReturnType<typeof setTimeout> | null = null;
  private inflight = 0;
  private seq = 0;
  private rr = 0;
  private upCount = 0;
  private reconnectCount = 0;
  private lastError: BlkError | null = null;
  private dead: BlkError | null = null;
  private closed = false;
  private closing: Promise<void> | null = null;
  private drainWaiter: (() => void) | null = null;
  private lastState: NbdClientState = 'connected';
  private readonly listeners: Array<(state: NbdClientState, error: BlkError | null) => void> = [];

  private constructor(negotiated: readonly Negotiated[], description: string, options: NbdClientOptions, opener: Opener | null) {
    const n = negotiated[0] as Negotiated;
    this.description = description;
    this.sizeBytes = n.size;
    this.transmissionFlags = n.flags;
    this.readOnly = (n.flags & NbdTransmissionFlag.READ_ONLY) !== 0;
    this.blockSizes = n.blockSizes;
    this.structuredReplies = n.structured;
    this.multiConn = (n.flags & NbdTransmissionFlag.CAN_MULTI_CONN) !== 0;
    this.minIoSize = n.blockSizes.minimum > SECTOR_SIZE ? n.blockSizes.minimum : SECTOR_SIZE;
    const max = n.blockSizes.maximum;
    this.maxPayload = Math.max(this.minIoSize, Math.min(NBD_MAX_PAYLOAD, max - (max % this.minIoSize)));
    this.capabilities = Object.freeze({
      writeCache: (n.flags & NbdTransmissionFlag.SEND_FLUSH) !== 0,
      discard: (n.flags & NbdTransmissionFlag.SEND_TRIM) !== 0,
      writeZeroes: (n.flags & NbdTransmissionFlag.SEND_WRITE_ZEROES) !== 0,
    });
    this.opener = opener;
    this.retryForMs = opener === null ? 0 : (options.retryForMs ?? 60_000);
    this.retryDelayMs = options.retryDelayMs ?? 50;
    this.maxRetryDelayMs = options.maxRetryDelayMs ?? 1000;
    for (let i = 0; i < negotiated.length; i++) {
      const c = new ClientConn(i, this, description, n.structured);
      this.conns.push(c);
      this.timers.push(null);
      this.attach(c, negotiated[i] as Negotiated);
    }
  }

  /**
   * Connects to an NBD server over TCP or a unix socket (TLS when `tls` is given), negotiates
   * the export and, when the server allows multi-conn, opens the other `connections`. Throws
   * {@link NbdConnectionError} (cannot connect, timeout, TLS failure), {@link NbdExportNotFoundError},
   * {@link NbdOptionError} or {@link NbdProtocolError}; an export whose minimum block size is
   * over 4096 is refused with `InvalidArgumentError`. The first connection is not retried: a
   * wrong address fails at once. Other connections the server refuses are left out.
   */
  static async connect(options: NbdClientOptions = {}): Promise<NbdClientBackend> {
    const exportName = options.exportName ?? '';
    if (Buffer.byteLength(exportName, 'utf8') > NBD_MAX_STRING) {
      throw new InvalidArgumentError(`NBD export name is over ${NBD_MAX_STRING} bytes`);
    }
    if (options.connections !== undefined && !(Number.isInteger(options.connections) && options.connections >= 1 && options.connections <= 64)) {
      throw new InvalidArgumentError(`connections must be an integer from 1 to 64, got ${options.connections}`);
    }
    const where = options.description ?? describe(options);
    const opener = makeOpener(options, where);
    const n = await opener();
    NbdClientBackend.checkBlockSize(n, where);
    // The other connections: a server that allows multi-conn may still cap connections; keep
    // the ones it accepted rather than fail (status.connections says how many).
    const wanted = (n.flags & NbdTransmissionFlag.CAN_MULTI_CONN) !== 0 ? (options.connections ?? 1) : 1;
    const more = await Promise.allSettled(Array.from({ length: wanted - 1 }, () => opener()));
    const extra: Negotiated[] = [];
    for (const r of more) if (r.status === 'fulfilled') extra.push(r.value);
    return new NbdClientBackend([n, ...extra], where, options, opener);
  }

  /**
   * Negotiates `exportName` over an already-connected socket (a unix socket pair, a socket
   * you wrapped yourself) and returns the backend that owns it from then on. One connection,
   * no reconnect (there is no way to open another). Throws like {@link NbdClientBackend.connect};
   * the socket is destroyed on failure.
   */
  static async fromSocket(socket: net.Socket, options: { exportName?: string; description?: string } = {}): Promise<NbdClientBackend> {
    const exportName = options.exportName ?? '';
    const where = options.description ?? `nbd socket/${exportName}`;
    try {
      const n = await negotiate(socket, exportName);
      NbdClientBackend.checkBlockSize(n, where);
      return new NbdClientBackend([n], where, {}, null);
    } catch (err) {
      socket.destroy();
      throw err;
    }
  }

  private static checkBlockSize(n: Negotiated, where: string): void {
    if (n.blockSizes.minimum > 4096) {
      n.socket.destroy();
      throw new InvalidArgumentError(`NBD export ${where} needs ${n.blockSizes.minimum}-byte alignment; blkfilter devices support 512 or 4096`);
    }
  }

  /** True until the backend failed (retries ran out) or was closed. */
  get connected(): boolean {
    return this.dead === null;
  }

  /** NBD requests sent or waiting to be replayed, and not answered. */
  get inFlight(): number {
    return this.inflight;
  }

  /** `connected`, `degraded` (a connection is being re-established), `failed` or `closed`. */
  get state(): NbdClientState {
    if (this.closed) return 'closed';
    if (this.dead !== null) return 'failed';
    return this.upCount < this.conns.length ? 'degraded' : 'connected';
  }

  /** The state, connections and counters, as plain data. */
  get status(): NbdClientStatus {
    return {
      server: this.description,
      state: this.state,
      connections: this.conns.length,
      connectionsUp: this.upCount,
      reconnects: this.reconnectCount,
      requestsPerConnection: this.conns.map((c) => c.sent),
      waitingForReplay: this.pending.length,
      lastError: this.state === 'connected' || this.lastError === null ? null : this.lastError.message,
    };
  }

  /**
   * Calls `listener` on every change of {@link NbdClientBackend.state}, with the connection
   * error that caused it (null when a connection came back). Returns the function that stops it.
   */
  onStateChange(listener: (state: NbdClientState, error: BlkError | null) => void): () => void {
    this.listeners.push(listener);
    return () => {
      const i = this.listeners.indexOf(listener);
      if (i >= 0) this.listeners.splice(i, 1);
    };
  }

  private emitState(): void {
    const s = this.state;
    if (s === this.lastState) return;
    this.lastState = s;
    const err = s === 'connected' ? null : this.lastError;
    for (const l of this.listeners.slice()) l(s, err);
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
    io.blocked = false;
    io.ordered = false;
    const op = bio.op;
    if ((op === ReqOp.WRITE || op === ReqOp.WRITE_ZEROES || op === ReqOp.DISCARD) && bio.size > 0) {
      // Per-range order: a change waits for every earlier change to an overlapping range, so a
      // request replayed after a reconnect can never land over data that completed after it.
      io.start = bio.sector * SECTOR_SIZE;
      io.end = io.start + bio.size;
      io.ordered = true;
      const blocked = this.overlapsEarlier(io, this.changes.length);
      this.changes.push(io);
      if (blocked) {
        io.blocked = true;
        this.blockedCount++;
        return;
      }
    }
    this.start(io);
  }

  private overlapsEarlier(io: ClientIo, before: number): boolean {
    const changes = this.changes;
    for (let i = 0; i < before; i++) {
      const c = changes[i] as ClientIo;
      if (c.start < io.end && io.start < c.end) return true;
    }
    return false;
  }

  private start(io: ClientIo): void {
    const bio = io.bio as Bio;
    if (bio.op === ReqOp.FLUSH) {
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
    // Multi-conn: a FLUSH goes to every connection (the spec's rule for consistency).
    const n = this.conns.length;
    io.outstanding += n;
    for (let i = 0; i < n; i++) {
      const slot = this.getSlot(io, NbdCmd.FLUSH, 0, 0, 0, 0);
      slot.target = i;
      this.dispatch(slot);
    }
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
    // Count every part before sending any, so a reply arriving early cannot complete the bio.
    io.outstanding += Math.ceil(size / max);
    let pos = 0;
    while (pos < size) {
      const n = Math.min(max, size - pos);
      this.dispatch(this.getSlot(io, cmd, flags, base + pos, n, pos));
      pos += n;
    }
  }

  private getSlot(io: ClientIo, cmd: number, flags: number, offset: number, length: number, bioPos: number): Slot {
    let slot = this.freeSlots.pop();
    if (slot === undefined) {
      slot = new Slot(this.slots.length);
      this.slots.push(slot);
    }
    slot.gen = (slot.gen + 1) >>> 0;
    slot.io = io;
    slot.cmd = cmd;
    slot.flags = flags;
    slot.offset = offset;
    slot.length = length;
    slot.bioPos = bioPos;
    slot.errno = 0;
    slot.message = '';
    slot.conn = -1;
    slot.target = -1;
    slot.seq = this.seq++;
    this.inflight++;
    return slot;
  }

  /** Sends `slot` on its target connection or the next one up; with none up, it waits. */
  private dispatch(slot: Slot): void {
    const conns = this.conns;
    let c: ClientConn | null = null;
    if (slot.target >= 0 && (conns[slot.target] as ClientConn).up) {
      c = conns[slot.target] as ClientConn;
    } else if (this.upCount > 0) {
      // The connection with the fewest requests in flight, ties taken in turn. Plain
      // round-robin let one connection hold more than its share while another idled: behind a
      // server that serves N requests at a time per connection (nbdkit's threads), the excess
      // waited a whole service time (+630 us a request behind a 5 ms delay, 4 connections).
      const n = conns.length;
      let best = Infinity;
      let at = 0;
      for (let k = 0; k < n; k++) {
        const i = (this.rr + k) % n;
        const ck = conns[i] as ClientConn;
        if (ck.up && ck.inflight < best) {
          best = ck.inflight;
          c = ck;
          at = i;
          if (best === 0) break;
        }
      }
      this.rr = at + 1;
    }
    if (c === null) {
      slot.conn = -1;
      this.pending.push(slot);
      return;
    }
    c.send(slot, slot.cmd === NbdCmd.WRITE ? ((slot.io as ClientIo).bio as Bio).vecs : null);
  }

  // --- replies (called by the connections) ---------------------------------------------------

  /** @internal */
  lookup(conn: number, gen: number, index: number): Slot | null {
    const slot = this.slots[index];
    if (slot === undefined || slot.io === null || slot.gen !== gen || slot.conn !== conn) return null;
    return slot;
  }

  /** @internal */
  slotDone(slot: Slot): void {
    if (slot.errno === NbdErrno.ESHUTDOWN && this.retryForMs > 0 && this.dead === null) {
      // The server is going away: this request is replayed on the connection that replaces it.
      const conn = this.conns[slot.conn] as ClientConn;
      slot.errno = 0;
      slot.message = '';
      conn.drop()?.end();
      this.connLost(conn, new NbdConnectionError('ESHUTDOWN', `NBD server ${this.description} is shutting down`));
      return;
    }
    const io = slot.io as ClientIo;
    slot.io = null;
    slot.conn = -1;
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
      if (slot.errno === NbdErrno.ESHUTDOWN && this.closing === null) void this.close();
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
    if (io.ordered) {
      io.ordered = false;
      const changes = this.changes;
      changes.splice(changes.indexOf(io), 1);
      if (this.blockedCount > 0 && this.dead === null) this.unblock();
    }
    this.freeIos.push(io);
    if (status !== BlkStatus.OK && error !== null && bio.error === null) bio.error = error;
    sink.complete(bio, status);
  }

  /** Starts the held-back changes that no earlier change overlaps any more, in order. */
  private unblock(): void {
    const changes = this.changes;
    let ready: ClientIo[] | null = null;
    for (let i = 0; i < changes.length; i++) {
      const c = changes[i] as ClientIo;
      if (c.blocked && !this.overlapsEarlier(c, i)) {
        c.blocked = false;
        this.blockedCount--;
        (ready ??= []).push(c);
      }
    }
    if (ready !== null) for (const c of ready) this.start(c);
  }

  // --- losing and regaining connections ------------------------------------------------------

  /** @internal */
  connLost(conn: ClientConn, err: BlkError): void {
    if (this.dead !== null) return;
    this.lastError = err;
    this.upCount--;
    if (this.retryForMs <= 0 || err instanceof NbdProtocolError) {
      this.die(err);
      return;
    }
    // Its requests wait for a connection, in their first order.
    const slots = this.slots;
    let requeued = false;
    for (let i = 0; i < slots.length; i++) {
      const slot = slots[i] as Slot;
      if (slot.io !== null && slot.conn === conn.index) {
        slot.conn = -1;
        slot.gen = (slot.gen + 1) >>> 0;
        this.pending.push(slot);
        requeued = true;
      }
    }
    if (requeued) this.pending.sort(bySeq);
    if (this.upCount === 0 && this.outageTimer === null) {
      this.outageTimer = setTimeout(() => this.giveUp(), this.retryForMs);
    }
    this.emitState();
    this.scheduleReconnect(conn);
    this.replay();
  }

  private scheduleReconnect(conn: ClientConn): void {
    if (conn.reconnecting || this.dead !== null) return;
    conn.reconnecting = true;
    const base = Math.min(this.maxRetryDelayMs, this.retryDelayMs * 2 ** Math.min(conn.attempts, 20));
    // Jitter, so that many hosts do not hammer a server that comes back all at once.
    const delay = conn.attempts === 0 ? 0 : base / 2 + Math.random() * (base / 2);
    this.timers[conn.index] = setTimeout(() => {
      this.timers[conn.index] = null;
      void this.reconnect(conn);
    }, delay);
  }

  private async reconnect(conn: ClientConn): Promise<void> {
    let n: Negotiated;
    try {
      n = await (this.opener as Opener)();
    } catch (err) {
      conn.reconnecting = false;
      conn.attempts++;
      if (this.dead !== null) return;
      this.lastError = BlkError.isInstance(err) ? err : new NbdConnectionError('ENOTCONN', String(err));
      this.scheduleReconnect(conn);
      return;
    }
    conn.reconnecting = false;
    if (this.dead !== null) {
      n.socket.destroy();
      return;
    }
    const rw = NbdTransmissionFlag.READ_ONLY;
    if (n.size !== this.sizeBytes || (n.flags & rw) !== (this.transmissionFlags & rw) || n.structured !== this.structuredReplies) {
      n.socket.destroy();
      this.die(
        new NbdConnectionError(
          'ESTALE',
          `NBD server ${this.description} came back with another export (${n.size} bytes, flags 0x${n.flags.toString(16)}; was ${this.sizeBytes} bytes, flags 0x${this.transmissionFlags.toString(16)}): not replaying onto it`,
        ),
      );
      return;
    }
    conn.attempts = 0;
    this.reconnectCount++;
    this.attach(conn, n);
  }

  private attach(conn: ClientConn, n: Negotiated): void {
    conn.attach(n.socket, n.leftover);
    this.upCount++;
    if (this.outageTimer !== null) {
      clearTimeout(this.outageTimer);
      this.outageTimer = null;
    }
    this.emitState();
    this.replay();
  }

  /** Sends the requests that wait for a connection, oldest first. */
  private replay(): void {
    if (this.pending.length === 0 || this.upCount === 0) return;
    const list = this.pending.splice(0, this.pending.length);
    for (const slot of list) if (slot.io !== null) this.dispatch(slot);
  }

  private giveUp(): void {
    this.outageTimer = null;
    const last = this.lastError;
    this.die(
      new NbdConnectionError(
        last?.code ?? 'ENOTCONN',
        `NBD server ${this.description} unreachable for ${this.retryForMs / 1000} s, giving up${last !== null ? `: ${last.message}` : ''}`,
        { cause: last },
      ),
    );
  }

  /** Fails every request in flight or waiting and every later bio with `err`. */
  private die(err: BlkError): void {
    if (this.dead !== null) return;
    this.dead = err;
    this.lastError = err;
    if (this.outageTimer !== null) clearTimeout(this.outageTimer);
    this.outageTimer = null;
    for (const c of this.conns) {
      const t = this.timers[c.index];
      if (t !== null && t !== undefined) clearTimeout(t);
      this.timers[c.index] = null;
      if (c.up) {
        c.drop()?.destroy();
        this.upCount--;
      }
    }
    const ios = new Set<ClientIo>();
    for (const slot of this.slots) {
      if (slot.io !== null) {
        ios.add(slot.io);
        slot.io = null;
      }
    }
    for (const c of this.changes) if (c.blocked) ios.add(c);
    this.blockedCount = 0;
    this.pending.length = 0;
    this.inflight = 0;
    const w = this.drainWaiter;
    this.drainWaiter = null;
    if (w !== null) w();
    this.emitState();
    for (const io of ios) {
      if (io.bio !== null) this.finish(io, BlkStatus.IOERR, err);
    }
  }

  /**
   * Waits for requests in flight (through reconnects, within the retry window), sends
   * `NBD_CMD_DISC` on every connection and closes them. Later bios fail with IOERR. Called by
   * `Disk.remove()` once its bios drained.
   */
  close(): Promise<void> {
    if (this.closing !== null) return this.closing;
    this.closing = (async () => {
      if (this.dead === null && this.inflight > 0) {
        await new Promise<void>((resolve) => {
          this.drainWaiter = resolve;
        });
      }
      const closing: Promise<void>[] = [];
      if (this.dead === null) {
        this.dead = new NbdConnectionError('ENOTCONN', `NBD connection to ${this.description} was closed`);
        if (this.outageTimer !== null) clearTimeout(this.outageTimer);
        this.outageTimer = null;
        for (const c of this.conns) {
          const t = this.timers[c.index];
          if (t !== null && t !== undefined) clearTimeout(t);
          this.timers[c.index] = null;
          const s = c.drop();
          if (s === null) continue;
          this.upCount--;
          const disc = Buffer.alloc(NBD_REQUEST_SIZE);
          encodeRequest(disc, 0, 0, NbdCmd.DISC, 0, 0, 0, 0);
          closing.push(
            new Promise<void>((resolve) => {
              const t2 = setTimeout(() => s.destroy(), 2000);
              s.once('close', () => {
                clearTimeout(t2);
                resolve();
              });
              s.on('error', () => {});
              s.end(disc);
            }),
          );
        }
      }
      this.closed = true;
      this.emitState();
      await Promise.all(closing);
    })();
    return this.closing;
  }
}

function bySeq(a: Slot, b: Slot): number {
  return a.seq - b.seq;
}
