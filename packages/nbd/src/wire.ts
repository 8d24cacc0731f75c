// The NBD wire format, in one place for the client and the server (as pg-protocol keeps its
// `Parser` apart from the connection): fixed headers are encoded into and decoded from a buffer
// at a position, so nothing is allocated per message on the transmission path. Layouts are
// those of NetworkBlockDevice/nbd doc/proto.md; every number is big-endian.
import {
  NBD_OPTS_MAGIC_HI,
  NBD_OPTS_MAGIC_LO,
  NBD_REP_MAGIC_HI,
  NBD_REP_MAGIC_LO,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_SIZE,
} from './protocol.js';
import { writeU64 } from './reader.js';

/** Size of an option request header (`IHAVEOPT`, option, length). */
export const NBD_OPTION_HEADER_SIZE = 16;
/** Size of an option reply header (magic, option, reply type, length). */
export const NBD_OPTION_REPLY_SIZE = 20;

/**
 * A decoded transmission request header. One per parser, overwritten by each request: copy
 * what must outlive the next one. The cookie is two 32-bit halves, the offset both whole
 * (exact below 2^53) and as its high word (so a range check never rounds).
 */
export class RequestHeader {
  magic = 0;
  flags = 0;
  type = 0;
  cookieHi = 0;
  cookieLo = 0;
  offHi = 0;
  offset = 0;
  length = 0;
}

/** Decodes the 28-byte request header at `src[pos]` into `h` (the magic is not checked). */
export function decodeRequest(src: Buffer, pos: number, h: RequestHeader): void {
  h.magic = src.readUInt32BE(pos);
  h.flags = src.readUInt16BE(pos + 4);
  h.type = src.readUInt16BE(pos + 6);
  h.cookieHi = src.readUInt32BE(pos + 8);
  h.cookieLo = src.readUInt32BE(pos + 12);
  const hi = src.readUInt32BE(pos + 16);
  h.offHi = hi;
  h.offset = hi * 0x100000000 + src.readUInt32BE(pos + 20);
  h.length = src.readUInt32BE(pos + 24);
}

/** Encodes a request header at `out[pos]` (28 bytes); `offset` up to 2^53. */
export function encodeRequest(out: Buffer, pos: number, flags: number, type: number, cookieHi: number, cookieLo: number, offset: number, length: number): void {
  out.writeUInt32BE(NBD_REQUEST_MAGIC, pos);
  out.writeUInt16BE(flags, pos + 4);
  out.writeUInt16BE(type, pos + 6);
  out.writeUInt32BE(cookieHi >>> 0, pos + 8);
  out.writeUInt32BE(cookieLo >>> 0, pos + 12);
  writeU64(out, offset, pos + 16);
  out.writeUInt32BE(length >>> 0, pos + 24);
}

/** Encodes a simple reply header at `out[pos]` (16 bytes). */
export function encodeSimpleReply(out: Buffer, pos: number, errno: number, cookieHi: number, cookieLo: number): void {
  out.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, pos);
  out.writeUInt32BE(errno, pos + 4);
  out.writeUInt32BE(cookieHi, pos + 8);
  out.writeUInt32BE(cookieLo, pos + 12);
}

/** Encodes a structured reply chunk header at `out[pos]` (20 bytes); `length` is the payload's. */
export function encodeStructuredReply(out: Buffer, pos: number, flags: number, type: number, cookieHi: number, cookieLo: number, length: number): void {
  out.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, pos);
  out.writeUInt16BE(flags, pos + 4);
  out.writeUInt16BE(type, pos + 6);
  out.writeUInt32BE(cookieHi, pos + 8);
  out.writeUInt32BE(cookieLo, pos + 12);
  out.writeUInt32BE(length, pos + 16);
}

/**
 * A decoded reply header, simple or structured (`structured` tells which). A simple reply
 * fills `errno`; a structured chunk fills `flags`, `type` and `length`.
 */
export class ReplyHeader {
  structured = false;
  errno = 0;
  flags = 0;
  type = 0;
  cookieHi = 0;
  cookieLo = 0;
  length = 0;
}

/**
 * Decodes the reply header at `src[pos, end)` into `h`. Returns its size (16 or 20), 0 when
 * more bytes are needed, or -1 when the magic is neither a simple nor a structured reply's.
 */
export function decodeReply(src: Buffer, pos: number, end: number, h: ReplyHeader): number {
  if (end - pos < 4) return 0;
  const magic = src.readUInt32BE(pos);
  if (magic === NBD_SIMPLE_REPLY_MAGIC) {
    if (end - pos < NBD_SIMPLE_REPLY_SIZE) return 0;
    h.structured = false;
    h.errno = src.readUInt32BE(pos + 4);
    h.flags = 0;
    h.type = 0;
    h.length = 0;
  } else if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
    if (end - pos < NBD_STRUCTURED_REPLY_SIZE) return 0;
    h.structured = true;
    h.errno = 0;
    h.flags = src.readUInt16BE(pos + 4);
    h.type = src.readUInt16BE(pos + 6);
    h.length = src.readUInt32BE(pos + 16);
  } else {
    return -1;
  }
  h.cookieHi = src.readUInt32BE(pos + 8);
  h.cookieLo = src.readUInt32BE(pos + 12);
  return h.structured ? NBD_STRUCTURED_REPLY_SIZE : NBD_SIMPLE_REPLY_SIZE;
}

/** An option request (`IHAVEOPT`, option, length, payload) as one buffer. */
export function encodeOption(opt: number, payload: Uint8Array | null): Buffer {
  const len = payload === null ? 0 : payload.length;
  const buf = Buffer.allocUnsafe(NBD_OPTION_HEADER_SIZE + len);
  buf.writeUInt32BE(NBD_OPTS_MAGIC_HI, 0);
  buf.writeUInt32BE(NBD_OPTS_MAGIC_LO, 4);
  buf.writeUInt32BE(opt, 8);
  buf.writeUInt32BE(len, 12);
  if (payload !== null) buf.set(payload, NBD_OPTION_HEADER_SIZE);
  return buf;
}

/** True when `src[pos]` starts with the option magic `IHAVEOPT` (8 bytes must be there). */
export function isOptionMagic(src: Buffer, pos: number): boolean {
  return src.readUInt32BE(pos) === NBD_OPTS_MAGIC_HI && src.readUInt32BE(pos + 4) === NBD_OPTS_MAGIC_LO;
}

/** An option reply (magic, option, type, length, payload) as one buffer. */
export function encodeOptionReply(opt: number, type: number, payload: Uint8Array | null): Buffer {
  const len = payload === null ? 0 : payload.length;
  const buf = Buffer.allocUnsafe(NBD_OPTION_REPLY_SIZE + len);
  buf.writeUInt32BE(NBD_REP_MAGIC_HI, 0);
  buf.writeUInt32BE(NBD_REP_MAGIC_LO, 4);
  buf.writeUInt32BE(opt >>> 0, 8);
  buf.writeUInt32BE(type >>> 0, 12);
  buf.writeUInt32BE(len, 16);
  if (payload !== null) buf.set(payload, NBD_OPTION_REPLY_SIZE);
  return buf;
}

/** A decoded option reply header. */
export interface OptionReplyHeader {
  readonly opt: number;
  readonly type: number;
  readonly length: number;
}

/** Decodes the 20-byte option reply header at `src[pos]`; null when the magic is wrong. */
export function decodeOptionReply(src: Buffer, pos: number): OptionReplyHeader | null {
  if (src.readUInt32BE(pos) !== NBD_REP_MAGIC_HI || src.readUInt32BE(pos + 4) !== NBD_REP_MAGIC_LO) return null;
  return { opt: src.readUInt32BE(pos + 8), type: src.readUInt32BE(pos + 12), length: src.readUInt32BE(pos + 16) };
}

/** What a {@link RequestParser} reports to. */
export interface RequestSink {
  /**
   * Asked with each decoded header before it is taken: false stops parsing there, the header
   * unused (flow control, closing); it is decoded and asked about again when parsing resumes.
   */
  requestReady(h: RequestHeader): boolean;
  /** One request header; returns how many payload bytes follow it (a WRITE's length, else 0). */
  request(h: RequestHeader): number;
  /** `n` payload bytes of the last request at `src[pos]`; `last` on the final piece. */
  requestPayload(src: Buffer, pos: number, n: number, last: boolean): void;
}

/**
 * Splits a transmission-phase byte stream into request headers and their payloads, wherever
 * the stream was cut. Headers are decoded in place (the caller keeps the unparsed tail of a
 * chunk and feeds it again with more bytes); payloads are handed on as they arrive.
 */
export class RequestParser {
  /** The header being reported; reused for every request. */
  readonly header = new RequestHeader();
  /** Payload bytes of the last request still to come. */
  payloadLeft = 0;

  /** Parses `src[pos, end)`; returns the position of the first byte not used. */
  parse(src: Buffer, pos: number, end: number, sink: RequestSink): number {
    while (pos < end) {
      const left = this.payloadLeft;
      if (left > 0) {
        const n = left < end - pos ? left : end - pos;
        this.payloadLeft = left - n;
        sink.requestPayload(src, pos, n, left === n);
        pos += n;
        continue;
      }
      if (end - pos < NBD_REQUEST_SIZE) break;
      decodeRequest(src, pos, this.header);
      if (!sink.requestReady(this.header)) break;
      pos += NBD_REQUEST_SIZE;
      this.payloadLeft = sink.request(this.header);
    }
    return pos;
  }

  /** `n` payload bytes arrived without passing through `parse` (read in place); returns what is left. */
  payloadArrived(n: number): number {
    this.payloadLeft -= n;
    return this.payloadLeft;
  }

  /** Forgets a payload in progress (the connection is closing). */
  reset(): void {
    this.payloadLeft = 0;
  }
}
