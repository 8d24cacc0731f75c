// Shared by the tests only (not an entry point, not exported).
import { spawn } from 'node:child_process';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { readU64, writeU64 } from './reader.js';

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
  feed(chunk: Uint8Array): void {
    this.emit('data', Buffer.from(chunk));
  }
  output(): Buffer {
    return Buffer.concat(this.written);
  }
  asSocket(): net.Socket {
    return this as unknown as net.Socket;
  }
}

/** Result of {@link run}. */
export interface RunResult {
  readonly code: number | null;
  readonly signal: string | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a program without blocking the event loop (an in-process server must keep serving). */
export function run(cmd: string, args: readonly string[], options: { timeoutMs?: number; env?: NodeJS.ProcessEnv; cwd?: string } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: options.env ?? process.env, cwd: options.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 20_000);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() });
    });
  });
}

/** Like {@link run} but throws with the output when the exit code is not 0. */
export async function runOk(cmd: string, args: readonly string[], options: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  const r = await run(cmd, args, options);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code} (${r.signal ?? ''})\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r;
}

/** True when `name` is an executable on PATH. */
export function hasTool(name: string): boolean {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    try {
      fs.accessSync(path.join(dir, name), fs.constants.X_OK);
      return true;
    } catch {
      // not here
    }
  }
  return false;
}

/** Names of missing tools among `names`, and a warning printed once per test file. */
export function missingTools(...names: string[]): string[] {
  const missing = names.filter((n) => !hasTool(n));
  if (missing.length > 0) console.warn(`[nbd tests] skipping tests that need ${missing.join(', ')}: not installed (apt-get install qemu-utils libnbd-bin nbdkit fio)`);
  return missing;
}

/** A fresh temporary directory under the OS tmpdir. */
export function tmpDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `blkfilter-nbd-${prefix}-`));
}

/** Waits until `path` exists (a unix socket a child creates). */
export async function waitForPath(p: string, timeoutMs = 10_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!fs.existsSync(p)) {
    if (Date.now() > until) throw new Error(`${p} did not appear within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

// --- raw protocol client for malformed-request tests -----------------------------------------

/** One reply to a raw request: simple (`chunks` empty) or the chunks of a structured reply. */
export interface RawReply {
  readonly errno: number;
  readonly data: Buffer | null;
  readonly chunks: Array<{ flags: number; type: number; payload: Buffer }>;
}

/**
 * A deliberately thin NBD client over a real socket, able to send anything (bad magic, oversize
 * lengths) and to read what comes back, for protocol tests.
 */
export class RawNbd {
  readonly socket: net.Socket;
  private chunks: Buffer[] = [];
  private have = 0;
  private waiters: Array<() => void> = [];
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
    socket.on('error', () => {});
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  static connect(port: number): Promise<RawNbd> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ port, host: '127.0.0.1' }, () => resolve(new RawNbd(s)));
      s.once('error', reject);
    });
  }

  /** Reads exactly n bytes; rejects if the connection closes first. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const until = Date.now() + timeoutMs;
    while (this.have < n) {
      if (this.closed) throw new Error(`connection closed with ${this.have}/${n} bytes`);
      if (Date.now() > until) throw new Error(`timeout waiting for ${n} bytes (have ${this.have})`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 50);
      });
    }
    const all = this.chunks.length === 1 ? (this.chunks[0] as Buffer) : Buffer.concat(this.chunks);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length > 0 ? [rest] : [];
    this.have = rest.length;
    return out;
  }

  /** Resolves true when the server closes the connection within the timeout. */
  async waitClosed(timeoutMs = 5000): Promise<boolean> {
    const until = Date.now() + timeoutMs;
    while (!this.closed && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    return this.closed;
  }

  write(b: Buffer): void {
    this.socket.write(b);
  }

  option(opt: number, payload: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.write('IHAVEOPT', 0, 'latin1');
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(payload.length, 12);
    this.write(Buffer.concat([h, payload]));
  }

  async optionReply(): Promise<{ opt: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    const len = h.readUInt32BE(16);
    return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: len ? Buffer.from(await this.read(len)) : Buffer.alloc(0) };
  }

  /** Reads replies to one option until ACK or an error; returns all of them. */
  async optionReplies(): Promise<Array<{ opt: number; type: number; data: Buffer }>> {
    const out = [];
    for (;;) {
      const r = await this.optionReply();
      out.push(r);
      if (r.type === 1 || (r.type & 0x80000000) !== 0) return out;
    }
  }

  /** Greeting + client flags + (structured) + (meta contexts) + GO. Returns the GO replies. */
  async handshake(options: { exportName?: string; structured?: boolean; contexts?: string[] } = {}): Promise<{ size: number; flags: number }> {
    await this.read(18);
    const f = Buffer.alloc(4);
    f.writeUInt32BE(3, 0);
    this.write(f);
    if (options.structured !== false) {
      this.option(8);
      await this.optionReplies();
    }
    const name = Buffer.from(options.exportName ?? '', 'utf8');
    if (options.contexts) {
      const parts = [u32(name.length), name, u32(options.contexts.length)];
      for (const c of options.contexts) parts.push(u32(Buffer.byteLength(c)), Buffer.from(c));
      this.option(10, Buffer.concat(parts));
      await this.optionReplies();
    }
    const go = Buffer.concat([u32(name.length), name, Buffer.from([0, 1, 0, 3])]);
    this.option(7, go);
    let size = -1;
    let flags = 0;
    for (const r of await this.optionReplies()) {
      if (r.type === 3 && r.data.readUInt16BE(0) === 0) {
        size = readU64(r.data, 2);
        flags = r.data.readUInt16BE(10);
      }
      if ((r.type & 0x80000000) !== 0) throw new Error(`GO refused: 0x${r.type.toString(16)} ${r.data.toString()}`);
    }
    return { size, flags };
  }

  request(type: number, flags: number, cookie: number, offset: number, length: number, payload?: Buffer, magic = 0x25609513): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(magic >>> 0, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeUInt32BE(0, 8);
    h.writeUInt32BE(cookie, 12);
    writeU64(h, offset, 16);
    h.writeUInt32BE(length >>> 0, 24);
    this.write(payload ? Buffer.concat([h, payload]) : h);
  }

  /**
   * Reads one reply. `readLength` is the data length a simple READ reply carries (0 for other
   * commands). Returns the cookie it was for.
   */
  async reply(readLength = 0): Promise<RawReply & { cookie: number }> {
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

  close(): void {
    this.socket.destroy();
  }
}

/** A 4-byte big-endian number. */
export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}
