import { MemoryBackend, createDiskSync } from '@blkfilter/bio';
import { describe, expect, it } from 'vitest';
import { NbdCmd } from './protocol.js';
import { createNbdServer } from './server.js';
import { RawNbdClient } from './testing.js';

const MiB = 1024 * 1024;

/** Yields to the event loop until `cond()` holds (the test's own timeout bounds the wait). */
async function until(cond: () => boolean): Promise<void> {
  while (!cond()) await new Promise((r) => setTimeout(r, 5));
}

describe('server-wide buffer cap', () => {
  it('clients that never read their 32 MiB READs hold at most the cap, a well-behaved client is still served, and it all comes back', async () => {
    const d = createDiskSync({ name: `budget-${process.pid}`, backend: new MemoryBackend({ sizeBytes: 256 * MiB }), scanPartitions: false });
    // 68 MiB: a reserve of 4 MiB for idle connections, so two 32 MiB READs fill the shared part exactly.
    const cap = 68 * MiB;
    const server = createNbdServer({ exports: { d: { device: d.part0, writable: true } }, maxBufferedBytes: cap });
    expect(server.maxBufferedBytes).toBe(cap);
    const addr = await server.listen({ port: 0 });
    const port = addr.kind === 'tcp' ? addr.port : 0;

    // Sampled on every timer turn as well as the exact high-water mark the server keeps.
    let sampledMax = 0;
    const sampler = setInterval(() => {
      sampledMax = Math.max(sampledMax, server.bufferedBytes);
    }, 1);

    const hogs: RawNbdClient[] = [];
    for (let i = 0; i < 4; i++) {
      const c = await RawNbdClient.connect(port);
      // Simple replies: a structured READ of a hole on a memory disk would send no data.
      await c.handshake({ exportName: 'd', structured: false });
      // Never read a reply: the socket's receive buffer fills and the server's writes back up.
      c.socket.pause();
      for (let k = 0; k < 40; k++) c.request(NbdCmd.READ, 0, k, ((i * 40 + k) % 7) * 32 * MiB, 32 * MiB);
      hogs.push(c);
    }
    // The hogs hold all they may and the rest of them wait for room (not for their own limits:
    // each connection alone could hold 64 MiB).
    await until(() => server.connectionsWaitingForBuffers >= 2 && server.bufferedBytes >= 64 * MiB);
    expect(server.bufferedBytes).toBeLessThanOrEqual(cap);

    // A well-behaved client meanwhile: writes and reads back, one request at a time.
    const good = await RawNbdClient.connect(port);
    await good.handshake({ exportName: 'd', structured: true });
    for (let k = 0; k < 20; k++) {
      const data = Buffer.alloc(4096, k + 1);
      good.request(NbdCmd.WRITE, 0, 1000 + 2 * k, 250 * MiB + k * 4096, 4096, data);
      expect((await good.reply()).errno).toBe(0);
      good.request(NbdCmd.READ, 0, 1001 + 2 * k, 250 * MiB + k * 4096, 4096);
      const r = await good.reply(4096);
      expect(r.errno).toBe(0);
      expect(r.data?.equals(data)).toBe(true);
      expect(server.bufferedBytes).toBeLessThanOrEqual(cap);
    }
    good.disconnect();
    await good.waitClosed();

    for (const c of hogs) c.socket.destroy();
    await until(() => server.connectionCount === 0 && server.bufferedBytes === 0);
    clearInterval(sampler);
    expect(server.bufferedBytes).toBe(0);
    expect(server.connectionsWaitingForBuffers).toBe(0);
    expect(sampledMax).toBeLessThanOrEqual(cap);
    expect(server.peakBufferedBytes).toBeLessThanOrEqual(cap);
    expect(server.peakBufferedBytes).toBeGreaterThanOrEqual(64 * MiB);
    await server.close();
    await d.remove();
  }, 60_000);

  it('refuses a cap too small for one maximum-size request', () => {
    expect(() => createNbdServer({ maxBufferedBytes: 32 * MiB })).toThrow(/maxBufferedBytes/);
  });
});
