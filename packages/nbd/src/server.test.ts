import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  BlkStatus,
  MemoryBackend,
  SECTOR_SIZE,
  blkdevRead,
  blkdevWrite,
  createDiskSync,
  type BackendCapabilities,
  type Bio,
  type BlockBackend,
  type CompletionSink,
  type Disk,
} from '@blkfilter/bio';
import { FILTER_API_VERSION, FilterVerdict, attachFilter, detachFilter, registerFilter } from '@blkfilter/registry';
import { lentPayloadBuffers } from './buffer-pool.js';
import { NbdCmd, NbdCmdFlag, NbdErrno, NbdOpt, NbdRep, NbdReplyType, NbdTransmissionFlag } from './protocol.js';
import { createNbdServer, type NbdServer } from './server.js';
import { FakeSocket, RawNbd, u32 } from './test-helpers.js';

/**
 * A memory backend that holds every bio for `delayFor(bio)` ms, or until {@link SlowBackend.releaseHeld}
 * when `hold(bio)` says so, and counts concurrency.
 */
class SlowBackend implements BlockBackend {
  readonly description = 'slow memory';
  readonly sizeBytes: number;
  readonly readOnly = false;
  readonly minIoSize = 512;
  readonly capabilities: BackendCapabilities = { writeCache: true, discard: true, writeZeroes: true };
  readonly inner: MemoryBackend;
  delayFor: (bio: Bio) => number = () => 20;
  hold: (bio: Bio) => boolean = () => false;
  /** Called when a bio arrives (after it is counted). */
  onQueue: (() => void) | null = null;
  private held: Array<() => void> = [];
  active = 0;
  maxActive = 0;

  constructor(sizeBytes: number) {
    this.sizeBytes = sizeBytes;
    this.inner = new MemoryBackend({ sizeBytes });
  }

  queueBio(bio: Bio, sink: CompletionSink): void {
    this.active++;
    this.maxActive = Math.max(this.maxActive, this.active);
    const go = (): void => {
      this.active--;
      this.inner.queueBio(bio, sink);
    };
    if (this.hold(bio)) this.held.push(go);
    else setTimeout(go, this.delayFor(bio));
    this.onQueue?.();
  }

  /** Completes the bios held so far. */
  releaseHeld(): void {
    const h = this.held;
    this.held = [];
    for (const go of h) go();
  }

  async close(): Promise<void> {}
}

let seq = 0;
function disk(sizeBytes = 8 << 20, backend?: BlockBackend): Disk {
  return createDiskSync({ name: `srv${process.pid}x${seq++}`, backend: backend ?? new MemoryBackend({ sizeBytes }) });
}

// --- parser: every split --------------------------------------------------------------------

function conversation(): Buffer {
  const parts: Buffer[] = [];
  parts.push(u32(3)); // client flags: fixed newstyle, no zeroes
  const opt = (o: number, payload: Buffer): void => {
    const h = Buffer.alloc(16);
    h.write('IHAVEOPT', 0, 'latin1');
    h.writeUInt32BE(o, 8);
    h.writeUInt32BE(payload.length, 12);
    parts.push(h, payload);
  };
  const name = Buffer.from('d');
  opt(NbdOpt.LIST, Buffer.alloc(0));
  opt(NbdOpt.STRUCTURED_REPLY, Buffer.alloc(0));
  opt(99, Buffer.from('junk'));
  const q = Buffer.from('base:allocation');
  opt(NbdOpt.SET_META_CONTEXT, Buffer.concat([u32(1), name, u32(1), u32(q.length), q]));
  opt(NbdOpt.GO, Buffer.concat([u32(1), name, Buffer.from([0, 2, 0, 3, 0, 1])]));
  const req = (type: number, flags: number, cookie: number, offset: number, length: number, payload?: Buffer): void => {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeUInt32BE(cookie, 12);
    h.writeUInt32BE(offset, 20);
    h.writeUInt32BE(length, 24);
    parts.push(h);
    if (payload) parts.push(payload);
  };
  const data = Buffer.alloc(1024);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
  req(NbdCmd.WRITE, NbdCmdFlag.FUA, 1, 4096, 1024, data);
  req(NbdCmd.READ, 0, 2, 4096, 1024);
  req(NbdCmd.BLOCK_STATUS, NbdCmdFlag.REQ_ONE, 3, 0, 65536);
  req(NbdCmd.FLUSH, 0, 4, 0, 0);
  req(NbdCmd.TRIM, 0, 5, 8192, 512);
  req(NbdCmd.WRITE_ZEROES, NbdCmdFlag.NO_HOLE, 6, 4096, 512);
  req(NbdCmd.READ, 0, 7, 4096, 1024);
  req(NbdCmd.READ, 0, 8, 1 << 30, 512); // past the end: EINVAL
  req(NbdCmd.WRITE, 0, 9, 1 << 30, 512, data.subarray(0, 512)); // past the end: ENOSPC, payload skipped
  req(NbdCmd.CACHE, 0, 10, 0, 4096);
  req(NbdCmd.DISC, 0, 11, 0, 0);
  return Buffer.concat(parts);
}

async function replay(server: NbdServer, chunks: Buffer[]): Promise<Buffer> {
  const s = new FakeSocket();
  server.serveSocket(s.asSocket());
  for (const c of chunks) s.feed(c);
  for (let i = 0; i < 5 && !s.destroyed; i++) await new Promise((r) => setImmediate(r));
  expect(s.ended).toBe(true);
  return s.output();
}

/** Bytes from hex, spaces allowed: the vectors below are written by hand from doc/proto.md. */
function hex(...parts: string[]): Buffer {
  return Buffer.from(parts.join('').replace(/\s+/g, ''), 'hex');
}

/** An option reply: magic 0x3e889045565a9, option, reply type, length, payload. */
function optReply(opt: string, type: string, payload: Buffer): Buffer {
  return Buffer.concat([hex('0003e889 045565a9', opt, type, payload.length.toString(16).padStart(8, '0')), payload]);
}

/** A structured ERROR chunk (type 0x8001, DONE) for `cookie`: errno, message length, message. */
function errorChunk(cookie: string, errno: string, message: string): Buffer {
  const m = Buffer.from(message);
  return Buffer.concat([hex('668e33ef 0001 8001', cookie, (6 + m.length).toString(16).padStart(8, '0'), errno, m.length.toString(16).padStart(4, '0')), m]);
}

describe('parser', () => {
  it('answers a whole conversation with the bytes the spec prescribes, whatever the split point', async () => {
    const d = disk(1 << 20);
    const server = createNbdServer({ exports: { d: { device: d.part0, writable: true, description: 'split test' } } });
    const msg = conversation();
    const data = Buffer.alloc(1024);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
    const handshake = Buffer.concat([
      hex('4e42444d 41474943', '49484156 454f5054', '0003'), // NBDMAGIC IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES
      optReply('00000003', '00000002', Buffer.concat([hex('00000001'), Buffer.from('d'), Buffer.from('split test')])), // LIST: SERVER
      optReply('00000003', '00000001', hex('')), // LIST: ACK
      optReply('00000008', '00000001', hex('')), // STRUCTURED_REPLY: ACK
      optReply('00000063', '80000001', Buffer.from('unsupported option OPT(99)')), // option 99: ERR_UNSUP
      optReply('0000000a', '00000004', Buffer.concat([hex('00000000'), Buffer.from('base:allocation')])), // SET_META_CONTEXT: id 0
      optReply('0000000a', '00000001', hex('')),
      optReply('00000007', '00000003', Buffer.concat([hex('0001'), Buffer.from('d')])), // GO: INFO NAME
      optReply('00000007', '00000003', Buffer.concat([hex('0002'), Buffer.from('split test')])), // INFO DESCRIPTION
      optReply('00000007', '00000003', hex('0003', '00000200', '00001000', '02000000')), // INFO BLOCK_SIZE 512/4096/32M
      // INFO EXPORT: 1 MiB; HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES SEND_DF CAN_MULTI_CONN SEND_CACHE SEND_FAST_ZERO
      optReply('00000007', '00000003', hex('0000', '00000000 00100000', '0ded')),
      optReply('00000007', '00000001', hex('')), // GO: ACK
    ]);
    const simpleOk = (cookie: string): Buffer => hex('67446698 00000000', cookie);
    // Replies may come in any order (the spec lets a server answer as requests complete).
    const replies = [
      simpleOk('00000000 00000001'), // WRITE
      Buffer.concat([hex('668e33ef 0001 0001', '00000000 00000002', '00000408', '00000000 00001000'), data]), // READ: OFFSET_DATA, DONE
      hex('668e33ef 0001 0005', '00000000 00000003', '0000000c', '00000000', '00001000 00000003'), // BLOCK_STATUS: ctx 0, one hole+zero extent
      simpleOk('00000000 00000004'), // FLUSH
      simpleOk('00000000 00000005'), // TRIM
      simpleOk('00000000 00000006'), // WRITE_ZEROES
      Buffer.concat([hex('668e33ef 0001 0001', '00000000 00000007', '00000408', '00000000 00001000'), Buffer.alloc(512), data.subarray(512)]),
      errorChunk('00000000 00000008', '00000016', 'READ at 1073741824 + 512 is past the end of the export (1048576 bytes)'), // EINVAL
      errorChunk('00000000 00000009', '0000001c', 'WRITE at 1073741824 + 512 is past the end of the export (1048576 bytes)'), // ENOSPC
      simpleOk('00000000 0000000a'), // CACHE
    ];
    const check = (out: Buffer, what: string): void => {
      if (!out.subarray(0, handshake.length).equals(handshake)) throw new Error(`${what}: handshake differs from the spec's bytes`);
      let pos = handshake.length;
      const left = [...replies];
      while (left.length > 0) {
        const i = left.findIndex((r) => out.subarray(pos, pos + r.length).equals(r));
        if (i < 0) throw new Error(`${what}: bytes at ${pos} (${out.toString('hex', pos, pos + 32)}...) are none of the expected replies`);
        pos += (left[i] as Buffer).length;
        left.splice(i, 1);
      }
      if (pos !== out.length) throw new Error(`${what}: ${out.length - pos} bytes after the last reply`);
    };
    check(await replay(server, [msg]), 'in one piece');
    for (let k = 1; k < msg.length; k++) check(await replay(server, [msg.subarray(0, k), msg.subarray(k)]), `split at byte ${k} of ${msg.length}`);
    const bytewise: Buffer[] = [];
    for (let i = 0; i < msg.length; i++) bytewise.push(msg.subarray(i, i + 1));
    check(await replay(server, bytewise), 'byte by byte');
    await server.close();
    await d.remove();
  });
});

// --- protocol over TCP ----------------------------------------------------------------------

describe('server over TCP', () => {
  let server: NbdServer;
  let port: number;
  let rw: Disk;
  let ro: Disk;
  let slow: SlowBackend;
  let slowDisk: Disk;

  beforeAll(async () => {
    rw = disk(8 << 20);
    ro = disk(4 << 20);
    slow = new SlowBackend(4 << 20);
    slowDisk = disk(4 << 20, slow);
    await blkdevWrite(ro.part0, 0, Buffer.alloc(4096, 0x5a));
    server = createNbdServer({
      exports: {
        rw: { device: rw.part0, writable: true, description: 'read-write' },
        ro: { device: ro.part0, description: 'read-only' },
        slow: { device: slowDisk.part0, writable: true },
      },
      defaultExport: 'rw',
      maxInFlightRequests: 4,
    });
    const addr = await server.listen(0);
    if (addr.kind !== 'tcp') throw new Error('expected tcp');
    port = addr.port;
  });

  afterAll(async () => {
    await server.close();
    await rw.remove();
    await ro.remove();
    await slowDisk.remove();
  });

  it('lists exports, refuses unknown ones and unknown options, answers meta-context queries like qemu', async () => {
    const c = await RawNbd.connect(port);
    const hello = await c.read(18);
    expect(hello.toString('latin1', 0, 16)).toBe('NBDMAGICIHAVEOPT');
    expect(hello.readUInt16BE(16)).toBe(3);
    c.write(u32(3));
    c.option(NbdOpt.LIST);
    const list = await c.optionReplies();
    const names = list.filter((r) => r.type === NbdRep.SERVER).map((r) => r.data.toString('utf8', 4, 4 + r.data.readUInt32BE(0)));
    expect(names).toEqual(['rw', 'ro', 'slow']);
    expect(list.at(-1)?.type).toBe(NbdRep.ACK);
    c.option(NbdOpt.LIST, Buffer.from('x'));
    expect((await c.optionReplies()).at(-1)?.type).toBe(NbdRep.ERR_INVALID);
    c.option(77, Buffer.from('whatever'));
    expect((await c.optionReplies()).at(-1)?.type).toBe(NbdRep.ERR_UNSUP);
    c.option(NbdOpt.INFO, Buffer.concat([u32(4), Buffer.from('nope'), Buffer.from([0, 0])]));
    const unknown = await c.optionReplies();
    expect(unknown.at(-1)?.type).toBe(NbdRep.ERR_UNKNOWN);
    expect(unknown.at(-1)?.data.toString()).toContain('nope');
    c.option(NbdOpt.STARTTLS);
    expect((await c.optionReplies()).at(-1)?.type).toBe(NbdRep.ERR_POLICY);
    // SET before structured replies: invalid.
    const setq = (queries: string[], exp = 'rw'): Buffer =>
      Buffer.concat([u32(exp.length), Buffer.from(exp), u32(queries.length), ...queries.flatMap((q) => [u32(q.length), Buffer.from(q)])]);
    c.option(NbdOpt.SET_META_CONTEXT, setq(['base:allocation']));
    expect((await c.optionReplies()).at(-1)?.type).toBe(NbdRep.ERR_INVALID);
    const listCtx = async (queries: string[]): Promise<string[]> => {
      c.option(NbdOpt.LIST_META_CONTEXT, setq(queries));
      const r = await c.optionReplies();
      expect(r.at(-1)?.type).toBe(NbdRep.ACK);
      return r.filter((x) => x.type === NbdRep.META_CONTEXT).map((x) => x.data.toString('utf8', 4));
    };
    expect(await listCtx([])).toEqual(['base:allocation']);
    expect(await listCtx(['base:'])).toEqual(['base:allocation']);
    expect(await listCtx(['qemu:'])).toEqual([]);
    expect(await listCtx(['x-unknown:thing'])).toEqual([]);
    c.option(NbdOpt.INFO, Buffer.concat([u32(2), Buffer.from('ro'), Buffer.from([0, 2, 0, 3, 0, 1])]));
    const info = await c.optionReplies();
    expect(info.at(-1)?.type).toBe(NbdRep.ACK);
    const bs = info.find((r) => r.type === NbdRep.INFO && r.data.readUInt16BE(0) === 3)?.data as Buffer;
    expect([bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)]).toEqual([512, 4096, 32 << 20]);
    const ex = info.find((r) => r.type === NbdRep.INFO && r.data.readUInt16BE(0) === 0)?.data as Buffer;
    expect(ex.readUInt16BE(10) & NbdTransmissionFlag.READ_ONLY).toBe(NbdTransmissionFlag.READ_ONLY);
    expect(info.some((r) => r.type === NbdRep.INFO && r.data.readUInt16BE(0) === 2 && r.data.toString('utf8', 2) === 'read-only')).toBe(true);
    c.option(NbdOpt.ABORT);
    expect((await c.optionReplies()).at(-1)?.type).toBe(NbdRep.ACK);
    expect(await c.waitClosed()).toBe(true);
  });

  it('validates requests with the spec errors and keeps the connection', async () => {
    const c = await RawNbd.connect(port);
    const { size, flags } = await c.handshake({ exportName: 'ro', contexts: ['base:allocation'] });
    expect(size).toBe(4 << 20);
    expect(flags & NbdTransmissionFlag.READ_ONLY).toBeTruthy();
    expect(flags & NbdTransmissionFlag.SEND_DF).toBeTruthy();
    const ask = async (type: number, fl: number, off: number, len: number, payload?: Buffer): Promise<number> => {
      c.request(type, fl, 42, off, len, payload);
      const r = await c.reply();
      expect(r.cookie).toBe(42);
      return r.errno;
    };
    expect(await ask(NbdCmd.WRITE, 0, 0, 512, Buffer.alloc(512))).toBe(NbdErrno.EPERM);
    expect(await ask(NbdCmd.TRIM, 0, 0, 512)).toBe(NbdErrno.EPERM);
    expect(await ask(NbdCmd.WRITE_ZEROES, 0, 0, 512)).toBe(NbdErrno.EPERM);
    expect(await ask(NbdCmd.READ, 0, 4 << 20, 512)).toBe(NbdErrno.EINVAL);
    expect(await ask(NbdCmd.READ, 0, 2 ** 60, 512)).toBe(NbdErrno.EINVAL);
    expect(await ask(NbdCmd.READ, 0, 100, 512)).toBe(0); // unaligned: served (unaligned.test.ts)
    expect(await ask(NbdCmd.READ, 0, 0, (32 << 20) + 512)).toBe(NbdErrno.EINVAL); // past the end first
    expect(await ask(NbdCmd.READ, NbdCmdFlag.REQ_ONE, 0, 512)).toBe(NbdErrno.EINVAL);
    expect(await ask(42, 0, 0, 512)).toBe(NbdErrno.EINVAL);
    expect(await ask(NbdCmd.BLOCK_STATUS, 0, (4 << 20) - 512, 1024)).toBe(NbdErrno.EINVAL);
    expect(await ask(NbdCmd.BLOCK_STATUS, 0, 0, 0)).toBe(NbdErrno.EINVAL);
    expect(await ask(NbdCmd.FLUSH, 0, 0, 0)).toBe(0);
    expect(await ask(NbdCmd.CACHE, 0, 100, 1000)).toBe(0);
    // Still alive: a good read.
    c.request(NbdCmd.READ, NbdCmdFlag.DF, 7, 0, 4096);
    const r = await c.reply();
    expect(r.errno).toBe(0);
    expect(r.chunks).toHaveLength(1);
    expect(r.data?.equals(Buffer.alloc(4096, 0x5a))).toBe(true);
    // Block status: one extent per context, REQ_ONE honoured.
    c.request(NbdCmd.BLOCK_STATUS, NbdCmdFlag.REQ_ONE, 8, 1000, 5000);
    const bs = await c.reply();
    expect(bs.chunks).toHaveLength(1);
    const p = bs.chunks[0]?.payload as Buffer;
    expect(bs.chunks[0]?.type).toBe(NbdReplyType.BLOCK_STATUS);
    expect(p.length).toBe(12);
    // Only bytes 0-4095 of "ro" were written: one extent, no longer than the request, ending
    // where the data does.
    expect([p.readUInt32BE(4), p.readUInt32BE(8)]).toEqual([3096, 0]);
    c.request(NbdCmd.BLOCK_STATUS, 0, 8, 1000, 5000);
    const all = (await c.reply()).chunks[0]?.payload as Buffer;
    expect([all.readUInt32BE(4), all.readUInt32BE(8), all.readUInt32BE(12), all.readUInt32BE(16)]).toEqual([3096, 0, 1904, 3]);
    c.request(NbdCmd.DISC, 0, 9, 0, 0);
    expect(await c.waitClosed()).toBe(true);
  });

  it('uses simple replies without structured replies and EOVERFLOW/ENOSPC where the spec says', async () => {
    const c = await RawNbd.connect(port);
    const { size, flags } = await c.handshake({ exportName: '', structured: false });
    expect(size).toBe(8 << 20);
    expect(flags & NbdTransmissionFlag.SEND_DF).toBe(0);
    const data = Buffer.alloc(8192, 0x33);
    c.request(NbdCmd.WRITE, NbdCmdFlag.FUA, 1, 8192, data.length, data);
    expect((await c.reply()).errno).toBe(0);
    c.request(NbdCmd.READ, 0, 2, 8192, 8192);
    const r = await c.reply(8192);
    expect(r.chunks).toHaveLength(0);
    expect(r.data?.equals(data)).toBe(true);
    c.request(NbdCmd.WRITE, 0, 3, (8 << 20) - 512, 1024, Buffer.alloc(1024));
    expect((await c.reply()).errno).toBe(NbdErrno.ENOSPC);
    c.request(NbdCmd.WRITE_ZEROES, 0, 4, 8 << 20, 512);
    expect((await c.reply()).errno).toBe(NbdErrno.ENOSPC);
    c.request(NbdCmd.WRITE_ZEROES, NbdCmdFlag.FAST_ZERO | NbdCmdFlag.NO_HOLE, 5, 8192, 4096);
    expect((await c.reply()).errno).toBe(0);
    c.request(NbdCmd.READ, 0, 6, 8192, 4096);
    expect((await c.reply(4096)).data?.equals(Buffer.alloc(4096))).toBe(true);
    c.request(NbdCmd.BLOCK_STATUS, 0, 7, 0, 4096);
    expect((await c.reply()).errno).toBe(NbdErrno.EINVAL);
    c.close();
  });

  it('READ over the maximum payload gets EOVERFLOW with structured replies; a 32 MiB read is served', async () => {
    const big = disk(40 << 20);
    server.addExport('big', { device: big.part0 });
    const c = await RawNbd.connect(port);
    await c.handshake({ exportName: 'big' });
    c.request(NbdCmd.READ, 0, 1, 0, (32 << 20) + 512);
    expect((await c.reply()).errno).toBe(NbdErrno.EOVERFLOW);
    // Nothing written: one hole chunk instead of 32 MiB of zeros ...
    c.request(NbdCmd.READ, 0, 2, 0, 32 << 20);
    const r = await c.reply();
    expect(r.errno).toBe(0);
    expect(r.chunks).toHaveLength(1);
    expect(r.chunks[0]?.type).toBe(NbdReplyType.OFFSET_HOLE);
    expect(r.chunks[0]?.payload.readUInt32BE(8)).toBe(32 << 20);
    // ... and with DF (one content chunk) the zeros themselves.
    c.request(NbdCmd.READ, NbdCmdFlag.DF, 3, 0, 32 << 20);
    const df = await c.reply();
    expect(df.errno).toBe(0);
    expect(df.chunks).toHaveLength(1);
    expect(df.data?.length).toBe(32 << 20);
    c.close();
    server.removeExport('big');
    await big.remove();
  });

  it('disconnects a client that breaks the protocol and keeps serving the others', async () => {
    const good = await RawNbd.connect(port);
    await good.handshake({ exportName: 'rw' });
    const bad = await RawNbd.connect(port);
    await bad.handshake({ exportName: 'rw' });
    bad.request(NbdCmd.READ, 0, 1, 0, 512, undefined, 0xdeadbeef);
    expect(await bad.waitClosed()).toBe(true);
    const big = await RawNbd.connect(port);
    await big.handshake({ exportName: 'rw' });
    big.request(NbdCmd.WRITE, 0, 1, 0, 0x7fffffff);
    const r = await big.reply();
    expect(r.errno).toBe(NbdErrno.EINVAL);
    expect(await big.waitClosed()).toBe(true);
    const garbage = await RawNbd.connect(port);
    await garbage.read(18);
    garbage.write(Buffer.from('GET / HTTP/1.1\r\n\r\n'));
    expect(await garbage.waitClosed()).toBe(true);
    good.request(NbdCmd.READ, 0, 5, 0, 512);
    expect((await good.reply()).errno).toBe(0);
    good.close();
  });

  it('answers pipelined requests out of order as they complete, and limits requests in flight', async () => {
    // Sectors 0..7 are held until the other read is answered: the replies must come reversed.
    slow.hold = (bio) => bio.sector < 8;
    slow.delayFor = () => 0;
    slow.maxActive = 0;
    const c = await RawNbd.connect(port);
    await c.handshake({ exportName: 'slow' });
    c.request(NbdCmd.READ, 0, 1, 0, 4096);
    c.request(NbdCmd.READ, 0, 2, 65536, 4096);
    const first = await c.reply();
    slow.releaseHeld();
    const second = await c.reply();
    expect([first.cookie, second.cookie]).toEqual([2, 1]);
    slow.hold = () => false;
    // 40 requests pipelined against a limit of 4 in flight.
    slow.delayFor = () => 3;
    for (let i = 0; i < 40; i++) c.request(NbdCmd.READ, 0, 100 + i, i * 4096, 4096);
    const seen = new Set<number>();
    for (let i = 0; i < 40; i++) seen.add((await c.reply()).cookie);
    expect(seen.size).toBe(40);
    expect(slow.maxActive).toBeLessThanOrEqual(4);
    expect(slow.maxActive).toBeGreaterThan(1);
    c.close();
  });

  it('lets a filter attached through the registry see every NBD write', async () => {
    const seen: Array<[number, number, number]> = [];
    registerFilter({
      name: `nbd-test-spy-${process.pid}`,
      apiVersion: FILTER_API_VERSION,
      defaultAltitude: 50,
      attach() {
        const spy = (bio: Bio): FilterVerdict => {
          seen.push([bio.op, bio.sector, bio.size]);
          return FilterVerdict.PASS;
        };
        return { write: spy, discard: spy, writeZeroes: spy };
      },
    });
    await attachFilter(rw.part0.name, `nbd-test-spy-${process.pid}`);
    const c = await RawNbd.connect(port);
    await c.handshake({ exportName: 'rw' });
    c.request(NbdCmd.WRITE, 0, 1, 65536, 4096, Buffer.alloc(4096, 1));
    c.request(NbdCmd.TRIM, 0, 2, 131072, 8192);
    c.request(NbdCmd.WRITE_ZEROES, 0, 3, 262144, 4096);
    for (let i = 0; i < 3; i++) expect((await c.reply()).errno).toBe(0);
    c.close();
    await detachFilter(rw.part0.name, `nbd-test-spy-${process.pid}`);
    expect(seen).toEqual([
      [1, 65536 / SECTOR_SIZE, 4096],
      [3, 131072 / SECTOR_SIZE, 8192],
      [9, 262144 / SECTOR_SIZE, 4096],
    ]);
  });

  it('maps backend failures to NBD errors', async () => {
    const failing: BlockBackend = {
      description: 'failing',
      sizeBytes: 1 << 20,
      readOnly: false,
      minIoSize: 512,
      capabilities: { writeCache: false, discard: false, writeZeroes: false },
      queueBio(bio, sink) {
        sink.complete(bio, bio.op === 1 ? BlkStatus.NOSPC : BlkStatus.IOERR);
      },
      async close() {},
    };
    const d = disk(1 << 20, failing);
    server.addExport('failing', { device: d.part0, writable: true });
    const c = await RawNbd.connect(port);
    await c.handshake({ exportName: 'failing' });
    c.request(NbdCmd.WRITE, 0, 1, 0, 512, Buffer.alloc(512));
    expect((await c.reply()).errno).toBe(NbdErrno.ENOSPC);
    c.request(NbdCmd.READ, 0, 2, 0, 512);
    const r = await c.reply();
    expect(r.errno).toBe(NbdErrno.EIO);
    expect(r.chunks[0]?.type).toBe(NbdReplyType.ERROR);
    // No WRITE_ZEROES below and FAST_ZERO: ENOTSUP at once; without it, zeros are written (and fail here).
    c.request(NbdCmd.WRITE_ZEROES, NbdCmdFlag.FAST_ZERO, 3, 0, 512);
    expect((await c.reply()).errno).toBe(NbdErrno.ENOTSUP);
    c.request(NbdCmd.TRIM, 0, 4, 0, 512);
    expect((await c.reply()).errno).toBe(0); // advisory, no discard below: ignored
    c.close();
    server.removeExport('failing');
    await d.remove();
  });
});

describe('lifecycle', () => {
  it('close() lets requests in flight finish, then hangs up; nothing is left behind', async () => {
    const slowB = new SlowBackend(1 << 20);
    slowB.delayFor = () => 100;
    const d = disk(1 << 20, slowB);
    await blkdevWrite(d.part0, 0, Buffer.alloc(4096, 9));
    const lentBefore = lentPayloadBuffers();
    const server = createNbdServer({ exports: { d: { device: d.part0 } } });
    const addr = await server.listen({ port: 0 });
    const port = addr.kind === 'tcp' ? addr.port : 0;
    // Many short connections first: none may stay behind.
    for (let i = 0; i < 20; i++) {
      const c = await RawNbd.connect(port);
      await c.handshake({ exportName: 'd' });
      c.request(NbdCmd.DISC, 0, 1, 0, 0);
      await c.waitClosed();
    }
    const c = await RawNbd.connect(port);
    await c.handshake({ exportName: 'd' });
    // Close once the read is at the backend: it is in flight and must still be answered.
    const atBackend = new Promise<void>((resolve) => {
      slowB.onQueue = resolve;
    });
    c.request(NbdCmd.READ, 0, 1, 0, 4096);
    await atBackend;
    const closing = server.close();
    const reply = await c.reply();
    expect(reply.errno).toBe(0);
    expect(reply.data?.equals(Buffer.alloc(4096, 9))).toBe(true);
    expect(await c.waitClosed()).toBe(true);
    await closing;
    expect(server.connectionCount).toBe(0);
    // Every payload and reply-batch buffer the connections took went back to the pool.
    expect(lentPayloadBuffers()).toBe(lentBefore);
    await expect(RawNbd.connect(port)).rejects.toThrow();
    expect((await blkdevRead(d.part0, 0, 512)).equals(Buffer.alloc(512, 9))).toBe(true);
    await d.remove();
  });
});

describe('payload buffers', () => {
  it('every buffer a connection takes goes back to the pool, whatever way its requests end', async () => {
    const d = disk(4 << 20);
    const before = lentPayloadBuffers();
    const server = createNbdServer({ exports: { d: { device: d.part0, writable: true } } });
    const addr = await server.listen({ port: 0 });
    const port = addr.kind === 'tcp' ? addr.port : 0;
    const c = await RawNbd.connect(port);
    await c.handshake({ exportName: 'd' });
    c.request(NbdCmd.WRITE, 0, 1, 0, 8192, Buffer.alloc(8192, 7)); // payload buffer
    c.request(NbdCmd.WRITE, 0, 2, 1000, 100, Buffer.alloc(100, 8)); // unaligned: read-modify-write blocks
    c.request(NbdCmd.READ, 0, 3, 0, 4096); // copied into a reply batch
    c.request(NbdCmd.READ, 0, 4, 0, 256 << 10); // written from its own buffer
    c.request(NbdCmd.READ, 0, 5, 100, 1000); // unaligned: bounce through the covering blocks
    c.request(NbdCmd.READ, 0, 6, 8 << 20, 512); // refused
    c.request(NbdCmd.WRITE, 0, 7, 8 << 20, 512, Buffer.alloc(512)); // refused, payload dropped
    const errnos = new Map<number, number>();
    for (let i = 0; i < 7; i++) {
      const r = await c.reply();
      errnos.set(r.cookie, r.errno);
    }
    expect([...errnos.entries()].sort((a, b) => a[0] - b[0])).toEqual([[1, 0], [2, 0], [3, 0], [4, 0], [5, 0], [6, NbdErrno.EINVAL], [7, NbdErrno.ENOSPC]]);
    c.close();
    // A client that vanishes in the middle of a WRITE payload.
    const v = await RawNbd.connect(port);
    await v.handshake({ exportName: 'd' });
    const base = lentPayloadBuffers();
    v.request(NbdCmd.WRITE, 0, 1, 0, 65536, Buffer.alloc(1000));
    // Vanish once the server took a buffer for the payload (the other client's can only go back).
    while (lentPayloadBuffers() <= base) await new Promise((r) => setImmediate(r));
    v.close();
    await server.close();
    expect(server.connectionCount).toBe(0);
    expect(lentPayloadBuffers()).toBe(before);
    await d.remove();
  });
});
