// Test doubles for NBD code, published as `@blkfilter/nbd/testing`: a raw protocol client that
// can send anything (bad magics, oversize lengths, half messages) and read exactly what comes
// back, and a socket double to drive a server or client without a network.
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { NbdCmd, NbdInfo, NbdOpt, NbdRep } from './protocol.js';
import { readU64, writeU64 } from './reader.js';

/** A 4-byte big-endian number. */
export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

/**
 * A 28-byte transmission request header, written field by field (not by the library's
 * encoder, so a test of one is not a test of itself). `magic` may be wrong on purpose.
 */
export function rawRequest(type: number, flags: number, cookie: number, offset: number, length: number, magic = 0x25609513): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(magic >>> 0, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeUInt32BE(0, 8);
  h.writeUInt32BE(cookie >>> 0, 12);
  writeU64(h, offset, 16);
  h.writeUInt32BE(length >>> 0, 24);
  return h;
}

/** A socket double: records what is written, lets a test emit `data` in chunks it chooses. */
export class FakeSocket extends EventEmitter {
  readonly written: Buffer[] = [];
  ended = false;
  destroyed = false;
  paused = false;
  remoteAddress: string | undefined = undefined;
  remotePort: number | undefined = undefined;

  write(chunk: Uint8Array | string, cb?: (err?: Error | null) => void): boolean {
    this.written.push(Buffer.from(chunk as Uint8Array));
    if (cb) queueMicrotask(() => cb(null));
    return true;
  }
  cork(): void {}
  uncork(): void {}
  pause(): this {
    this.paused = true;
    return this;
  }
  resume(): this {
    this.paused = false;
    return this;
  }
  setNoDelay(): this {
    return this;
  }
  end(chunk?: Uint8Array): this {
    if (chunk) this.write(chunk);
    if (!this.ended) {
      this.ended = true;
      queueMicrotask(() => this.destroy());
    }
    return this;
  }
  destroy(): this {
    if (!this.destroyed) {
      this.destroyed = true;
      queueMicrotask(() => this.emit('close'));
    }
    return this;
  }
  /** Delivers `chunk` as if it came from the peer. */
  feed(chunk: Uint8Array): void {
    this.emit('data', Buffer.from(chunk));
  }
  /** Everything written so far, in one buffer. */
  output(): Buffer {
    return Buffer.concat(this.written);
  }
  /** This double, typed as the socket it stands in for. */
  asSocket(): net.Socket {
    return this as unknown as net.Socket;
  }
}

/** One reply read by {@link RawNbdClient.reply}: simple (`chunks` empty) or structured. */
export interface RawReply {
  readonly cookie: number;
  readonly errno: number;
  readonly data: Buffer | null;
  readonly chunks: Array<{ flags: number; type: number; payload: Buffer }>;
}

/** One option reply. */
export interface RawOptionReply {
  readonly opt: number;
  readonly type: number;
  readonly data: Buffer;
}

/** Where {@link RawNbdClient.connect} connects: a TCP port on 127.0.0.1, or a unix socket. */
export type RawNbdAddress = number | { readonly port: number; readonly host?: string } | { readonly path: string };

/**
 * A deliberately thin NBD client over a real socket, for protocol tests and abuse: it sends
 * whatever it is given and reads exact byte counts back. Waits are driven by the socket's
 * events, with a timeout only as a safety net.
 */
export class RawNbdClient {
  readonly socket: net.Socket;
  private chunks: Buffer[] = [];
  private have = 0;
  private waiters: Array<() => void> = [];
  /** True once the socket closed. */
  closed = false;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.have += d.length;
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => {}); // resets are expected in these tests: 'close' follows
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Resolves at the next data or close event, or after `ms`. */
  private next(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      const t = setTimeout(resolve, Math.max(1, ms));
      this.waiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  /** Connects; rejects when the connection is refused. */
  static connect(address: RawNbdAddress): Promise<RawNbdClient> {
    const opts = typeof address === 'number' ? { port: address, host: '127.0.0.1' } : 'path' in address ? { path: address.path } : { port: address.port, host: address.host ?? '127.0.0.1' };
    return new Promise((resolve, reject) => {
      const s = net.connect(opts);
      s.once('error', reject);
      s.once('connect', () => {
        s.removeListener('error', reject);
        resolve(new RawNbdClient(s));
      });
    });
  }

  /** Exactly `n` bytes, or null when the connection closed or `timeoutMs` passed first. */
  async tryRead(n: number, timeoutMs = 5000): Promise<Buffer | null> {
    const until = Date.now() + timeoutMs;
    while (this.have < n) {
      const left = until - Date.now();
      if (this.closed || left <= 0) return null;
      await this.next(left);
    }
    const all = this.chunks.length === 1 ? (this.chunks[0] as Buffer) : Buffer.concat(this.chunks);
    const rest = all.subarray(n);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.have = rest.length;
    return all.subarray(0, n);
  }

  /** Exactly `n` bytes; rejects when the connection closes or `timeoutMs` passes first. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const b = await this.tryRead(n, timeoutMs);
    if (b === null) throw new Error(this.closed ? `connection closed with ${this.have}/${n} bytes` : `timeout waiting for ${n} bytes (have ${this.have})`);
    return b;
  }

  /** True once the server closed the connection, false if it did not within `timeoutMs`. */
  async waitClosed(timeoutMs = 5000): Promise<boolean> {
    const until = Date.now() + timeoutMs;
    while (!this.closed) {
      const left = until - Date.now();
      if (left <= 0) return false;
      await this.next(left);
    }
    return true;
  }

  /** Sends raw bytes (dropped once the connection is closed). */
  write(b: Buffer): void {
    if (!this.closed) this.socket.write(b);
  }

  /** Sends an option request. */
  option(opt: number, payload: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.write('IHAVEOPT', 0, 'latin1');
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(payload.length, 12);
    this.write(Buffer.concat([h, payload]));
  }

  /** Reads one option reply. */
  async optionReply(): Promise<RawOptionReply> {
    const h = await this.read(20);
    const len = h.readUInt32BE(16);
    return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: len ? Buffer.from(await this.read(len)) : Buffer.alloc(0) };
  }

  /** Reads the replies to one option until ACK or an error; returns all of them. */
  async optionReplies(): Promise<RawOptionReply[]> {
    const out: RawOptionReply[] = [];
    for (;;) {
      const r = await this.optionReply();
      out.push(r);
      if (r.type === NbdRep.ACK || (r.type & 0x80000000) !== 0) return out;
    }
  }

  /**
   * Greeting, client flags, STRUCTURED_REPLY (unless `structured: false`), SET_META_CONTEXT
   * (with `contexts`), then GO. Returns the export's size and transmission flags; throws when
   * GO is refused.
   */
  async handshake(options: { exportName?: string; structured?: boolean; contexts?: string[] } = {}): Promise<{ size: number; flags: number }> {
    await this.read(18);
    this.write(u32(3)); // FIXED_NEWSTYLE | NO_ZEROES
    if (options.structured !== false) {
      this.option(NbdOpt.STRUCTURED_REPLY);
      await this.optionReplies();
    }
    const name = Buffer.from(options.exportName ?? '', 'utf8');
    if (options.contexts) {
      const parts = [u32(name.length), name, u32(options.contexts.length)];
      for (const c of options.contexts) parts.push(u32(Buffer.byteLength(c)), Buffer.from(c));
      this.option(NbdOpt.SET_META_CONTEXT, Buffer.concat(parts));
      await this.optionReplies();
    }
    const go = Buffer.concat([u32(name.length), name, Buffer.from([0, 1, 0, NbdInfo.BLOCK_SIZE])]);
    this.option(NbdOpt.GO, go);
    let size = -1;
    let flags = 0;
    for (const r of await this.optionReplies()) {
      if (r.type === NbdRep.INFO && r.data.readUInt16BE(0) === NbdInfo.EXPORT) {
        size = readU64(r.data, 2);
        flags = r.data.readUInt16BE(10);
      }
      if ((r.type & 0x80000000) !== 0) throw new Error(`GO refused: 0x${r.type.toString(16)} ${r.data.toString()}`);
    }
    return { size, flags };
  }

  /**
   * The oldest way in: greeting, client flags, NBD_OPT_EXPORT_NAME. True once the server sent
   * the export's size and flags; false if it closed or balked first.
   */
  async handshakeExportName(exportName = ''): Promise<boolean> {
    const hello = await this.tryRead(18, 2000);
    if (hello === null || hello.toString('latin1', 0, 8) !== 'NBDMAGIC') return false;
    this.write(u32(3));
    this.option(NbdOpt.EXPORT_NAME, Buffer.from(exportName, 'utf8'));
    return (await this.tryRead(10, 2000)) !== null;
  }

  /** Sends a request header (see {@link rawRequest}) and its payload. */
  request(type: number, flags: number, cookie: number, offset: number, length: number, payload?: Buffer, magic = 0x25609513): void {
    const h = rawRequest(type, flags, cookie, offset, length, magic);
    this.write(payload ? Buffer.concat([h, payload]) : h);
  }

  /**
   * Reads one reply. `readLength` is the data length a simple READ reply carries (0 for other
   * commands).
   */
  async reply(readLength = 0): Promise<RawReply> {
    const m = (await this.read(4)).readUInt32BE(0);
    if (m === 0x67446698) {
      const rest = await this.read(12);
      const errno = rest.readUInt32BE(0);
      const cookie = rest.readUInt32BE(8);
      const data = errno === 0 && readLength > 0 ? Buffer.from(await this.read(readLength)) : null;
      return { cookie, errno, data, chunks: [] };
    }
    if (m !== 0x668e33ef) throw new Error(`bad reply magic 0x${m.toString(16)}`);
    const chunks: RawReply['chunks'] = [];
    let cookie = -1;
    let errno = 0;
    let first = true;
    for (;;) {
      const h = first ? Buffer.concat([Buffer.from([0x66, 0x8e, 0x33, 0xef]), await this.read(16)]) : await this.read(20);
      first = false;
      const flags = h.readUInt16BE(4);
      const type = h.readUInt16BE(6);
      cookie = h.readUInt32BE(12);
      const len = h.readUInt32BE(16);
      const payload = len ? Buffer.from(await this.read(len)) : Buffer.alloc(0);
      chunks.push({ flags, type, payload });
      if ((type & 0x8000) !== 0) errno = payload.readUInt32BE(0);
      if ((flags & 1) !== 0) break;
    }
    const dataChunk = chunks.find((c) => c.type === 1);
    return { cookie, errno, data: dataChunk ? dataChunk.payload.subarray(8) : null, chunks };
  }

  /** Sends NBD_CMD_DISC. */
  disconnect(): void {
    this.request(NbdCmd.DISC, 0, 0, 0, 0);
  }

  /** Drops the connection at once. */
  close(): void {
    this.socket.destroy();
  }
}
