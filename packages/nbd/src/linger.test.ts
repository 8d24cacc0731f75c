import net from 'node:net';
import { createDiskSync, MemoryBackend } from '@blkfilter/bio';
import { expect, it } from 'vitest';
import { NBD_OPTS_MAGIC_HI, NBD_OPTS_MAGIC_LO, NBD_REQUEST_MAGIC } from './protocol.js';
import { createNbdServer } from './server.js';

it('lets go of a client it hung up on at once, even with unread data behind the bad request', async () => {
  const disk = createDiskSync({ name: `linger-${process.pid}`, backend: new MemoryBackend({ sizeBytes: 1 << 20 }), scanPartitions: false });
  const logs: string[] = [];
  const server = createNbdServer({ exports: { '': { device: disk.part0, writable: true } }, log: (_level, message) => logs.push(message) });
  const addr = await server.listen({ port: 0 });
  const port = addr.kind === 'tcp' ? addr.port : 0;
  try {
    const s = net.connect(port, '127.0.0.1');
    s.on('error', () => {});
    const closed = new Promise<void>((resolve) => s.once('close', () => resolve()));
    let received = 0;
    // Greeting (18 bytes), then the answer to EXPORT_NAME: size and flags (10 bytes, NO_ZEROES).
    const inTransmission = new Promise<void>((resolve) => {
      s.on('data', (d: Buffer) => {
        received += d.length;
        if (received >= 28) resolve();
      });
    });
    const u32 = (n: number): Buffer => {
      const b = Buffer.alloc(4);
      b.writeUInt32BE(n);
      return b;
    };
    s.write(Buffer.concat([u32(3), u32(NBD_OPTS_MAGIC_HI), u32(NBD_OPTS_MAGIC_LO), u32(1), u32(0)])); // EXPORT_NAME ""
    await inTransmission;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(1, 6); // WRITE
    h.writeUInt32BE((64 << 20) + 512, 24); // over the 32 MiB payload limit
    s.write(Buffer.concat([h, Buffer.alloc(100_000)]));
    // The server hangs up; our socket (allowHalfOpen false) ends too. The connection must be
    // gone because the server read our end, not because its linger timer destroyed it.
    await closed;
    await server.close();
    expect(server.connectionCount).toBe(0);
    expect(logs.some((m) => m.includes('over the maximum payload'))).toBe(true);
    expect(logs.filter((m) => m.includes('did not hang up'))).toEqual([]);
  } finally {
    await server.close();
    await disk.remove();
  }
});
