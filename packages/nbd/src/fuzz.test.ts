import net from 'node:net';
import { createDiskSync, MemoryBackend, blkdevRead, blkdevWrite, type Disk } from '@blkfilter/bio';
import { fc } from '@fast-check/vitest';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClientBackend } from './client.js';
import { NBD_OPTS_MAGIC_HI, NBD_OPTS_MAGIC_LO, NBD_REQUEST_MAGIC } from './protocol.js';
import { createNbdServer, type NbdServer } from './server.js';

// Property-based fuzzing of the server's parsers: random option sequences in the handshake and
// random requests (valid, malformed, truncated, oversized, garbage) in transmission. After
// every case the server must still serve a well-behaved client. BLKFILTER_FUZZ_MESSAGES sets
// how many messages to send in all (CI: a few thousand; long mode: 100,000 or more).

const TOTAL = Number(process.env.BLKFILTER_FUZZ_MESSAGES ?? 3000);
const SIZE = 4 << 20;

let server: NbdServer;
let port = 0;
let disk: Disk;
let probe: Disk;
let sent = 0;

beforeAll(async () => {
  disk = createDiskSync({ name: `fuzz-${process.pid}`, backend: new MemoryBackend({ sizeBytes: SIZE }), scanPartitions: false });
  await blkdevWrite(disk.part0, 0, Buffer.alloc(4096, 0x5a));
  server = createNbdServer({ exports: { '': { device: disk.part0, writable: true }, ro: { device: disk.part0 } } });
  const addr = await server.listen({ port: 0 });
  port = addr.kind === 'tcp' ? addr.port : 0;
  probe = createDiskSync({ name: `fuzz-probe-${process.pid}`, backend: await NbdClientBackend.connect({ port }), scanPartitions: false });
});
afterAll(async () => {
  await probe.remove();
  await server.close();
  await disk.remove();
});

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

/** Opens a raw connection and does the fixed-newstyle greeting; resolves after the server's 18 bytes. */
function rawConnect(): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1');
    let got = 0;
    s.on('data', function onData(d: Buffer) {
      got += d.length;
      if (got >= 18) {
        s.off('data', onData);
        s.on('data', () => {}); // keep draining replies
        resolve(s);
      }
    });
    s.on('error', () => {});
    s.once('close', () => (got < 18 ? reject(new Error('closed during greeting')) : undefined));
  });
}

/** An option request (IHAVEOPT, option, length, data), sometimes with a lying length. */
const optionArb = fc.record({
  opt: fc.oneof(fc.constantFrom(1, 2, 3, 5, 6, 7, 8, 9, 10), fc.nat({ max: 0xffffffff })),
  data: fc.uint8Array({ maxLength: 64 }),
  lie: fc.oneof(fc.constant(0), fc.integer({ min: -8, max: 8 }), fc.constant(0x7fffffff)),
}).map(({ opt, data, lie }) => Buffer.concat([u32(NBD_OPTS_MAGIC_HI), u32(NBD_OPTS_MAGIC_LO), u32(opt), u32(Math.max(0, data.length + lie)), Buffer.from(data)]));

/** A transmission request: any command and flags, offsets near the edges, lengths up to past 32 MiB. */
const requestArb = fc.record({
  magic: fc.oneof(fc.constant(NBD_REQUEST_MAGIC), fc.nat({ max: 0xffffffff })),
  flags: fc.nat({ max: 0xffff }),
  type: fc.oneof(fc.nat({ max: 10 }), fc.nat({ max: 0xffff })),
  offset: fc.oneof(fc.nat({ max: SIZE }), fc.constantFrom(SIZE - 512, SIZE, SIZE + 512, 2 ** 53, 0)),
  length: fc.oneof(fc.nat({ max: 65536 }), fc.constantFrom(0, 1, 511, 512, 32 << 20, (32 << 20) + 1, 0xffffffff)),
  payload: fc.nat({ max: 4096 }),
  handle: fc.nat(),
}).map((r) => {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(r.magic >>> 0, 0);
  h.writeUInt16BE(r.flags, 4);
  h.writeUInt16BE(r.type & 0xffff, 6);
  h.writeBigUInt64BE(BigInt(r.handle), 8);
  h.writeBigUInt64BE(BigInt(r.offset), 16);
  h.writeUInt32BE(r.length >>> 0, 24);
  // A WRITE carries (some of) its payload; the rest of the case may be cut short.
  return r.type === 1 ? Buffer.concat([h, Buffer.alloc(Math.min(r.payload, r.length))]) : h;
});

const caseArb = fc.record({
  // 3 = FIXED_NEWSTYLE | NO_ZEROES, or random client flags.
  clientFlags: fc.oneof(fc.constant(3), fc.nat({ max: 0xffffffff })),
  options: fc.array(optionArb, { maxLength: 4 }),
  goToTransmission: fc.boolean(),
  requests: fc.array(requestArb, { maxLength: 12 }),
  garbage: fc.uint8Array({ maxLength: 128 }),
  cut: fc.nat({ max: 200 }),
});

type FuzzCase = typeof caseArb extends fc.Arbitrary<infer T> ? T : never;

async function runCase(c: FuzzCase): Promise<void> {
  const s = await rawConnect();
  const parts: Buffer[] = [u32(c.clientFlags), ...c.options];
  if (c.goToTransmission) {
    // OPT_EXPORT_NAME "" ends the handshake (the server answers size + flags).
    parts.push(Buffer.concat([u32(NBD_OPTS_MAGIC_HI), u32(NBD_OPTS_MAGIC_LO), u32(1), u32(0)]));
  }
  parts.push(...c.requests, Buffer.from(c.garbage));
  let bytes = Buffer.concat(parts);
  if (c.cut > 0 && c.cut < bytes.length) bytes = bytes.subarray(0, bytes.length - c.cut); // a client that dies mid-message
  sent += 1 + c.options.length + c.requests.length;
  await new Promise<void>((resolve) => {
    s.write(bytes, () => resolve());
    s.once('close', () => resolve());
  });
  await new Promise((r) => setTimeout(r, 1));
  s.destroy();
}

describe('NBD server under fuzzing', () => {
  it(`stays up and keeps serving through ~${TOTAL} malformed messages`, async () => {
    const runs = Math.max(10, Math.ceil(TOTAL / 12));
    await fc.assert(
      fc.asyncProperty(caseArb, async (c) => {
        await runCase(c);
        // The well-behaved client still reads what is there.
        const b = await blkdevRead(probe.part0, 0, 512);
        expect(b.length).toBe(512);
      }),
      { numRuns: runs, seed: Number(process.env.BLKFILTER_FUZZ_SEED ?? 424242) },
    );
    expect(sent).toBeGreaterThan(runs);
    // Writes by fuzz cases may have changed the data; the device is still served and sane.
    expect(server.connectionCount).toBeLessThanOrEqual(2);
  });
});
