// qemu:dirty-bitmap:<name> from CBT, read by nbdinfo and qemu-img exactly as they read qemu-nbd -B.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MemoryBackend, createDiskSync, type BlockDev, type Disk } from '@blkfilter/bio';
import { cbtInfo, changedExtents, registerCbtFilter } from '@blkfilter/cbt';
import { FILTER_API_VERSION, attachFilter, detachFilter, filterCtl, listRegisteredFilters, registerFilter, withFrozenDevices, type SnapshotTakenData } from '@blkfilter/registry';
import { dirtyBitmapExtents, mapToExtents } from './block-status.js';
import { NbdCmd, NbdCmdFlag, NbdReplyType } from './protocol.js';
import { createNbdServer, type NbdServer } from './server.js';
import { RawNbd, missingTools, runOk, tmpDir, waitForListener } from './test-helpers.js';

const TAKER = 'nbd-test-taker';
const missing = missingTools('nbdinfo', 'qemu-io', 'qemu-img', 'qemu-nbd');

function registerTaker(): void {
  registerCbtFilter();
  if (listRegisteredFilters().some((f) => f.name === TAKER)) return;
  registerFilter({
    name: TAKER,
    apiVersion: FILTER_API_VERSION,
    defaultAltitude: 1,
    attach: (ctx) => ({ ctl: { take: (args) => ctx.snapshotTaken(args as SnapshotTakenData) } }),
  });
}

/** A snapshot take as the snapshot filter does it: the event inside one frozen instant. */
async function take(dev: BlockDev): Promise<void> {
  await withFrozenDevices([dev], () => filterCtl(dev, TAKER, 'take', { devices: [dev.name] }));
}

// The writes both servers get: blocks 0, 3-4, 16 and 160 of 64 KiB change.
const WRITES = ['write -P 0x11 0 4k', 'write -P 0x22 200k 100k', 'write -P 0x33 1M 64k', 'write -P 0x44 10M 512'];

describe('mapToExtents', () => {
  it('merges runs, clips to the range, honours the extent limit', () => {
    const map = Uint8Array.from([0, 2, 2, 0, 1, 3]);
    // Blocks of 100 bytes starting at block 10; range [1050, 1580).
    expect(mapToExtents(map, 10, 100, 1050, 1580, 1, 1 << 20)).toEqual([50, 0, 200, 1, 200, 0, 80, 1]);
    expect(mapToExtents(map, 10, 100, 1050, 1580, 1, 1)).toEqual([50, 0]);
    expect(mapToExtents(map, 10, 100, 1050, 1580, 0, 2)).toEqual([50, 0, 200, 1]);
    // Past the map's last block: clean.
    expect(mapToExtents(Uint8Array.from([1]), 0, 100, 0, 250, 0, 10)).toEqual([100, 1, 150, 0]);
  });
});

describe('qemu:dirty-bitmap from CBT', () => {
  let server: NbdServer;
  let port: number;
  let disk: Disk;
  let dir: string;
  const children: ChildProcess[] = [];

  beforeAll(async () => {
    registerTaker();
    dir = tmpDir('bitmap');
    disk = createDiskSync({ name: `bm${process.pid}`, backend: new MemoryBackend({ sizeBytes: 64 << 20 }) });
    await attachFilter(disk.part0, 'cbt', { options: { stateFile: false } });
    await attachFilter(disk.part0, TAKER);
    server = createNbdServer({
      exports: {
        disk: { device: disk.part0, writable: true, bitmap: { name: 'bm0', since: 0 } },
      },
    });
    const addr = await server.listen(0);
    port = addr.kind === 'tcp' ? addr.port : 0;
  });

  afterAll(async () => {
    for (const c of children) c.kill('SIGKILL');
    await server.close();
    await detachFilter(disk.part0, TAKER);
    await detachFilter(disk.part0, 'cbt');
    await disk.remove();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('lists the bitmap context like qemu and reports every block dirty before the first take', async () => {
    const c = await RawNbd.connect(port);
    await c.handshake({ exportName: 'disk', contexts: ['qemu:dirty-bitmap:bm0', 'base:allocation'] });
    c.request(NbdCmd.BLOCK_STATUS, 0, 1, 0, 1 << 20);
    const r = await c.reply();
    expect(r.errno).toBe(0);
    expect(r.chunks.map((ch) => ch.type)).toEqual([NbdReplyType.BLOCK_STATUS, NbdReplyType.BLOCK_STATUS]);
    const bitmapChunk = r.chunks.find((ch) => ch.payload.readUInt32BE(0) !== 0)?.payload as Buffer;
    expect([bitmapChunk.readUInt32BE(4), bitmapChunk.readUInt32BE(8)]).toEqual([1 << 20, 1]);
    c.close();
    const bitmaps = server.exportNames;
    expect(bitmaps).toEqual(['disk']);
  });

  it.skipIf(missing.length > 0)('nbdinfo --map and qemu-img map read changed blocks exactly as from qemu-nbd -B', async () => {
    const uri = `nbd://127.0.0.1:${port}/disk`;
    // Writes go through our NBD server, so CBT sees them as a client's writes.
    await runOk('qemu-io', ['-f', 'raw', uri, ...WRITES.flatMap((w) => ['-c', w])]);
    await take(disk.part0);
    const info = await cbtInfo(disk.part0);
    expect(info.snapNumber).toBe(1);
    const extents = await changedExtents(disk.part0, { since: 0, generationId: info.generationId });
    expect(extents.kind).toBe('extents');

    const contexts = JSON.parse((await runOk('nbdinfo', ['--json', uri])).stdout) as { exports: Array<{ contexts: string[] }> };
    expect(contexts.exports[0]?.contexts).toEqual(['base:allocation', 'qemu:dirty-bitmap:bm0']);
    const ours = (await runOk('nbdinfo', ['--map=qemu:dirty-bitmap:bm0', uri])).stdout;
    const K = 1024;
    const M = 1024 * 1024;
    const expected: Array<[number, number, number]> = [
      [0, 64 * K, 1],
      [64 * K, 128 * K, 0],
      [192 * K, 128 * K, 1],
      [320 * K, M - 320 * K, 0],
      [M, 64 * K, 1],
      [M + 64 * K, 9 * M - 64 * K, 0],
      [10 * M, 64 * K, 1],
      [10 * M + 64 * K, 54 * M - 64 * K, 0],
    ];
    const parsed = ours
      .trim()
      .split('\n')
      .map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number) as [number, number, number]);
    expect(parsed).toEqual(expected);

    // qemu-img reports dirty extents inverted ("data": false), as it does for qemu-nbd.
    const imageOpts = `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=disk,x-dirty-bitmap=qemu:dirty-bitmap:bm0`;
    const qmap = JSON.parse((await runOk('qemu-img', ['map', '--output=json', '--image-opts', imageOpts])).stdout) as Array<{
      start: number;
      length: number;
      data: boolean;
    }>;
    expect(qmap.map((e) => [e.start, e.length, e.data ? 0 : 1])).toEqual(expected);

    // The reference: qemu-nbd -B over a qcow2 with a bitmap, same writes, same questions.
    const qcow = path.join(dir, 'ref.qcow2');
    await runOk('qemu-img', ['create', '-f', 'qcow2', qcow, '64M']);
    await runOk('qemu-img', ['bitmap', '--add', qcow, 'bm0']);
    const sock = path.join(dir, 'ref.sock');
    const child = spawn('qemu-nbd', ['-f', 'qcow2', '-B', 'bm0', '-x', 'disk', '-t', '-e', '4', '-k', sock, qcow], { stdio: 'ignore' });
    children.push(child);
    await waitForListener(sock); // the file exists before qemu-nbd listens
    const refUri = `nbd+unix:///disk?socket=${sock}`;
    await runOk('qemu-io', ['-f', 'raw', refUri, ...WRITES.flatMap((w) => ['-c', w])]);
    const theirs = (await runOk('nbdinfo', ['--map=qemu:dirty-bitmap:bm0', refUri])).stdout;
    expect(ours).toBe(theirs);
    const refOpts = `driver=nbd,server.type=unix,server.path=${sock},export=disk,x-dirty-bitmap=qemu:dirty-bitmap:bm0`;
    const refMap = (await runOk('qemu-img', ['map', '--output=json', '--image-opts', refOpts])).stdout;
    const ourMap = (await runOk('qemu-img', ['map', '--output=json', '--image-opts', imageOpts])).stdout;
    expect(ourMap).toBe(refMap);
    child.kill('SIGTERM');

    // REQ_ONE: exactly one extent, no longer than asked.
    const c = await RawNbd.connect(port);
    await c.handshake({ exportName: 'disk', contexts: ['qemu:dirty-bitmap:bm0'] });
    c.request(NbdCmd.BLOCK_STATUS, NbdCmdFlag.REQ_ONE, 1, 192 * K, 100 * K);
    const one = (await c.reply()).chunks[0]?.payload as Buffer;
    expect(one.length).toBe(12);
    expect([one.readUInt32BE(4), one.readUInt32BE(8)]).toEqual([100 * K, 1]);
    c.close();
  });

  it('answers EIO (and keeps the connection) when the device has no CBT attached', async () => {
    const bare = createDiskSync({ name: `bmbare${process.pid}`, backend: new MemoryBackend({ sizeBytes: 1 << 20 }) });
    server.addExport('bare', { device: bare.part0, bitmap: { name: 'bm0', since: 0 } });
    const c = await RawNbd.connect(port);
    await c.handshake({ exportName: 'bare', contexts: ['qemu:dirty-bitmap:bm0'] });
    c.request(NbdCmd.BLOCK_STATUS, 0, 1, 0, 4096);
    const r = await c.reply();
    expect(r.errno).toBe(5);
    expect(r.chunks[0]?.payload.toString('utf8', 6)).toMatch(/block status failed/);
    c.request(NbdCmd.READ, 0, 2, 0, 4096);
    expect((await c.reply()).errno).toBe(0);
    c.close();
    server.removeExport('bare');
    await bare.remove();
  });

  it('reports everything dirty when the generation differs or `since` is ahead', async () => {
    const info = await cbtInfo(disk.part0);
    const base = { name: 'x', device: disk.part0 };
    expect(await dirtyBitmapExtents({ ...base, since: 0, generationId: 'another' }, 0, 4096, 10)).toEqual([4096, 1]);
    expect(await dirtyBitmapExtents({ ...base, since: info.snapNumber + 1, generationId: null }, 0, 4096, 10)).toEqual([4096, 1]);
    expect(await dirtyBitmapExtents({ ...base, since: info.snapNumber, generationId: info.snapGenerationId }, 0, 4096, 10)).toEqual([4096, 0]);
  });
});
