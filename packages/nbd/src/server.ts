import net from 'node:net';
import tls from 'node:tls';
import { InvalidArgumentError } from '@blkfilter/bio';
import { BufferBudget } from './budget.js';
import { raisePoolLimit } from './buffer-pool.js';
import { ServerConnection } from './connection.js';
import { resolveExport, type NbdExportConfig } from './exports.js';
import { NBD_DEFAULT_PORT, NBD_MAX_PAYLOAD } from './protocol.js';
import type { ConnectionHandle, NbdListenOptions, NbdServerAddress, NbdServerOptions, ServerCore } from './server-options.js';

export type { NbdListenOptions, NbdServerAddress, NbdServerLog, NbdServerOptions, NbdServerTlsOptions } from './server-options.js';

const DEFAULT_MAX_REQUESTS = 128;
const DEFAULT_MAX_BYTES = 64 * 1024 * 1024;
/**
 * Server-wide payload and reply bytes. 48 MiB keeps `serve` within issue 19's 128 MiB of its
 * idle RSS under 4 connections x QD32 of 1 MiB writes (peak +107 MiB; 96 MiB gave +153-172:
 * the payloads, the pool's free buffers and the socket's read chunks awaiting GC add up), and
 * is still 24-48 ms of page-cache writes at 1-2 GB/s in flight.
 */
const DEFAULT_MAX_BUFFERED = 48 * 1024 * 1024;
/** The smallest server-wide cap: one maximum payload and a reply batch must fit. */
const MIN_BUFFERED = NBD_MAX_PAYLOAD + 1024 * 1024;
const MAX_RESERVE = 4 * 1024 * 1024;

/**
 * An NBD server whose exports are blkfilter block devices: every request from a client becomes
 * bios submitted with `submitBio`, so attached filters (CBT, snapshots) see all of them. Create
 * with {@link createNbdServer}, then {@link NbdServer.listen}.
 */
export class NbdServer {
  private readonly core: ServerCore;
  private readonly connections = new Set<ConnectionHandle>();
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
    const maxBuffered = options.maxBufferedBytes ?? DEFAULT_MAX_BUFFERED;
    if (!Number.isSafeInteger(maxBuffered) || maxBuffered < MIN_BUFFERED) {
      throw new InvalidArgumentError(`maxBufferedBytes must be a whole number >= ${MIN_BUFFERED} (a 32 MiB request and a reply batch), got ${String(maxBuffered)}`);
    }
    // The pool must hold what this server may have in flight, or every swing at the cap churns.
    raisePoolLimit(maxBuffered);
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
      budget: new BufferBudget(maxBuffered, Math.min(MAX_RESERVE, Math.floor(maxBuffered / 16))),
      log: options.log ?? null,
      directReads: (options.directPayload ?? true) && tlsContext === null,
      directPayloadBytes: 0,
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

  /**
   * Payload and reply buffer bytes the server holds now, over all connections (at most
   * `maxBufferedBytes`, give or take the small replies of requests already running).
   */
  get bufferedBytes(): number {
    return this.core.budget.used;
  }

  /** The most {@link NbdServer.bufferedBytes} ever held at once. */
  get peakBufferedBytes(): number {
    return this.core.budget.peak;
  }

  /** The server-wide cap on buffered bytes (`maxBufferedBytes`). */
  get maxBufferedBytes(): number {
    return this.core.budget.limit;
  }

  /** Connections not read because the server is at its buffer cap, waiting for replies to leave. */
  get connectionsWaitingForBuffers(): number {
    return this.core.budget.waiting;
  }

  /**
   * WRITE payload bytes read from sockets straight into their buffers, with no copy, since the
   * server was created (see `directPayload`).
   */
  get directPayloadBytes(): number {
    return this.core.directPayloadBytes;
  }

  /** Open client connections. */
  get connectionCount(): number {
    return this.connections.size;
  }

  /** Open connections per export name (connections still in the handshake are not counted). */
  connectionsByExport(): Map<string, number> {
    const counts = new Map<string, number>();
    for (const c of this.connections) {
      const name = c.exportName;
      if (name !== null) counts.set(name, (counts.get(name) ?? 0) + 1);
    }
    return counts;
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
    // Direct reads move each accepted socket to a new one before anything is read from it.
    const server = net.createServer({ pauseOnConnect: this.core.directReads }, (socket) => this.accept(socket));
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
    if (this.core.closing) {
      socket.destroy();
      return;
    }
    const conn = new ServerConnection(this.core, socket, this.core.directReads);
    this.connections.add(conn);
    this.core.log?.('debug', `nbd ${conn.peer}: connected`);
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
