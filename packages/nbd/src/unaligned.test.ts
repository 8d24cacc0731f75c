// Requests that ignore the minimum block size: bounced READs and read-modify-write, as qemu-nbd.
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  BlkStatus,
  MemoryBackend,
  ReqFlag,
  ReqOp,
  blkdevRead,
  blkdevWrite,
  createDiskSync,
  type BackendCapabilities,
  type Bio,
  type BlockBackend,
  type CompletionSink,
  type Disk,
} from '@blkfilter/bio';
import { NbdCmd, NbdCmdFlag, NbdErrno, NbdReplyType } from './protocol.js';
import { createNbdServer, type NbdServer } from './server.js';
import { RawNbd } from './test-helpers.js';

interface Seen {
  readonly op: number;
  readonly offset: number;
  readonly size: number;
  readonly flags: number;
}

/**
 * A memory backend that records every bio, holds each for `delayMs` (so that concurrent
 * requests really overlap), can fail reads of one range, and may lack WRITE_ZEROES.
 */
class RecordingBackend implements BlockBackend {
  readonly description = 'recording memory';
  readonly sizeBytes: number;
  readonly readOnly = false;
  readonly minIoSize = 512;
  readonly capabilities: BackendCapabilities;
  readonly inner: MemoryBackend;
  readonly seen: Seen[] = [];
  delayMs = 0;
  failReadsAt = -1;

  constructor(sizeBytes: number, writeZeroes = true) {
    this.sizeBytes = sizeBytes;
    this.inner = new MemoryBackend({ sizeBytes });
    this.capabilities = { writeCache: true, discard: true, writeZeroes };
  }

  queueBio(bio: Bio, sink: CompletionSink): void {
    this.seen.push({ op: bio.op, offset: bio.sector * 512, size: bio.size, flags: bio.flags });
    const go = (): void => {
      if (bio.op === ReqOp.READ && this.failReadsAt >= bio.sector * 512 && this.failReadsAt < bio.sector * 512 + bio.size) {
        sink.complete(bio, BlkStatus.IOERR);
        return;
      }
      this.inner.queueBio(bio, sink);
    };
    if (this.delayMs > 0) setTimeout(go, this.delayMs);
    else go();
  }

  async close(): Promise<void> {}
}

const SIZE = 1 << 20;
let seq = 0;
let server: NbdServer;
let port = 0;
const disks: Disk[] = [];
const clients: RawNbd[] = [];

beforeAll(async () => {
  server = createNbdServer();
  const addr = await server.listen(0);
  if (addr.kind !== 'tcp') throw new Error('expected a TCP address');
  port = addr.port;
});

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const d of disks.splice(0)) await d.remove().catch(() => undefined);
});

afterAll(async () => {
  await server.close();
});

/** A fresh export over a recording backend, filled with 0x55; returns it and a connected client. */
async function setup(
  options: { lbs?: 512 | 4096; writeZeroes?: boolean; structured?: boolean } = {},
): Promise<{ backend: RecordingBackend; disk: Disk; c: RawNbd; name: string }> {
  const backend = new RecordingBackend(SIZE, options.writeZeroes ?? true);
  const disk = createDiskSync({ name: `unal${process.pid}x${seq++}`, backend, logicalBlockSize: options.lbs ?? 512 });
  disks.push(disk);
  await blkdevWrite(disk.part0, 0, Buffer.alloc(SIZE, 0x55));
  const name = disk.name;
  server.addExport(name, { device: disk.part0, writable: true });
  const c = await connect(name, options.structured);
  backend.seen.length = 0;
  return { backend, disk, c, name };
}

async function connect(name: string, structured = true): Promise<RawNbd> {
  const c = await RawNbd.connect(port);
  clients.push(c);
  await c.handshake({ exportName: name, structured });
  return c;
}

/** What the device holds in [offset, offset + length). */
async function bytes(disk: Disk, offset: number, length: number): Promise<Buffer> {
  const lbs = disk.limits.logicalBlockSize;
  const start = Math.floor(offset / lbs) * lbs;
  const end = Math.ceil((offset + length) / lbs) * lbs;
  const all = Buffer.from(await blkdevRead(disk.part0, start, end - start));
  return all.subarray(offset - start, offset - start + length);
}

/** The device's bytes as runs: [offset, length, byte] for each run of one value. */
async function runs(disk: Disk, offset: number, length: number): Promise<Array<[number, number, number]>> {
  const b = await bytes(disk, offset, length);
  const out: Array<[number, number, number]> = [];
  for (let i = 0; i < b.length; ) {
    let j = i;
    while (j < b.length && b[j] === b[i]) j++;
    out.push([offset + i, j - i, b[i] as number]);
    i = j;
  }
  return out;
}

describe.each([512, 4096] as const)('unaligned requests on a %i-byte block export', (lbs) => {
  it('READ returns exactly the bytes asked for, with structured and simple replies', async () => {
    for (const structured of [true, false]) {
      const { disk, c } = await setup({ lbs, structured });
      const pattern = Buffer.alloc(3 * lbs);
      for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 7 + 3) & 0xff;
      await blkdevWrite(disk.part0, lbs, pattern);
      for (const [off, len] of [
        [lbs + 1, 1],
        [lbs + 1, 513],
        [2 * lbs - 1, 2],
        [lbs + 17, 3 * lbs - 34],
        [lbs, lbs + 1],
        [1, 40 << 10], // larger than the batched-reply size: written from its own buffer
      ] as const) {
        c.request(NbdCmd.READ, 0, 9, off, len);
        const r = await c.reply(len);
        expect(r.errno).toBe(0);
        if (structured) expect(r.chunks.map((k) => k.type)).toEqual([NbdReplyType.OFFSET_DATA]);
        expect(Buffer.from(r.data as Buffer).equals(await bytes(disk, off, len))).toBe(true);
      }
    }
  });

  it('WRITE merges into the partial blocks; the neighbours are untouched; FUA reaches every write', async () => {
    const { disk, backend, c } = await setup({ lbs });
    // qemu-io's `write -P 0xab 1 513`: one or two partial blocks.
    c.request(NbdCmd.WRITE, 0, 1, 1, 513, Buffer.alloc(513, 0xab));
    expect((await c.reply()).errno).toBe(0);
    expect(await runs(disk, 0, 2 * lbs)).toEqual([
      [0, 1, 0x55],
      [1, 513, 0xab],
      [514, 2 * lbs - 514, 0x55],
    ]);
    // Head, whole middle blocks and tail, with FUA.
    backend.seen.length = 0;
    const off = 4 * lbs + 100;
    const len = 3 * lbs;
    c.request(NbdCmd.WRITE, NbdCmdFlag.FUA, 2, off, len, Buffer.alloc(len, 0xcd));
    expect((await c.reply()).errno).toBe(0);
    const seen = backend.seen.splice(0);
    expect(await runs(disk, 4 * lbs, 5 * lbs)).toEqual([
      [4 * lbs, 100, 0x55],
      [off, len, 0xcd],
      [off + len, 8 * lbs - off - len + lbs, 0x55],
    ]);
    const reads = seen.filter((s) => s.op === ReqOp.READ);
    const writes = seen.filter((s) => s.op === ReqOp.WRITE);
    // Only the partial blocks are read; every byte written is inside the covering blocks.
    expect(reads.map((s) => [s.offset, s.size]).sort((a, b) => (a[0] as number) - (b[0] as number))).toEqual([
      [4 * lbs, lbs],
      [7 * lbs, lbs],
    ]);
    expect(writes.reduce((n, s) => n + s.size, 0)).toBe(4 * lbs);
    expect(writes.every((s) => (s.flags & ReqFlag.FUA) !== 0)).toBe(true);
    // Aligned requests still go straight through: one bio, nothing read.
    backend.seen.length = 0;
    c.request(NbdCmd.WRITE, 0, 3, lbs, lbs, Buffer.alloc(lbs, 1));
    expect((await c.reply()).errno).toBe(0);
    expect(backend.seen).toEqual([{ op: ReqOp.WRITE, offset: lbs, size: lbs, flags: 0 }]);
  });

  it('WRITE_ZEROES zeroes exactly its range, with or without WRITE_ZEROES below', async () => {
    for (const writeZeroes of [true, false]) {
      const { disk, backend, c } = await setup({ lbs, writeZeroes });
      const off = lbs - 3;
      const len = 2 * lbs + 6;
      c.request(NbdCmd.WRITE_ZEROES, NbdCmdFlag.NO_HOLE | NbdCmdFlag.FUA, 1, off, len);
      expect((await c.reply()).errno).toBe(0);
      const seen = backend.seen.splice(0);
      expect(await runs(disk, 0, 4 * lbs)).toEqual([
        [0, off, 0x55],
        [off, len, 0],
        [off + len, 4 * lbs - off - len, 0x55],
      ]);
      const middle = seen.find((s) => s.offset === lbs && s.size === 2 * lbs);
      if (writeZeroes) expect(middle).toMatchObject({ op: ReqOp.WRITE_ZEROES, flags: ReqFlag.FUA | ReqFlag.NOUNMAP });
      else expect(middle).toMatchObject({ op: ReqOp.WRITE, flags: ReqFlag.FUA });
      // Within one block.
      c.request(NbdCmd.WRITE_ZEROES, 0, 2, 5 * lbs + 5, 10);
      expect((await c.reply()).errno).toBe(0);
      expect(await runs(disk, 5 * lbs, lbs)).toEqual([
        [5 * lbs, 5, 0x55],
        [5 * lbs + 5, 10, 0],
        [5 * lbs + 15, lbs - 15, 0x55],
      ]);
      // FAST_ZERO: fine over WRITE_ZEROES (two partial blocks at most), refused without it.
      c.request(NbdCmd.WRITE_ZEROES, NbdCmdFlag.FAST_ZERO, 3, 7 * lbs + 1, 10);
      expect((await c.reply()).errno).toBe(writeZeroes ? 0 : NbdErrno.ENOTSUP);
    }
  });

  it('TRIM ignores partial blocks and CACHE rounds outward, as before', async () => {
    const { backend, c } = await setup({ lbs });
    c.request(NbdCmd.TRIM, 0, 1, 1, lbs);
    expect((await c.reply()).errno).toBe(0);
    c.request(NbdCmd.TRIM, 0, 2, 1, 3 * lbs);
    expect((await c.reply()).errno).toBe(0);
    c.request(NbdCmd.CACHE, 0, 3, 1, 2);
    expect((await c.reply()).errno).toBe(0);
    expect(backend.seen).toEqual([
      { op: ReqOp.DISCARD, offset: lbs, size: 2 * lbs, flags: 0 },
      { op: ReqOp.READ, offset: 0, size: lbs, flags: 0 },
    ]);
  });

  it('two connections writing different bytes of the same blocks at once lose none of them', async () => {
    const { disk, backend, name } = await setup({ lbs });
    backend.delayMs = 2;
    const a = await connect(name);
    const b = await connect(name);
    const blocks = 4;
    const pieces = 16;
    const step = lbs / pieces;
    // Piece j of every block from connection j % 2, all in flight together; the last one of
    // each block straddles into the next, so locks over two blocks are taken too.
    for (let j = 0; j < pieces; j++) {
      const c = j % 2 === 0 ? a : b;
      for (let k = 0; k < blocks; k++) {
        const len = j === pieces - 1 && k < blocks - 1 ? step : step - 1;
        c.request(NbdCmd.WRITE, 0, k * pieces + j, k * lbs + j * step + 1, len, Buffer.alloc(len, j + 1));
      }
    }
    const replies = async (c: RawNbd): Promise<number[]> => {
      const errnos: number[] = [];
      for (let i = 0; i < (blocks * pieces) / 2; i++) errnos.push((await c.reply()).errno);
      return errnos;
    };
    expect(new Set((await Promise.all([replies(a), replies(b)])).flat())).toEqual(new Set([0]));
    // They did overlap: several requests were held by the backend at once.
    expect(backend.seen.length).toBeGreaterThan(blocks * pieces);
    const got = await bytes(disk, 0, blocks * lbs);
    for (let k = 0; k < blocks; k++) {
      for (let j = 0; j < pieces; j++) {
        const at = k * lbs + j * step;
        expect(got[at], `byte ${at}`).toBe(k > 0 && j === 0 ? pieces : 0x55);
        expect(got.subarray(at + 1, at + step).equals(Buffer.alloc(step - 1, j + 1)), `piece ${j} of block ${k}`).toBe(true);
      }
    }
  });

  it('a failed read of a partial block fails the request with EIO and frees its blocks', async () => {
    const { disk, backend, c } = await setup({ lbs });
    backend.failReadsAt = 2 * lbs + 1;
    c.request(NbdCmd.WRITE, 0, 1, 2 * lbs + 1, 10, Buffer.alloc(10, 0xee));
    const r = await c.reply();
    expect(r.errno).toBe(NbdErrno.EIO);
    expect(r.chunks[0]?.type).toBe(NbdReplyType.ERROR);
    expect(backend.seen.filter((s) => s.op === ReqOp.WRITE)).toEqual([]);
    // The lock was released: the next write to that block goes through.
    backend.failReadsAt = -1;
    expect(await runs(disk, 2 * lbs, lbs)).toEqual([[2 * lbs, lbs, 0x55]]);
    c.request(NbdCmd.WRITE, 0, 2, 2 * lbs + 1, 10, Buffer.alloc(10, 0xee));
    expect((await c.reply()).errno).toBe(0);
    expect(await runs(disk, 2 * lbs, 12)).toEqual([
      [2 * lbs, 1, 0x55],
      [2 * lbs + 1, 10, 0xee],
      [2 * lbs + 11, 1, 0x55],
    ]);
  });
});
