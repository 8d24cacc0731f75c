import type tls from 'node:tls';
import type { BufferBudget } from './budget.js';
import type { ExportEntry, NbdExportConfig } from './exports.js';

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
  /**
   * Bytes of payload and reply buffers the whole server may hold, over all connections (default
   * 48 MiB, at least 33 MiB so that a 32 MiB request fits). A request that would go past it
   * waits, its connection unread, until replies leave; the last 1/16 (up to 4 MiB) is kept for
   * connections with nothing in flight, so a well-behaved client is served while others stall.
   */
  readonly maxBufferedBytes?: number;
  /**
   * Read WRITE payloads from the socket straight into their buffers, with no copy (default
   * true). Applies to connections `listen()` accepts on a server without TLS; others, and
   * sockets given to `serveSocket`, are read the usual way. `false` is for comparison.
   */
  readonly directPayload?: boolean;
  /** Receives connection-level events (disconnects, protocol errors). Default: silent. */
  readonly log?: NbdServerLog;
}

/** @internal a connection as its server sees it. */
export interface ConnectionHandle {
  readonly peer: string;
  /** The export served, once past the handshake; else null. */
  readonly exportName: string | null;
  /** Resolves once the socket closed. */
  readonly closed: Promise<void>;
  /** Stops reading; requests in flight finish, then the socket is ended. */
  beginClose(reason: string): void;
  /** Hangs up at once. */
  destroy(): void;
}

/** @internal what a connection needs of its server. */
export interface ServerCore {
  readonly exports: Map<string, ExportEntry>;
  readonly defaultExport: string | null;
  readonly tlsContext: tls.SecureContext | null;
  readonly tlsOptions: NbdServerTlsOptions | null;
  readonly maxRequests: number;
  readonly maxBytes: number;
  /** The server-wide cap on buffered bytes, shared by every connection. */
  readonly budget: BufferBudget;
  readonly log: NbdServerLog | null;
  /** Accepted sockets are read in user-buffer mode (`directPayload` and no TLS). */
  readonly directReads: boolean;
  /** WRITE payload bytes read straight into their buffers, over every connection. */
  directPayloadBytes: number;
  closing: boolean;
  connectionClosed(conn: ConnectionHandle): void;
}
