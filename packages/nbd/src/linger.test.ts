import net from 'node:net';
import { createDiskSync, MemoryBackend } from '@blkfilter/bio';
import { expect, it } from 'vitest';
import { NBD_OPTS_MAGIC_HI, NBD_OPTS_MAGIC_LO, NBD_REQUEST_MAGIC } from './protocol.js';
import { createNbdServer } from './server.js';

it('lets go of a client it hung up on at once, even with unread data behind the bad request', async () => {
  const disk = createDiskSync({ name: `linger-${process.pid}`, backend: new MemoryBackend({ sizeBytes: 1 << 20 }), scanPartitions: false });
  const server = createNbdServer({ exports: { '': { device: disk.part0, writable: true } } });
  const addr = await server.listen({ port: 0 });
  const port = addr.kind === 'tcp' ? addr.port : 0;
  try {
    const s = net.connect(port, '127.0.0.1');
    s.on('error', () => {});
    await new Promise<void>((resolve) => s.once('data', () => resolve())); // greeting
    const u32 = (n: number): Buffer => {
      const b = Buffer.alloc(4);
      b.writeUInt32BE(n);
      return b;
    };
    s.write(Buffer.concat([u32(3), u32(NBD_OPTS_MAGIC_HI), u32(NBD_OPTS_MAGIC_LO), u32(1), u32(0)])); // EXPORT_NAME ""
    await new Promise((r) => setTimeout(r, 100));
    const h = Buffer.alloc(28);
    h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(1, 6); // WRITE
    h.writeUInt32BE((64 << 20) + 512, 24); // over the 32 MiB payload limit
    s.write(Buffer.concat([h, Buffer.alloc(100_000)]));
    const t0 = Date.now();
    while (server.connectionCount > 0 && Date.now() - t0 < 3000) await new Promise((r) => setTimeout(r, 20));
    expect(server.connectionCount).toBe(0);
    expect(Date.now() - t0).toBeLessThan(1500);
    s.destroy();
  } finally {
    await server.close();
    await disk.remove();
  }
});
