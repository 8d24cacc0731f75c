// Scenario "nbd": an NBD server exports a memory disk; two of our NBD clients (each a disk over
// NbdClientBackend) and a local worker run random I/O checked against one model, while raw TCP
// clients misbehave: vanish mid-handshake or mid-request, send garbage, bad magic, oversize
// lengths. The server must stay up, keep serving the good clients, and drop the bad ones.
import { NbdClientBackend, NbdCmd, createNbdServer, type NbdServer } from '@blkfilter/nbd';
import { RawNbdClient, rawRequest } from '@blkfilter/nbd/testing';
import type { StepContext } from './soak-context.js';
import { randomIo, verifyRange, type Region } from './soak-io.js';
import { Model, SoakFailure, sleep, type Rng } from './soak-util.js';

const MiB = 1 << 20;
const KiB = 1024;
const DISK_BYTES = 8 * MiB;
/** The raw clients' region: what they write (or half write) there is unknown to the model. */
const ABUSE_START = 7 * MiB;
const EXPORT = 'soak';

const IHAVEOPT = Buffer.from('IHAVEOPT');

/** A raw client from `@blkfilter/nbd/testing`, with the null-on-close reads these abuses want. */
class RawConn {
  private constructor(private readonly c: RawNbdClient) {}

  static async connect(port: number): Promise<RawConn> {
    return new RawConn(await RawNbdClient.connect(port));
  }

  get closed(): boolean {
    return this.c.closed;
  }

  read(n: number, timeoutMs = 2000): Promise<Buffer | null> {
    return this.c.tryRead(n, timeoutMs);
  }

  waitClosed(timeoutMs: number): Promise<boolean> {
    return this.c.waitClosed(timeoutMs);
  }

  write(buf: Buffer): void {
    this.c.write(buf);
  }

  destroy(): void {
    this.c.close();
  }

  handshake(): Promise<boolean> {
    return this.c.handshakeExportName(EXPORT);
  }
}

function request(type: number, offset: number, length: number, handle = 1, magic?: number): Buffer {
  return rawRequest(type, 0, handle, offset, length, magic);
}

type Abuse = (ctx: StepContext, rng: Rng, c: RawConn) => Promise<void>;

/** Each misbehaviour, by name (the name is counted in the summary). */
const ABUSES: Record<string, Abuse> = {
  'connect-and-vanish': async () => {},
  'vanish-mid-handshake': async (_ctx, rng, c) => {
    await c.read(18);
    c.write(Buffer.from([0, 0]).subarray(0, rng.range(1, 2)));
  },
  'bad-option-length': async (ctx, rng, c) => {
    await c.read(18);
    c.write(Buffer.from([0, 0, 0, 3]));
    const opt = Buffer.alloc(16);
    IHAVEOPT.copy(opt, 0);
    opt.writeUInt32BE(rng.range(1, 12), 8);
    opt.writeUInt32BE(0xfffffff0, 12);
    c.write(opt);
    c.write(rng.bytes(rng.range(0, 64)));
    ctx.check(await c.waitClosed(2000), 'the NBD server kept a connection whose option claimed 4 GiB of data');
  },
  'half-request-header': async (_ctx, rng, c) => {
    if (!(await c.handshake())) return;
    c.write(request(NbdCmd.READ, 0, 4096).subarray(0, rng.range(1, 27)));
  },
  'garbage-after-handshake': async (_ctx, rng, c) => {
    if (!(await c.handshake())) return;
    c.write(rng.bytes(rng.range(1, 4096)));
    await c.waitClosed(100);
  },
  'bad-magic': async (ctx, rng, c) => {
    if (!(await c.handshake())) return;
    c.write(request(NbdCmd.READ, 0, 4096, 7, rng.u32() | 1));
    ctx.check(await c.waitClosed(2000), 'the NBD server kept a connection after a request with a bad magic');
  },
  'oversize-read': async (ctx, rng, c) => {
    if (!(await c.handshake())) return;
    c.write(request(NbdCmd.READ, rng.pick([0, DISK_BYTES - 4096]), rng.pick([0xfffff000, 0x7ffffe00, 64 * MiB])));
    // Either an error reply or a closed connection; never a 4 GiB buffer, never a crash.
    const reply = await c.read(16, 2000);
    ctx.check(reply !== null || c.closed, 'the NBD server neither answered nor closed after an oversize READ');
    if (reply !== null) ctx.check(reply.readUInt32BE(4) !== 0, () => `the NBD server answered an oversize READ with success (magic ${reply.readUInt32BE(0).toString(16)})`);
  },
  'oversize-write': async (ctx, rng, c) => {
    if (!(await c.handshake())) return;
    c.write(request(NbdCmd.WRITE, ABUSE_START, rng.pick([0xfffffe00, 0x7ffffe00, 256 * MiB])));
    c.write(rng.bytes(rng.range(0, 8192)));
    await c.waitClosed(200);
    ctx.count('oversize-write-closed', c.closed ? 1 : 0);
  },
  'vanish-mid-read': async (_ctx, rng, c) => {
    if (!(await c.handshake())) return;
    c.write(request(NbdCmd.READ, rng.int(DISK_BYTES / MiB) * MiB, MiB));
  },
  'vanish-mid-write-payload': async (_ctx, rng, c) => {
    if (!(await c.handshake())) return;
    const len = 64 * KiB;
    c.write(request(NbdCmd.WRITE, ABUSE_START + rng.int((MiB - len) / 512) * 512, len));
    c.write(rng.bytes(rng.range(1, len - 1)));
  },
  'write-and-vanish': async (_ctx, rng, c) => {
    if (!(await c.handshake())) return;
    const len = 512 * rng.range(1, 128);
    c.write(Buffer.concat([request(NbdCmd.WRITE, ABUSE_START + rng.int((MiB - len) / 512) * 512, len), rng.bytes(len)]));
  },
  'requests-after-disc': async (_ctx, rng, c) => {
    if (!(await c.handshake())) return;
    c.write(Buffer.concat([request(NbdCmd.DISC, 0, 0), request(NbdCmd.READ, 0, 4096), rng.bytes(rng.range(0, 100))]));
    await c.waitClosed(500);
  },
};

/**
 * One step of the `nbd` scenario. Checks every client read, the export through every client
 * and locally at the end, that bad connections are closed (the server's connection count
 * falls back to the two good clients) and that the server logged no internal error.
 */
export async function nbdStep(ctx: StepContext): Promise<void> {
  const rng = ctx.rng;
  const disk = ctx.memoryDisk('disk', DISK_BYTES);
  const model = new Model(DISK_BYTES);
  model.forget(ABUSE_START, DISK_BYTES - ABUSE_START);
  const server: NbdServer = createNbdServer({
    exports: { [EXPORT]: { device: disk.part0, writable: true } },
    log: (level, message) => {
      // A connection dropped for an internal error is a bug in the server, not in the client.
      if (level === 'warn' && message.includes('internal error')) ctx.violation(`NBD server: ${message.split('\n')[0]}`);
    },
  });
  const addr = await server.listen({ port: 0 });
  ctx.onCleanup(() => server.close({ timeoutMs: 5000 }));
  if (addr.kind !== 'tcp') throw new SoakFailure(`NBD server listens on ${addr.kind}, expected tcp`);
  const port = addr.port;
  const c1 = ctx.disk('c1', await NbdClientBackend.connect({ port, exportName: EXPORT }));
  const c2 = ctx.disk('c2', await NbdClientBackend.connect({ port, exportName: EXPORT }));
  const regions: Region[] = [
    { dev: c1.part0, modelBase: 0, start: 0, bytes: 2 * MiB },
    { dev: c1.part0, modelBase: 0, start: 2 * MiB, bytes: MiB },
    { dev: c2.part0, modelBase: 0, start: 3 * MiB, bytes: 2 * MiB },
    { dev: disk.part0, modelBase: 0, start: 5 * MiB, bytes: 2 * MiB },
  ];
  const workers = regions.map((region, i) => {
    const wr = rng.fork(`worker${i}`);
    return () => randomIo(ctx, wr, region, model, { maxBytes: 128 * KiB, flags: true, onError: 'fail' });
  });
  const abuseRng = rng.fork('abuse');
  const names = Object.keys(ABUSES);
  const abuser = async (): Promise<void> => {
    const name = abuseRng.pick(names);
    ctx.phase = `random I/O while a raw client does ${name}`;
    const c = await RawConn.connect(port);
    try {
      await (ABUSES[name] as Abuse)(ctx, abuseRng, c);
    } finally {
      c.destroy();
    }
    ctx.count(`abuse:${name}`);
    ctx.stats.ops++;
    await sleep(abuseRng.int(3));
  };
  ctx.phase = 'random I/O with misbehaving raw clients';
  await ctx.runWorkers([...workers, abuser]);
  ctx.checkViolations();

  ctx.phase = 'export against the model, locally and through both clients';
  await verifyRange(ctx, disk.part0, 0, DISK_BYTES, model, 0, 'exported disk');
  await verifyRange(ctx, c1.part0, 0, DISK_BYTES, model, 0, 'export through client 1');
  await verifyRange(ctx, c2.part0, 0, DISK_BYTES, model, 0, 'export through client 2');
  // A third client after all that: the server still accepts and serves.
  const c3 = ctx.disk('c3', await NbdClientBackend.connect({ port, exportName: EXPORT }));
  await verifyRange(ctx, c3.part0, 0, ABUSE_START, model, 0, 'export through a new client');
  ctx.phase = 'bad connections dropped';
  // A connection the server hangs up on drains what the peer still sends and goes as soon as
  // the peer does (it used to linger 5 s with unread data); allow a second.
  const until = Date.now() + 1000;
  while (server.connectionCount > 3 && Date.now() < until) await sleep(10);
  ctx.check(server.connectionCount === 3, () => `the NBD server still has ${server.connectionCount} connections 1 s after the raw clients left; only the 3 good clients should be left`);
  ctx.check(server.address !== null, 'the NBD server stopped listening');
}
