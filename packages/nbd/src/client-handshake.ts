import type net from 'node:net';
import tls from 'node:tls';
import { NbdConnectionError, NbdExportNotFoundError, NbdOptionError, NbdProtocolError } from './errors.js';
import {
  NBD_INIT_MAGIC_HI,
  NBD_INIT_MAGIC_LO,
  NBD_MAX_PAYLOAD,
  NBD_MAX_STRING,
  NBD_OPTS_MAGIC_HI,
  NBD_OPTS_MAGIC_LO,
  NbdClientFlag,
  NbdHandshakeFlag,
  NbdInfo,
  NbdOpt,
  NbdRep,
} from './protocol.js';
import { ByteReader, readU64 } from './reader.js';
import { NBD_OPTION_REPLY_SIZE, decodeOptionReply, encodeOption } from './wire.js';

/** The size constraints a server advertised (`NBD_INFO_BLOCK_SIZE`), or the spec's defaults. */
export interface NbdBlockSizes {
  readonly minimum: number;
  readonly preferred: number;
  readonly maximum: number;
}

/**
 * TLS for the client (`NBD_OPT_STARTTLS`, then TLS for the rest of the handshake and all
 * requests). X.509: the server certificate is verified against `ca` (or the system CAs) and
 * the host name; PSK: `psk` (TLS 1.2 PSK cipher suites, as nbdkit `--tls-psk` offers).
 */
export interface NbdClientTlsOptions {
  /** CA certificates (PEM) that sign the server certificate; default the system CAs. */
  readonly ca?: string | Buffer;
  /** A client certificate and key (PEM), for servers that verify clients. */
  readonly cert?: string | Buffer;
  readonly key?: string | Buffer;
  /** Name to verify the server certificate against (default: the host connected to). */
  readonly servername?: string;
  /** Pre-shared key instead of certificates: `identity` (the username) and the key bytes. */
  readonly psk?: { readonly identity: string; readonly key: Buffer };
}

export interface Negotiated {
  readonly socket: net.Socket;
  readonly size: number;
  readonly flags: number;
  readonly structured: boolean;
  readonly blockSizes: NbdBlockSizes;
  readonly leftover: Buffer | null;
}

// --- handshake -------------------------------------------------------------------------------

/** Reads exact byte counts from a socket during the handshake (a control path: promises are fine). */
class HandshakeReader {
  private readonly socket: net.Socket;
  private readonly reader = new ByteReader(4096);
  private want = 0;
  private waiter: ((buf: Buffer) => void) | null = null;
  private failer: ((err: Error) => void) | null = null;
  private error: Error | null = null;
  private readonly onData = (chunk: Buffer): void => {
    this.reader.push(chunk);
    this.pump();
  };
  private readonly onEnd = (): void => this.fail(new NbdConnectionError('ECONNRESET', 'NBD server closed the connection during the handshake'));
  private readonly onError = (err: Error): void =>
    this.fail(new NbdConnectionError((err as NodeJS.ErrnoException).code ?? 'ENOTCONN', `NBD connection failed: ${err.message}`, { cause: err }));

  constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onError);
  }

  fail(err: Error): void {
    if (this.error === null) this.error = err;
    const f = this.failer;
    this.waiter = null;
    this.failer = null;
    if (f !== null) f(err);
  }

  read(n: number): Promise<Buffer> {
    if (this.error !== null) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      this.want = n;
      this.waiter = resolve;
      this.failer = reject;
      this.pump();
    });
  }

  private pump(): void {
    const w = this.waiter;
    if (w === null || this.reader.length < this.want) return;
    const r = this.reader;
    const out = Buffer.from(r.buf.subarray(r.start, r.start + this.want));
    r.consumeTo(r.start + this.want);
    this.waiter = null;
    this.failer = null;
    w(out);
  }

  /** Stops listening; returns bytes received past the handshake (normally none). */
  detach(): Buffer | null {
    const s = this.socket;
    s.removeListener('data', this.onData);
    s.removeListener('end', this.onEnd);
    s.removeListener('close', this.onEnd);
    s.removeListener('error', this.onError);
    const r = this.reader;
    return r.length > 0 ? Buffer.from(r.buf.subarray(r.start, r.end)) : null;
  }
}

async function readOptReply(r: HandshakeReader, opt: number): Promise<{ type: number; data: Buffer }> {
  const raw = await r.read(NBD_OPTION_REPLY_SIZE);
  const h = decodeOptionReply(raw, 0);
  if (h === null) throw new NbdProtocolError(`bad option reply magic 0x${raw.toString('hex', 0, 8)} from the NBD server`);
  const replyOpt = h.opt;
  if (replyOpt !== opt) throw new NbdProtocolError(`NBD server answered option ${replyOpt} while option ${opt} was pending`);
  const type = h.type;
  const len = h.length;
  if (len > 16 * 1024 * 1024) throw new NbdProtocolError(`option reply of ${len} bytes from the NBD server is implausibly large`);
  const data = len > 0 ? await r.read(len) : Buffer.alloc(0);
  return { type, data };
}

function isErrorReply(type: number): boolean {
  return (type & 0x80000000) !== 0;
}

function startTls(socket: net.Socket, options: NbdClientTlsOptions, host: string): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const psk = options.psk;
    const common = { socket, minVersion: 'TLSv1.2' as const };
    const secure =
      psk !== undefined
        ? tls.connect({
            ...common,
            // Node offers PSK with TLS 1.2 cipher suites only; nbdkit and qemu accept them.
            maxVersion: 'TLSv1.2',
            ciphers: 'PSK:ECDHE-PSK:DHE-PSK',
            pskCallback: () => ({ psk: psk.key, identity: psk.identity }),
            checkServerIdentity: () => undefined,
          })
        : tls.connect({
            ...common,
            ...(options.ca !== undefined ? { ca: options.ca } : {}),
            ...(options.cert !== undefined ? { cert: options.cert } : {}),
            ...(options.key !== undefined ? { key: options.key } : {}),
            // SNI must not carry an IP address (RFC 6066); the identity check still uses `host`.
            ...(options.servername !== undefined ? { servername: options.servername } : isIp(host) ? {} : { servername: host }),
            host: options.servername ?? host,
            rejectUnauthorized: true,
          });
    const onError = (err: Error): void => {
      secure.destroy();
      reject(new NbdConnectionError((err as NodeJS.ErrnoException).code ?? 'EPROTO', `TLS with the NBD server failed: ${err.message}`, { cause: err }));
    };
    secure.once('error', onError);
    secure.once('secureConnect', () => {
      secure.removeListener('error', onError);
      resolve(secure);
    });
  });
}

function isIp(host: string): boolean {
  return /^[0-9.]+$/.test(host) || host.includes(':');
}

/**
 * Runs the client side of the fixed newstyle handshake on `socket` and returns what the
 * server advertised. With `tlsOptions`, upgrades with `NBD_OPT_STARTTLS` first; the socket in
 * the result is then the TLS socket.
 */
export async function negotiate(plain: net.Socket, exportName: string, tlsOptions: NbdClientTlsOptions | null = null, host = 'localhost'): Promise<Negotiated> {
  let socket = plain;
  let r = new HandshakeReader(socket);
  try {
    const hello = await r.read(18);
    if (hello.readUInt32BE(0) !== NBD_INIT_MAGIC_HI || hello.readUInt32BE(4) !== NBD_INIT_MAGIC_LO) {
      throw new NbdProtocolError(`not an NBD server: greeting starts with 0x${hello.toString('hex', 0, 8)}, expected NBDMAGIC`);
    }
    if (hello.readUInt32BE(8) !== NBD_OPTS_MAGIC_HI || hello.readUInt32BE(12) !== NBD_OPTS_MAGIC_LO) {
      throw new NbdProtocolError('NBD server speaks the oldstyle handshake; only newstyle is supported');
    }
    const hsFlags = hello.readUInt16BE(16);
    if ((hsFlags & NbdHandshakeFlag.FIXED_NEWSTYLE) === 0) {
      throw new NbdProtocolError('NBD server does not support fixed newstyle negotiation');
    }
    const noZeroes = (hsFlags & NbdHandshakeFlag.NO_ZEROES) !== 0;
    const cflags = Buffer.allocUnsafe(4);
    cflags.writeUInt32BE(NbdClientFlag.FIXED_NEWSTYLE | (noZeroes ? NbdClientFlag.NO_ZEROES : 0), 0);
    socket.write(cflags);

    if (tlsOptions !== null) {
      socket.write(encodeOption(NbdOpt.STARTTLS, null));
      const st = await readOptReply(r, NbdOpt.STARTTLS);
      if (st.type !== NbdRep.ACK) {
        throw new NbdOptionError(NbdOpt.STARTTLS, st.type, `${st.data.toString('utf8', 0, Math.min(st.data.length, NBD_MAX_STRING))} (the server does not offer TLS: use nbd:// instead of nbds://)`);
      }
      const extra = r.detach();
      if (extra !== null) throw new NbdProtocolError('NBD server sent data after its STARTTLS reply, before TLS');
      socket = await startTls(socket, tlsOptions, host);
      r = new HandshakeReader(socket);
    }

    socket.write(encodeOption(NbdOpt.STRUCTURED_REPLY, null));
    const sr = await readOptReply(r, NbdOpt.STRUCTURED_REPLY);
    if (sr.type === NbdRep.ERR_TLS_REQD) {
      throw new NbdOptionError(NbdOpt.STRUCTURED_REPLY, sr.type, 'the server requires TLS: connect with nbds:// (and its CA certificate or a PSK)');
    }
    const structured = sr.type === NbdRep.ACK;

    const name = Buffer.from(exportName, 'utf8');
    const go = Buffer.allocUnsafe(4 + name.length + 2 + 2);
    go.writeUInt32BE(name.length, 0);
    name.copy(go, 4);
    go.writeUInt16BE(1, 4 + name.length);
    go.writeUInt16BE(NbdInfo.BLOCK_SIZE, 6 + name.length);
    socket.write(encodeOption(NbdOpt.GO, go));
    let size = -1;
    let flags = 0;
    let blockSizes: NbdBlockSizes = { minimum: 1, preferred: 4096, maximum: NBD_MAX_PAYLOAD };
    for (;;) {
      const { type, data } = await readOptReply(r, NbdOpt.GO);
      if (type === NbdRep.INFO) {
        if (data.length < 2) throw new NbdProtocolError('NBD_REP_INFO shorter than 2 bytes');
        const info = data.readUInt16BE(0);
        if (info === NbdInfo.EXPORT) {
          if (data.length !== 12) throw new NbdProtocolError(`NBD_INFO_EXPORT of ${data.length} bytes, expected 12`);
          size = readU64(data, 2);
          flags = data.readUInt16BE(10);
        } else if (info === NbdInfo.BLOCK_SIZE && data.length === 14) {
          blockSizes = { minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) };
        }
        continue;
      }
      if (type === NbdRep.ACK) break;
      const message = data.toString('utf8', 0, Math.min(data.length, NBD_MAX_STRING));
      if (type === NbdRep.ERR_UNKNOWN) throw new NbdExportNotFoundError(exportName, message);
      if (type === NbdRep.ERR_TLS_REQD) throw new NbdOptionError(NbdOpt.GO, type, `${message} (the server requires TLS: connect with nbds://)`);
      if (type === NbdRep.ERR_UNSUP) {
        // An old server without NBD_OPT_GO: fall back to NBD_OPT_EXPORT_NAME.
        socket.write(encodeOption(NbdOpt.EXPORT_NAME, name));
        const reply = await r.read(noZeroes ? 10 : 134);
        size = readU64(reply, 0);
        flags = reply.readUInt16BE(8);
        break;
      }
      if (isErrorReply(type)) throw new NbdOptionError(NbdOpt.GO, type, message);
      throw new NbdProtocolError(`unexpected reply type ${type} to NBD_OPT_GO`);
    }
    if (size < 0) throw new NbdProtocolError('NBD server accepted NBD_OPT_GO without sending NBD_INFO_EXPORT');
    return { socket, size, flags, structured, blockSizes, leftover: r.detach() };
  } catch (err) {
    r.detach();
    if (socket !== plain) socket.destroy();
    throw err;
  }
}
