import net from 'node:net';
import { Bio, BlkStatus, MemoryBackend, ReqFlag, ReqOp, blkdevRead, createDisk, createDiskSync, disableBioDebug, enableBioDebug, submitBio, type BlockDev, type CompletionSink } from '@blkfilter/bio';
import { PassThroughBackend } from '@blkfilter/bio/testing';
import { fc } from '@fast-check/vitest';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdClientBackend } from './client.js';
import { NbdConnectionError } from './errors.js';
import { createNbdServer } from './server.js';

// Connections cut at random moments while bios are in flight: in the middle of a request
// (client -> server), in the middle of a reply (server -> client), or between them. The cuts
// happen in a proxy between the client and our server, after a byte budget drawn per
// connection. Every bio must complete exactly once, with OK, and the data must equal a model
// where writes take effect in submission order (the client keeps overlapping writes in order).
// BLKFILTER_RECONNECT_RUNS sets the number of cases (default 25).

const RUNS = Number(process.env.BLKFILTER_RECONNECT_RUNS ?? 25);
const REGION = 256 * 1024;
const BLOCK = 4096;
let seq = 0;
const name = (p: string): string => `${p}${process.pid}x${seq++}`;

/** A TCP proxy that cuts its i-th connection after budgets[i] bytes in either direction. */
class CuttingProxy {
  readonly server: net.Server;
  private readonly live = new Set<net.Socket>();
  connections = 0;
  cuts = 0;
  /** Budgets apply from here on: the first connect is not retried, by design. */
  armed = false;

  constructor(target: number, budgets: ReadonlyArray<{ up: number; down: number }>) {
    this.server = net.createServer((c) => {
      const budget = (this.armed ? budgets[this.connections++] : undefined) ?? { up: Infinity, down: Infinity };
      let up = budget.up;
      let down = budget.down;
      const s = net.connect({ port: target });
      this.live.add(c);
      const cut = (): void => {
        this.cuts++;
        c.destroy();
        s.destroy();
      };
      c.on('data', (d: Buffer) => {
        if (d.length <= up) {
          up -= d.length;
          s.write(d);
          return;
        }
        s.write(d.subarray(0, up), () => cut());
        up = 0;
        c.pause();
      });
      s.on('data', (d: Buffer) => {
        if (d.length <= down) {
          down -= d.length;
          c.write(d);
          return;
        }
        c.write(d.subarray(0, down), () => cut());
        down = 0;
        s.pause();
      });
      c.on('close', () => {
        this.live.delete(c);
        s.destroy();
      });
      s.on('close', () => c.destroy());
      c.on('error', () => {});
      s.on('error', () => {});
    });
  }

  async listen(): Promise<number> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    return (this.server.address() as net.AddressInfo).port;
  }

  /** Cuts one live connection now (the `k`-th, modulo how many there are). */
  cutNow(k: number): void {
    const list = [...this.live];
    if (list.length === 0) return;
    this.cuts++;
    list[k % list.length]?.destroy();
  }

  async close(): Promise<void> {
    for (const c of this.live) c.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

const stepArb = fc.record({
  op: fc.constantFrom(ReqOp.WRITE, ReqOp.WRITE, ReqOp.WRITE, ReqOp.WRITE_ZEROES, ReqOp.READ, ReqOp.FLUSH),
  block: fc.nat({ max: REGION / BLOCK - 1 }),
  blocks: fc.integer({ min: 1, max: 16 }),
  fua: fc.boolean(),
  // After submitting this step: 0 nothing, 1 cut a connection now, 2 yield to the event loop.
  then: fc.constantFrom(0, 0, 0, 1, 2),
  conn: fc.nat({ max: 3 }),
});
const budgetArb = fc.record({
  up: fc.oneof(fc.constant(Infinity), fc.integer({ min: 0, max: 300_000 })),
  down: fc.oneof(fc.constant(Infinity), fc.integer({ min: 0, max: 300_000 })),
});

interface Submitted {
  readonly bio: Bio;
  completions: number;
  readonly done: Promise<void>;
}

function submit(bio: Bio): Submitted {
  let resolve: () => void = () => {};
  const s: Submitted = { bio, completions: 0, done: new Promise<void>((r) => (resolve = r)) };
  bio.endIo = () => {
    s.completions++;
    resolve();
  };
  submitBio(bio);
  return s;
}

afterEach(() => disableBioDebug());

describe('NbdClientBackend reconnect and replay', () => {
  it('cut connections at random moments: every bio completes once, OK, and the data equals the model', async () => {
    let totalReconnects = 0;
    let totalCuts = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(stepArb, { minLength: 5, maxLength: 40 }), fc.array(budgetArb, { maxLength: 8 }), fc.nat(), async (steps, budgets, seed) => {
        const tracker = enableBioDebug({ captureStacks: false });
        const target = createDiskSync({ name: name('rtarget'), backend: new MemoryBackend({ sizeBytes: REGION }), scanPartitions: false });
        const server = createNbdServer({ exports: { t: { device: target.part0, writable: true } } });
        const addr = await server.listen(0);
        const proxy = new CuttingProxy(addr.kind === 'tcp' ? addr.port : 0, budgets);
        const port = await proxy.listen();
        const backend = await NbdClientBackend.connect({ port, exportName: 't', connections: 2, retryDelayMs: 1, maxRetryDelayMs: 5, retryForMs: 30_000 });
        expect(backend.status.connections).toBe(2);
        proxy.armed = true;
        const disk = await createDisk({ name: name('rdisk'), backend, scanPartitions: false });
        const dev: BlockDev = disk.part0;
        const model = Buffer.alloc(REGION);
        const writtenBy = new Int32Array(REGION / BLOCK).fill(-1);
        const all: Submitted[] = [];
        const reads: Array<{ s: Submitted; buf: Buffer; off: number; len: number }> = [];
        try {
          for (let i = 0; i < steps.length; i++) {
            const st = steps[i] as (typeof steps)[number];
            const blocks = Math.min(st.blocks, REGION / BLOCK - st.block);
            const off = st.block * BLOCK;
            const len = blocks * BLOCK;
            const flags = st.fua ? ReqFlag.FUA : 0;
            if (st.op === ReqOp.WRITE) {
              const buf = Buffer.alloc(len, ((seed + i) % 255) + 1);
              buf.writeUInt32BE(i, 0);
              all.push(submit(Bio.write(dev, off / 512, buf, flags)));
              buf.copy(model, off);
              writtenBy.fill(i, st.block, st.block + blocks);
            } else if (st.op === ReqOp.WRITE_ZEROES) {
              const bio = new Bio(ReqOp.WRITE_ZEROES, dev, off / 512, len, []);
              bio.flags = flags;
              all.push(submit(bio));
              model.fill(0, off, off + len);
              writtenBy.fill(i, st.block, st.block + blocks);
            } else if (st.op === ReqOp.READ) {
              // A read concurrent with a change to its range has no defined answer: checked only
              // when no change of the whole batch touches it (the others read the initial zeros).
              const buf = Buffer.alloc(len, 0xee);
              const s = submit(Bio.read(dev, off / 512, buf));
              all.push(s);
              reads.push({ s, buf, off, len });
            } else {
              all.push(submit(new Bio(ReqOp.FLUSH, dev, 0, 0, [])));
            }
            if (st.then === 1) proxy.cutNow(st.conn);
            else if (st.then === 2) await new Promise((r) => setImmediate(r));
          }
          // A watchdog, not a sleep: a bio the client forgot to replay never completes.
          let watchdog: ReturnType<typeof setTimeout> | undefined;
          await Promise.race([
            Promise.all(all.map((s) => s.done)),
            new Promise((_, reject) => {
              watchdog = setTimeout(() => reject(new Error(`${all.filter((s) => s.completions === 0).length} bio(s) never completed`)), 10_000);
            }),
          ]);
          clearTimeout(watchdog);
          for (const s of all) {
            expect(s.completions).toBe(1);
            expect(s.bio.error?.message ?? null).toBe(null);
            expect(s.bio.status).toBe(BlkStatus.OK);
          }
          for (const r of reads) {
            const touched = all.some((x) => x.bio.op !== ReqOp.READ && x.bio.op !== ReqOp.FLUSH && x.bio.sector * 512 < r.off + r.len && r.off < x.bio.sector * 512 + x.bio.size);
            if (!touched) expect(r.buf.equals(Buffer.alloc(r.len))).toBe(true);
          }
          // What the server holds, read back through the client with more cuts on the way.
          proxy.cutNow(0);
          const back = await blkdevRead(dev, 0, REGION);
          if (!back.equals(model)) {
            for (let b = 0; b < REGION / BLOCK; b++) {
              if (!back.subarray(b * BLOCK, (b + 1) * BLOCK).equals(model.subarray(b * BLOCK, (b + 1) * BLOCK))) {
                throw new Error(`block ${b} differs from the model: last changed by step ${writtenBy[b]}, holds data of step ${back.readUInt32BE(b * BLOCK)}`);
              }
            }
          }
          tracker.assertAllCompleted();
          totalReconnects += backend.status.reconnects;
          totalCuts += proxy.cuts;
        } finally {
          await disk.remove();
          await proxy.close();
          await server.close();
          await target.remove();
          disableBioDebug();
        }
      }),
      { numRuns: RUNS },
    );
    // The property really exercised reconnects.
    expect(totalCuts).toBeGreaterThan(RUNS);
    expect(totalReconnects).toBeGreaterThan(RUNS);
  });

  it('spreads requests over the connections and sends a FLUSH to every one', async () => {
    const target = createDiskSync({ name: name('mtarget'), backend: new MemoryBackend({ sizeBytes: 4 << 20 }), scanPartitions: false });
    const server = createNbdServer({ exports: { t: { device: target.part0, writable: true } } });
    const addr = await server.listen(0);
    const port = addr.kind === 'tcp' ? addr.port : 0;
    const backend = await NbdClientBackend.connect({ port, exportName: 't', connections: 4 });
    expect(backend.multiConn).toBe(true);
    expect(backend.status).toMatchObject({ state: 'connected', connections: 4, connectionsUp: 4, requestsPerConnection: [0, 0, 0, 0] });
    const disk = await createDisk({ name: name('mdisk'), backend, scanPartitions: false });
    const before = backend.status.requestsPerConnection;
    await Promise.all(Array.from({ length: 16 }, (_, i) => blkdevRead(disk.part0, i * 65536, 65536)));
    const after = backend.status.requestsPerConnection;
    // 16 reads in flight at once went 4 to each connection.
    expect(after.map((n, i) => n - (before[i] as number))).toEqual([4, 4, 4, 4]);
    await new Promise<void>((resolve, reject) => {
      const bio = new Bio(ReqOp.FLUSH, disk.part0, 0, 0, []);
      bio.endIo = (b) => (b.status === BlkStatus.OK ? resolve() : reject(b.error));
      submitBio(bio);
    });
    expect(backend.status.requestsPerConnection.map((n, i) => n - (after[i] as number))).toEqual([1, 1, 1, 1]);
    await disk.remove();
    await server.close();
    await target.remove();
  });

  it('sends each request to the connection with the fewest in flight, not merely the next one', async () => {
    // Reads of the first 64 KiB are held by the server's disk until released: the connection
    // that carries one stays busy while the others answer at once.
    const held: Array<() => void> = [];
    class HoldFirstBlock extends PassThroughBackend {
      override queueBio(bio: Bio, sink: CompletionSink): void {
        if (bio.op === ReqOp.READ && bio.sector < 128) held.push(() => super.queueBio(bio, sink));
        else super.queueBio(bio, sink);
      }
    }
    const target = createDiskSync({ name: name('ltarget'), backend: new HoldFirstBlock(new MemoryBackend({ sizeBytes: 4 << 20 })), scanPartitions: false });
    const server = createNbdServer({ exports: { t: { device: target.part0, writable: true } } });
    const addr = await server.listen(0);
    const backend = await NbdClientBackend.connect({ port: addr.kind === 'tcp' ? addr.port : 0, exportName: 't', connections: 2 });
    const disk = await createDisk({ name: name('ldisk'), backend, scanPartitions: false });
    const slow = blkdevRead(disk.part0, 0, 4096);
    while (held.length === 0) await new Promise((r) => setImmediate(r));
    const busy = backend.status.requestsPerConnection.findIndex((n) => n === 1);
    // One at a time, so that every choice sees one connection busy and the other idle.
    for (let i = 1; i <= 6; i++) await blkdevRead(disk.part0, i * 65536, 4096);
    const counts = backend.status.requestsPerConnection;
    expect(counts[busy]).toBe(1);
    expect(counts[1 - busy]).toBe(6);
    for (const release of held) release();
    await slow;
    await disk.remove();
    await server.close();
    await target.remove();
  });

  it('uses one connection when the server does not allow multi-conn', async () => {
    const target = createDiskSync({ name: name('starget'), backend: new MemoryBackend({ sizeBytes: 1 << 20 }), scanPartitions: false });
    const server = createNbdServer({ exports: { t: { device: target.part0 } } });
    const addr = await server.listen(0);
    const backend = await NbdClientBackend.connect({ port: addr.kind === 'tcp' ? addr.port : 0, exportName: 't', connections: 4 });
    // Our server offers multi-conn for read-only exports too; the count is what the flag allows.
    expect(backend.status.connections).toBe(backend.multiConn ? 4 : 1);
    await backend.close();
    await server.close();
    await target.remove();
  });

  it('marks the backend degraded while it reconnects, and fails with a clear error when retries run out', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    const target = createDiskSync({ name: name('gtarget'), backend: new MemoryBackend({ sizeBytes: 1 << 20 }), scanPartitions: false });
    const server = createNbdServer({ exports: { t: { device: target.part0, writable: true } } });
    const addr = await server.listen(0);
    const port = addr.kind === 'tcp' ? addr.port : 0;
    // The proxy's first connection is cut after the handshake and one request; later ones are refused.
    let accepting = true;
    const sockets: net.Socket[] = [];
    const proxy = net.createServer((c) => {
      if (!accepting) {
        c.destroy();
        return;
      }
      sockets.push(c);
      const s = net.connect({ port });
      c.pipe(s);
      s.pipe(c);
      c.on('error', () => {});
      s.on('error', () => {});
      c.on('close', () => s.destroy());
    });
    await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', r));
    const pport = (proxy.address() as net.AddressInfo).port;
    const states: string[] = [];
    const backend = await NbdClientBackend.connect({ port: pport, exportName: 't', retryForMs: 300, retryDelayMs: 5, maxRetryDelayMs: 20 });
    backend.onStateChange((s) => states.push(s));
    const disk = await createDisk({ name: name('gdisk'), backend, scanPartitions: false });
    accepting = false;
    const buf = Buffer.alloc(4096);
    const s = submit(Bio.read(disk.part0, 0, buf));
    for (const c of sockets) c.destroy();
    await s.done;
    expect(states).toEqual(['degraded', 'failed']);
    expect(s.completions).toBe(1);
    expect(s.bio.status).toBe(BlkStatus.IOERR);
    expect(s.bio.error).toBeInstanceOf(NbdConnectionError);
    expect(s.bio.error?.message).toMatch(new RegExp(`NBD server nbd://127.0.0.1:${pport}/t unreachable for 0.3 s, giving up`));
    expect(backend.status.state).toBe('failed');
    // Later bios fail at once.
    const later = submit(Bio.read(disk.part0, 0, buf));
    expect(later.completions).toBe(1);
    await disk.remove();
    tracker.assertAllCompleted();
    proxy.close();
    await server.close();
    await target.remove();
  });
});
