import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { MemoryBackend, blkdevRead, createDiskSync, type Disk } from '@blkfilter/bio';
import { getPayloadBuffer, lentPayloadBuffers, putPayloadBuffer } from './buffer-pool.js';
import { adoptSocket } from './direct-read.js';
import { NbdCmd } from './protocol.js';
import { createNbdServer, type NbdServer } from './server.js';
import { RawNbd } from './test-helpers.js';
import { rawRequest } from './testing.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let seq = 0;
const cleanup: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});

async function serve(options: { directPayload?: boolean; sizeBytes?: number } = {}): Promise<{ server: NbdServer; disk: Disk; port: number }> {
  const disk = createDiskSync({ name: `direct${process.pid}x${seq++}`, backend: new MemoryBackend({ sizeBytes: options.sizeBytes ?? 16 * MiB }) });
  const server = createNbdServer({
    exports: { d: { device: disk.part0, writable: true } },
    ...(options.directPayload !== undefined ? { directPayload: options.directPayload } : {}),
  });
  const addr = await server.listen({ port: 0 });
  cleanup.push(async () => {
    await server.close({ timeoutMs: 2000 });
    await disk.remove();
  });
  return { server, disk, port: addr.kind === 'tcp' ? addr.port : 0 };
}

/** A deterministic byte pattern that differs per write. */
function pattern(len: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(len);
  let x = seed * 2654435761 + 1;
  for (let i = 0; i < len; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

/** Small PRNG for the cut points, so that a failure reproduces. */
function cuts(seed: number): () => number {
  let x = seed;
  return () => {
    x = (x * 1103515245 + 12345) >>> 0;
    return x;
  };
}

// WRITEs of these sizes at these offsets: small ones (copied), large ones (read in place), an
// unaligned one (read-modify-write on the buffer read in place), back to back in one stream.
const WRITES: ReadonlyArray<readonly [offset: number, length: number]> = [
  [0, 4 * KiB],
  [64 * KiB, 40 * KiB],
  [1 * MiB, 1 * MiB],
  [3 * MiB, 3 * MiB + 512],
  [8 * MiB + 100, 70_000],
  [9 * MiB, 32 * KiB],
  [10 * MiB, 33 * KiB],
  [12 * MiB, 2 * MiB],
];

async function writeAllAndCheck(server: NbdServer, disk: Disk, port: number, seed: number): Promise<void> {
  const c = await RawNbd.connect(port);
  await c.handshake({ exportName: 'd', structured: false });
  const parts: Buffer[] = [];
  WRITES.forEach(([offset, length], i) => {
    parts.push(rawRequest(NbdCmd.WRITE, 0, i + 1, offset, length), pattern(length, seed + i));
  });
  const stream = Buffer.concat(parts);
  // Cut the stream at random points and let each piece arrive on its own, so that headers,
  // payload starts and payload ends land anywhere in a read.
  const next = cuts(seed);
  for (let pos = 0; pos < stream.length; ) {
    const n = 1 + (next() % (300 * KiB));
    c.write(stream.subarray(pos, pos + n));
    pos += n;
    if (next() % 3 === 0) await sleep(1);
  }
  const cookies = new Set<number>();
  for (let i = 0; i < WRITES.length; i++) {
    const r = await c.reply();
    expect(r.errno).toBe(0);
    cookies.add(r.cookie);
  }
  expect(cookies.size).toBe(WRITES.length);
  for (const [i, [offset, length]] of WRITES.entries()) {
    // Read the covering blocks: the unaligned write's range is not whole blocks.
    const start = Math.floor(offset / 512) * 512;
    const got = await blkdevRead(disk.part0, start, Math.ceil((offset + length) / 512) * 512 - start);
    const at = offset - start;
    expect(Buffer.compare(got.subarray(at, at + length), pattern(length, seed + i)), `write ${i} (${length} bytes at ${offset})`).toBe(0);
  }
  c.disconnect();
  await c.waitClosed();
  void server;
}

describe('direct payload reads', () => {
  it('reads WRITE payloads straight into their buffers, wherever the stream is cut', async () => {
    const lent = lentPayloadBuffers();
    const { server, disk, port } = await serve();
    for (const seed of [1, 2, 3]) await writeAllAndCheck(server, disk, port, seed);
    // Most payload bytes of the large writes arrived in place; none of the small ones could.
    const large = WRITES.reduce((sum, [, length]) => sum + (length >= 64 * KiB ? length : 0), 0);
    expect(server.directPayloadBytes).toBeGreaterThan(large);
    expect(lentPayloadBuffers()).toBe(lent);
  });

  it('copies every payload with directPayload: false, with the same result', async () => {
    const { server, disk, port } = await serve({ directPayload: false });
    await writeAllAndCheck(server, disk, port, 7);
    expect(server.directPayloadBytes).toBe(0);
  });

  it('never pools a buffer the socket may still read into when the connection closes mid-payload', async () => {
    const lent = lentPayloadBuffers();
    const { server, port } = await serve();
    const c = await RawNbd.connect(port);
    await c.handshake({ exportName: 'd', structured: false });
    c.write(rawRequest(NbdCmd.WRITE, 0, 1, 0, MiB));
    c.write(Buffer.alloc(100, 0x11));
    await sleep(20);
    c.write(Buffer.alloc(100 * KiB, 0x11));
    for (let i = 0; i < 200 && server.directPayloadBytes < 100 * KiB; i++) await sleep(5);
    expect(server.directPayloadBytes).toBeGreaterThanOrEqual(100 * KiB);
    // The server drops the WRITE; its socket still reads (and discards) what the client sends.
    const closing = server.close({ timeoutMs: 2000 });
    // A buffer of the same size class from the pool must not be the one the socket reads into.
    const probe = getPayloadBuffer(MiB);
    probe.fill(0xab);
    c.write(Buffer.alloc(MiB - 100 * KiB - 100, 0x22));
    await closing;
    await c.waitClosed();
    expect(probe.every((b) => b === 0xab)).toBe(true);
    putPayloadBuffer(probe);
    expect(lentPayloadBuffers()).toBe(lent);
  });

  it('leaves a socket without a handle alone (the server then reads it the usual way)', () => {
    const sink = { nextReadBuffer: () => Buffer.alloc(16), readDone: () => undefined };
    const s = new net.Socket();
    expect(adoptSocket(s, sink)).toBeNull();
    expect(s.destroyed).toBe(false);
    s.destroy();
  });
});
