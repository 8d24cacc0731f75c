import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  Bio,
  BioVec,
  BlkStatus,
  MemoryBackend,
  ReqFlag,
  ReqOp,
  blkdevDiscard,
  blkdevFlush,
  blkdevRead,
  blkdevWrite,
  blkdevZeroout,
  createDisk,
  createDiskSync,
  disableBioDebug,
  enableBioDebug,
  submitBio,
  type CompletionSink,
  type Disk,
} from '@blkfilter/bio';
import { NbdClientBackend } from './client.js';
import { NbdConnectionError, NbdExportNotFoundError } from './errors.js';
import { NbdCmd, NbdTransmissionFlag } from './protocol.js';
import { writeU64 } from './reader.js';
import { createNbdServer, type NbdServer } from './server.js';
import { FakeSocket, missingTools, tmpDir, u32, waitForListener } from './test-helpers.js';

const missing = missingTools('qemu-nbd', 'nbdkit');
let seq = 0;
const name = (p: string): string => `${p}${process.pid}x${seq++}`;

/** Exercises a disk on an NBD backend the way a user would. */
async function exercise(disk: Disk): Promise<void> {
  const dev = disk.part0;
  const a = crypto.randomBytes(1 << 20);
  await blkdevWrite(dev, 0, a, ReqFlag.FUA);
  expect((await blkdevRead(dev, 0, 1 << 20)).equals(a)).toBe(true);
  // Larger than one bio (4 MiB default): split by the block layer, pipelined by the client.
  const big = crypto.randomBytes(9 << 20);
  await blkdevWrite(dev, 2 << 20, big);
  await blkdevFlush(dev);
  expect((await blkdevRead(dev, 2 << 20, 9 << 20)).equals(big)).toBe(true);
  await blkdevZeroout(dev, 2 << 20, 1 << 20, { noUnmap: true });
  expect((await blkdevRead(dev, 2 << 20, 1 << 20)).equals(Buffer.alloc(1 << 20))).toBe(true);
  await blkdevDiscard(dev, 4 << 20, 1 << 20);
  // Many small bios in flight at once, each completing exactly once.
  const writes: Promise<void>[] = [];
  for (let i = 0; i < 64; i++) writes.push(blkdevWrite(dev, (16 << 20) + i * 4096, Buffer.alloc(4096, i)));
  await Promise.all(writes);
  const reads = await Promise.all(Array.from({ length: 64 }, (_, i) => blkdevRead(dev, (16 << 20) + i * 4096, 4096)));
  reads.forEach((r, i) => expect(r.equals(Buffer.alloc(4096, i))).toBe(true));
}

describe('NbdClientBackend against our server', () => {
  let server: NbdServer;
  let port: number;
  let target: Disk;

  beforeAll(async () => {
    target = createDiskSync({ name: name('ctarget'), backend: new MemoryBackend({ sizeBytes: 32 << 20 }) });
    server = createNbdServer({
      exports: { t: { device: target.part0, writable: true }, ro: { device: target.part0 } },
    });
    const addr = await server.listen(0);
    port = addr.kind === 'tcp' ? addr.port : 0;
  });

  afterAll(async () => {
    await server.close();
    await target.remove();
  });

  it('negotiates size, flags and block sizes, and moves data both ways', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    try {
      const backend = await NbdClientBackend.connect({ port, exportName: 't' });
      expect(backend.sizeBytes).toBe(32 << 20);
      expect(backend.readOnly).toBe(false);
      expect(backend.structuredReplies).toBe(true);
      expect(backend.capabilities).toEqual({ writeCache: true, discard: true, writeZeroes: true });
      expect(backend.blockSizes).toEqual({ minimum: 512, preferred: 4096, maximum: 32 << 20 });
      expect(backend.transmissionFlags & NbdTransmissionFlag.SEND_FUA).toBeTruthy();
      const disk = await createDisk({ name: name('cdisk'), backend, scanPartitions: false });
      await exercise(disk);
      // What the client wrote is on the server's device.
      expect((await blkdevRead(target.part0, (16 << 20) + 4096, 4096)).equals(Buffer.alloc(4096, 1))).toBe(true);
      await disk.remove();
      expect(backend.connected).toBe(false);
      tracker.assertAllCompleted();
    } finally {
      disableBioDebug();
    }
  });

  it('connects over a unix socket the server listens on', async () => {
    const dir = tmpDir('unix');
    const sockPath = path.join(dir, 'nbd.sock');
    const unixServer = createNbdServer({ exports: { '': { device: target.part0 } } });
    const addr = await unixServer.listen({ path: sockPath });
    expect(addr).toEqual({ kind: 'unix', path: sockPath });
    const backend = await NbdClientBackend.connect({ path: sockPath });
    expect(backend.sizeBytes).toBe(32 << 20);
    expect(backend.description).toContain(sockPath);
    await backend.close();
    await unixServer.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('a read-only export gives a read-only disk; an unknown export is a clear error', async () => {
    const backend = await NbdClientBackend.connect({ port, exportName: 'ro' });
    expect(backend.readOnly).toBe(true);
    const disk = await createDisk({ name: name('cro'), backend, scanPartitions: false });
    expect(disk.part0.readOnly).toBe(true);
    await expect(blkdevWrite(disk.part0, 0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'EROFS' });
    await disk.remove();
    await expect(NbdClientBackend.connect({ port, exportName: 'nope' })).rejects.toBeInstanceOf(NbdExportNotFoundError);
    await expect(NbdClientBackend.connect({ port: 1, connectTimeoutMs: 2000 })).rejects.toBeInstanceOf(NbdConnectionError);
  });
});

describe('NbdClientBackend reply parser', () => {
  it('reassembles structured READ replies split at every byte boundary', async () => {
    const sock = new FakeSocket();
    // Server side of the handshake, canned: greeting, ACK to STRUCTURED_REPLY, INFO + ACK to GO.
    const rep = (opt: number, type: number, payload: Buffer): Buffer => {
      const h = Buffer.alloc(20);
      h.writeUInt32BE(0x0003e889, 0);
      h.writeUInt32BE(0x045565a9, 4);
      h.writeUInt32BE(opt, 8);
      h.writeUInt32BE(type >>> 0, 12);
      h.writeUInt32BE(payload.length, 16);
      return Buffer.concat([h, payload]);
    };
    const exportInfo = Buffer.alloc(12);
    exportInfo.writeUInt16BE(0, 0);
    writeU64(exportInfo, 1 << 20, 2);
    exportInfo.writeUInt16BE(NbdTransmissionFlag.HAS_FLAGS | NbdTransmissionFlag.SEND_FLUSH, 10);
    const hello = Buffer.alloc(18);
    hello.write('NBDMAGICIHAVEOPT', 0, 'latin1');
    hello.writeUInt16BE(3, 16);
    const connecting = NbdClientBackend.fromSocket(sock.asSocket(), { exportName: 'x' });
    // The handshake one byte per chunk.
    const handshake = Buffer.concat([hello, rep(8, 1, Buffer.alloc(0)), rep(7, 3, exportInfo), rep(7, 1, Buffer.alloc(0))]);
    for (let i = 0; i < handshake.length; i++) sock.feed(handshake.subarray(i, i + 1));
    const backend = await connecting;
    expect(backend.sizeBytes).toBe(1 << 20);
    const dev = createDiskSync({ name: name('cparse'), backend: new MemoryBackend({ sizeBytes: 1 << 20 }) }).part0;
    const data = crypto.randomBytes(1024);
    const chunk = (flags: number, type: number, cookie: Buffer, payload: Buffer): Buffer => {
      const h = Buffer.alloc(20);
      h.writeUInt32BE(0x668e33ef, 0);
      h.writeUInt16BE(flags, 4);
      h.writeUInt16BE(type, 6);
      cookie.copy(h, 8);
      h.writeUInt32BE(payload.length, 16);
      return Buffer.concat([h, payload]);
    };
    const off = (n: number): Buffer => {
      const b = Buffer.alloc(8);
      writeU64(b, n, 0);
      return b;
    };
    let completions = 0;
    const sink: CompletionSink = {
      complete(_bio, status) {
        expect(status).toBe(BlkStatus.OK);
        completions++;
      },
    };
    const base = 8192;
    for (let k = 0; k <= 1132; k++) {
      sock.written.length = 0;
      const buf = Buffer.alloc(2048, 0xff);
      // Two vecs, so chunks land across a vec boundary.
      const bio = new Bio(ReqOp.READ, dev, base / 512, 2048, [new BioVec(buf, 0, 700), new BioVec(buf, 700, 1348)]);
      backend.queueBio(bio, sink);
      const req = sock.output();
      expect(req.readUInt16BE(6)).toBe(NbdCmd.READ);
      const cookie = req.subarray(8, 16);
      // Data for [0, 512), a hole [512, 1536), data [1536, 2048) sent first, then the rest, then NONE.
      const reply = Buffer.concat([
        chunk(0, 1, cookie, Buffer.concat([off(base + 1536), data.subarray(512, 1024)])),
        chunk(0, 2, cookie, Buffer.concat([off(base + 512), u32(1024)])),
        chunk(0, 1, cookie, Buffer.concat([off(base), data.subarray(0, 512)])),
        chunk(1, 0, cookie, Buffer.alloc(0)),
      ]);
      const cut = Math.min(k, reply.length);
      sock.feed(reply.subarray(0, cut));
      sock.feed(reply.subarray(cut));
      const want = Buffer.concat([data.subarray(0, 512), Buffer.alloc(1024), data.subarray(512, 1024)]);
      if (!buf.equals(want)) throw new Error(`split at ${k}: data differs`);
    }
    expect(completions).toBe(1133);
    expect(backend.inFlight).toBe(0);
    await dev.disk.remove();
  });
});

describe.skipIf(missing.length > 0)('NbdClientBackend against qemu-nbd and nbdkit', () => {
  let dir: string;
  const children: ChildProcess[] = [];

  beforeAll(() => {
    dir = tmpDir('client');
  });

  afterAll(() => {
    for (const c of children) c.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function start(cmd: string, args: string[], sock: string): Promise<ChildProcess> {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    children.push(child);
    // The socket file exists before the server listens on it: wait until a connect succeeds.
    await waitForListener(sock);
    return child;
  }

  it('works on qemu-nbd', async () => {
    const img = path.join(dir, 'q.raw');
    fs.writeFileSync(img, Buffer.alloc(32 << 20));
    const sock = path.join(dir, 'q.sock');
    const child = await start('qemu-nbd', ['-f', 'raw', '-x', 'disk', '-k', sock, '-t', '-e', '4', '--discard=unmap', img], sock);
    const backend = await NbdClientBackend.connect({ path: sock, exportName: 'disk' });
    expect(backend.sizeBytes).toBe(32 << 20);
    const disk = await createDisk({ name: name('cq'), backend, scanPartitions: false });
    await exercise(disk);
    await disk.remove();
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
    // What we wrote through qemu-nbd is in the file.
    expect(fs.readFileSync(img).subarray((16 << 20) + 4096 * 3, (16 << 20) + 4096 * 4).equals(Buffer.alloc(4096, 3))).toBe(true);
  });

  it('works on nbdkit memory', async () => {
    const sock = path.join(dir, 'k.sock');
    const child = await start('nbdkit', ['-f', '-U', sock, 'memory', '64M'], sock);
    const backend = await NbdClientBackend.connect({ path: sock });
    expect(backend.sizeBytes).toBe(64 << 20);
    const disk = await createDisk({ name: name('ck'), backend, scanPartitions: false });
    await exercise(disk);
    await disk.remove();
    child.kill('SIGTERM');
  });

  it('completes bios in flight with IOERR when the server dies, and fails later ones at once', async () => {
    const sock = path.join(dir, 'd.sock');
    const child = await start('nbdkit', ['-f', '-U', sock, '--filter=delay', 'memory', '16M', 'rdelay=2'], sock);
    // Reconnect off: the old behaviour, kept for users who want a dead server to fail fast.
    const backend = await NbdClientBackend.connect({ path: sock, retryForMs: 0 });
    const disk = await createDisk({ name: name('cd'), backend, scanPartitions: false });
    const pending = Promise.allSettled([blkdevRead(disk.part0, 0, 4096), blkdevRead(disk.part0, 8192, 4096)]);
    // Both requests are on the wire (rdelay=2 holds them at the server for 2 s): kill it now.
    expect(backend.inFlight).toBe(2);
    child.kill('SIGKILL');
    const results = await pending;
    for (const r of results) {
      expect(r.status).toBe('rejected');
      const err = (r as PromiseRejectedResult).reason as { code: string; message: string };
      expect(err.message).toMatch(/closed the connection|failed/);
    }
    expect(backend.connected).toBe(false);
    // A later bio fails at once: completed inside the submission, before any I/O could be.
    const bio = Bio.read(disk.part0, 0, Buffer.alloc(512));
    let completedInSubmit = false;
    bio.endIo = () => {
      completedInSubmit = true;
    };
    submitBio(bio);
    expect(completedInSubmit).toBe(true);
    expect(bio.status).toBe(BlkStatus.IOERR);
    expect(bio.error).toBeInstanceOf(NbdConnectionError);
    await disk.remove();
  });
});
