// The wire codec against byte vectors written by hand from NetworkBlockDevice/nbd doc/proto.md
// (never produced by the encoder under test), fed whole, split at every byte, and byte by byte.
import { describe, expect, it } from 'vitest';
import {
  ReplyHeader,
  RequestParser,
  decodeOptionReply,
  decodeReply,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  encodeSimpleReply,
  encodeStructuredReply,
  type RequestHeader,
  type RequestSink,
} from './wire.js';

function hex(...parts: string[]): Buffer {
  return Buffer.from(parts.join('').replace(/\s+/g, ''), 'hex');
}

// C: 32 bits magic 0x25609513, 16 bits flags, 16 bits type, 64 bits cookie, 64 bits offset,
// 32 bits length, then a WRITE's payload.
const READ_FUA = hex('25609513', '0001', '0000', '01020304 05060708', '00000001 00000200', '00001000');
const WRITE = hex('25609513', '0000', '0001', 'deadbeef 00000007', '00000000 00100000', '00000005', '68656c6c6f'); // "hello"
const TRIM_HIGH = hex('25609513', '0000', '0004', '00000000 00000009', '001fffff fffff000', '00000200'); // offset 2^53 - 4096
const DISC = hex('25609513', '0000', '0002', '00000000 00000000', '00000000 00000000', '00000000');
const STREAM = Buffer.concat([READ_FUA, WRITE, TRIM_HIGH, DISC]);

interface Seen {
  magic: number;
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offHi: number;
  offset: number;
  length: number;
  payload: string;
}

const EXPECTED: Seen[] = [
  { magic: 0x25609513, flags: 1, type: 0, cookieHi: 0x01020304, cookieLo: 0x05060708, offHi: 1, offset: 2 ** 32 + 512, length: 4096, payload: '' },
  { magic: 0x25609513, flags: 0, type: 1, cookieHi: 0xdeadbeef, cookieLo: 7, offHi: 0, offset: 1 << 20, length: 5, payload: 'hello' },
  { magic: 0x25609513, flags: 0, type: 4, cookieHi: 0, cookieLo: 9, offHi: 0x1fffff, offset: 2 ** 53 - 4096, length: 512, payload: '' },
  { magic: 0x25609513, flags: 0, type: 2, cookieHi: 0, cookieLo: 0, offHi: 0, offset: 0, length: 0, payload: '' },
];

/** A sink that records every request and its payload; WRITE (type 1) carries its length. */
class Recorder implements RequestSink {
  readonly seen: Seen[] = [];
  /** Requests accepted before requestReady says no (flow control). */
  limit = Infinity;
  requestReady(): boolean {
    return this.seen.length < this.limit;
  }
  request(h: RequestHeader): number {
    this.seen.push({ magic: h.magic, flags: h.flags, type: h.type, cookieHi: h.cookieHi, cookieLo: h.cookieLo, offHi: h.offHi, offset: h.offset, length: h.length, payload: '' });
    return h.type === 1 ? h.length : 0;
  }
  requestPayload(src: Buffer, pos: number, n: number, last: boolean): void {
    const r = this.seen[this.seen.length - 1] as Seen;
    r.payload += src.toString('latin1', pos, pos + n);
    if (last) expect(r.payload.length).toBe(r.length);
  }
}

/** Feeds `chunks` the way a connection does: the unparsed tail is kept and fed again with more. */
function parseChunks(chunks: Buffer[], sink: Recorder, parser = new RequestParser()): number {
  let pending: Buffer = Buffer.alloc(0);
  for (const c of chunks) {
    const buf = pending.length > 0 ? Buffer.concat([pending, c]) : c;
    const used = parser.parse(buf, 0, buf.length, sink);
    pending = buf.subarray(used);
  }
  return pending.length;
}

describe('RequestParser', () => {
  it('decodes hand-written request headers and payloads, whatever the split', () => {
    const whole = new Recorder();
    expect(parseChunks([STREAM], whole)).toBe(0);
    expect(whole.seen).toEqual(EXPECTED);
    for (let k = 0; k <= STREAM.length; k++) {
      const r = new Recorder();
      const left = parseChunks([STREAM.subarray(0, k), STREAM.subarray(k)], r);
      if (left !== 0 || JSON.stringify(r.seen) !== JSON.stringify(EXPECTED)) throw new Error(`split at byte ${k}: ${JSON.stringify(r.seen)}`);
    }
    const bytes: Buffer[] = [];
    for (let i = 0; i < STREAM.length; i++) bytes.push(STREAM.subarray(i, i + 1));
    const r = new Recorder();
    expect(parseChunks(bytes, r)).toBe(0);
    expect(r.seen).toEqual(EXPECTED);
  });

  it('stops before a header when the sink is not ready, and resumes where it stopped', () => {
    const r = new Recorder();
    r.limit = 1;
    const parser = new RequestParser();
    const used = parser.parse(STREAM, 0, STREAM.length, r);
    expect(used).toBe(READ_FUA.length);
    r.limit = Infinity;
    expect(parser.parse(STREAM, used, STREAM.length, r)).toBe(STREAM.length);
    expect(r.seen).toEqual(EXPECTED);
  });
});

describe('serializer', () => {
  it('encodes requests and replies as the spec lays them out', () => {
    const req = Buffer.alloc(28);
    encodeRequest(req, 0, 1, 0, 0x01020304, 0x05060708, 2 ** 32 + 512, 4096);
    expect(req).toEqual(READ_FUA);
    // S: 32 bits 0x67446698, 32 bits error, 64 bits cookie.
    const simple = Buffer.alloc(16);
    encodeSimpleReply(simple, 0, 5, 0x01020304, 0x05060708);
    expect(simple).toEqual(hex('67446698', '00000005', '01020304 05060708'));
    // S: 32 bits 0x668e33ef, 16 bits flags, 16 bits type, 64 bits cookie, 32 bits length.
    const chunk = Buffer.alloc(24);
    chunk.fill(0xee);
    encodeStructuredReply(chunk, 2, 1, 0x8001, 0xdeadbeef, 7, 12);
    expect(chunk).toEqual(hex('eeee', '668e33ef', '0001', '8001', 'deadbeef 00000007', '0000000c', 'eeee'));
    // C: IHAVEOPT, 32 bits option, 32 bits length, data.
    expect(encodeOption(7, hex('616263'))).toEqual(hex('49484156 454f5054', '00000007', '00000003', '616263'));
    expect(encodeOption(3, null)).toEqual(hex('49484156 454f5054', '00000003', '00000000'));
    // S: 64 bits 0x3e889045565a9, 32 bits option, 32 bits reply type, 32 bits length, data.
    expect(encodeOptionReply(6, 0x80000006, hex('6e6f'))).toEqual(hex('0003e889 045565a9', '00000006', '80000006', '00000002', '6e6f'));
  });

  it('decodes hand-written reply headers only once they are whole', () => {
    const simple = hex('67446698', '0000001c', '00000001 00000002');
    const structured = hex('668e33ef', '0001', '0005', 'ffffffff 00000003', '00000010');
    const h = new ReplyHeader();
    for (let n = 0; n < simple.length; n++) expect(decodeReply(simple, 0, n, h)).toBe(0);
    expect(decodeReply(simple, 0, simple.length, h)).toBe(16);
    expect({ ...h }).toEqual({ structured: false, errno: 28, flags: 0, type: 0, cookieHi: 1, cookieLo: 2, length: 0 });
    for (let n = 0; n < structured.length; n++) expect(decodeReply(structured, 0, n, h)).toBe(0);
    expect(decodeReply(structured, 0, structured.length, h)).toBe(20);
    expect({ ...h }).toEqual({ structured: true, errno: 0, flags: 1, type: 5, cookieHi: 0xffffffff, cookieLo: 3, length: 16 });
    expect(decodeReply(hex('25609513', '00000000 00000000 00000000'), 0, 16, h)).toBe(-1);
    expect(decodeOptionReply(hex('0003e889 045565a9', '00000007', '80000001', '00000004'), 0)).toEqual({ opt: 7, type: 0x80000001, length: 4 });
    expect(decodeOptionReply(hex('0003e889 045565aa', '00000007', '80000001', '00000004'), 0)).toBeNull();
  });
});
