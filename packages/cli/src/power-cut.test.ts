import { Bio, blkdevFlush, blkdevWrite, BlkStatus, createDiskSync, MemoryBackend, ReqFlag, submitBio, type Disk } from '@blkfilter/bio';
import { FaultBackend } from '@blkfilter/bio/testing';
import { registerCbtFilter } from '@blkfilter/cbt';
import { createNbdServer, NbdClientBackend, type NbdServer } from '@blkfilter/nbd';
import { attachFilter, detachFilter } from '@blkfilter/registry';
import { afterEach, describe, expect, it } from 'vitest';

// Durability through the whole serving stack: an NBD client writes over TCP to our server, whose
// export goes through the registry and the CBT filter onto a FaultBackend that emulates a
// volatile write cache. Cutting its power keeps only what was made durable (FUA, or a FLUSH
// issued after the write completed), which is what a real power cut does and what SIGKILL of a
// daemon cannot show (the page cache outlives the process: see crash.test.ts). A FUA flag or a
// FLUSH lost anywhere on the way (client, server, registry, filter, block layer) fails here.

const KiB = 1024;
const BLOCK = 4 * KiB;
const SIZE = 16 << 20;
const FLUSHED = 64; // blocks 0..63: plain writes, then one FLUSH
const FUA_FIRST = 1024; // FUA writes from this block on
const PLAIN_FIRST = 3072; // plain writes racing the FUA ones, never flushed

/** Block `i` as written by the test: its number in every 8-byte word, then a marker. */
const pattern = (i: number): Buffer => {
  const b = Buffer.alloc(BLOCK);
  for (let o = 0; o < BLOCK; o += 8) {
    b.writeUInt32BE(i, o);
    b.writeUInt32BE(0xd00d, o + 4);
  }
  return b;
};

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function serve(): Promise<{ fb: FaultBackend; device: Disk; client: Disk }> {
  registerCbtFilter();
  const fb = new FaultBackend(new MemoryBackend({ sizeBytes: SIZE }), { powerCut: true });
  const device = createDiskSync({ name: `pcut${process.pid}`, backend: fb, scanPartitions: false });
  cleanups.push(() => device.remove());
  await attachFilter(device.part0, 'cbt', { options: { blockSize: 64 * KiB } });
  cleanups.push(() => detachFilter(device.part0, 'cbt'));
  const server: NbdServer = createNbdServer({ exports: { disk: { device: device.part0, writable: true } } });
  const addr = await server.listen({ host: '127.0.0.1', port: 0 });
  cleanups.push(() => server.close({ timeoutMs: 1000 }));
  if (addr.kind !== 'tcp') throw new Error(`expected a TCP address, got ${addr.kind}`);
  const backend = await NbdClientBackend.connect({ port: addr.port, exportName: 'disk' });
  expect(backend.capabilities.writeCache).toBe(true); // the server offers FLUSH and FUA
  const client = createDiskSync({ name: `pcutc${process.pid}`, backend, scanPartitions: false });
  cleanups.push(() => client.remove());
  return { fb, device, client };
}

describe('power cut under an NBD client, through the server, the registry and CBT', () => {
  it('keeps every write acknowledged with FUA and every write a completed FLUSH covers', async () => {
    const { fb, client } = await serve();
    for (let i = 0; i < FLUSHED; i++) await blkdevWrite(client.part0, i * BLOCK, pattern(i));
    await blkdevFlush(client.part0);

    // 8 FUA writers and 8 plain ones, each block written once; the power goes mid-stream.
    const fuaAcked: number[] = [];
    let plainAcked = 0;
    let cut: Buffer | null = null;
    let volatileAtCut = 0;
    await new Promise<void>((resolve) => {
      let active = 16;
      let fuaNext = FUA_FIRST;
      let plainNext = PLAIN_FIRST;
      const next = (fua: boolean): void => {
        if (cut !== null || (fua ? fuaNext >= PLAIN_FIRST : plainNext >= SIZE / BLOCK)) {
          if (--active === 0) resolve();
          return;
        }
        const i = fua ? fuaNext++ : plainNext++;
        const bio = Bio.write(client.part0, (i * BLOCK) / 512, pattern(i), fua ? ReqFlag.FUA : 0);
        bio.endIo = (b) => {
          if (b.status === BlkStatus.OK && cut === null) {
            if (fua) fuaAcked.push(i);
            else plainAcked++;
          }
          if (cut === null && fuaAcked.length >= 300) {
            volatileAtCut = fb.volatileWrites;
            cut = fb.powerCut();
          }
          setImmediate(() => next(fua));
        };
        submitBio(bio);
      };
      for (let w = 0; w < 8; w++) {
        next(true);
        next(false);
      }
    });
    const image = cut as Buffer | null;
    if (image === null) throw new Error('the power was never cut: too few FUA writes acknowledged');
    const block = (i: number): Buffer => image.subarray(i * BLOCK, (i + 1) * BLOCK);
    for (let i = 0; i < FLUSHED; i++) expect(block(i).equals(pattern(i)), `block ${i}, written then flushed, was lost`).toBe(true);
    for (const i of fuaAcked) expect(block(i).equals(pattern(i)), `block ${i}, acknowledged with FUA, was lost`).toBe(true);
    // The cut was real: acknowledged writes without FUA were still in the cache and are gone.
    expect(plainAcked).toBeGreaterThan(0);
    expect(volatileAtCut).toBeGreaterThan(0);
  });
});
