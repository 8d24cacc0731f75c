import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AioContext, nativeAvailable } from './index.js';
import { aioResources } from './testing.js';

// The AIO context on its own, on a buffered file (Linux serves buffered AIO inside io_submit,
// but completions still go through the ring and the eventfd, so the whole path runs here on any
// filesystem); O_DIRECT through the file backend is tested in @blkfilter/bio.

const KiB = 1024;
const addonPath = fileURLToPath(new URL('../build/Release/blkfilter_native.node', import.meta.url));

let dir: string;
let file: string;
let fd: number;
const content = Buffer.alloc(64 * KiB);
for (let i = 0; i < content.length; i++) content[i] = (i * 7 + 3) & 0xff;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-aio-'));
  file = path.join(dir, 'data.raw');
  fs.writeFileSync(file, content);
  fd = fs.openSync(file, 'r+');
});

afterAll(() => {
  fs.closeSync(fd);
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A context whose completions are collected as [id, result] until `want` have come. */
function collector(depth: number, kernelEvents?: number) {
  const got: Array<[number, number]> = [];
  const batches: number[] = [];
  let waiters: Array<{ n: number; resolve: () => void }> = [];
  const ctx = AioContext.open(
    depth,
    (count) => {
      batches.push(count);
      for (let i = 0; i < count; i++) got.push([ctx.results[2 * i] as number, ctx.results[2 * i + 1] as number]);
      waiters = waiters.filter((w) => (got.length >= w.n ? (w.resolve(), false) : true));
    },
    kernelEvents === undefined ? {} : { kernelEvents },
  );
  const until = (n: number): Promise<void> => (got.length >= n ? Promise.resolve() : new Promise((resolve) => waiters.push({ n, resolve })));
  return { ctx, got, batches, until };
}

describe.skipIf(!nativeAvailable() || process.platform !== 'linux')('AioContext', () => {
  it('reads and writes through the kernel and reports (id, bytes) in batches, never inside the call', async () => {
    const { ctx, got, batches, until } = collector(8);
    const w = Buffer.alloc(4 * KiB, 0xa5);
    ctx.write(0, fd, w, 0, w.length, 8 * KiB);
    const r = Buffer.alloc(6 * KiB);
    // Queued without submitting, then one io_submit for three requests.
    ctx.read(1, fd, r, 1 * KiB, 4 * KiB, 16 * KiB, false);
    const v = [Buffer.alloc(1000), new Uint8Array(3000), Buffer.alloc(96)];
    ctx.readv(2, fd, v, 20 * KiB, false);
    // A short read: 100 bytes asked, 40 left before the end.
    const tail = Buffer.alloc(100);
    ctx.read(3, fd, tail, 0, 100, content.length - 40, false);
    expect(got).toEqual([]);
    expect(ctx.stats().queued).toBe(3);
    ctx.submit();
    await until(4);
    expect(new Map(got)).toEqual(
      new Map([
        [0, 4 * KiB],
        [1, 4 * KiB],
        [2, 4096],
        [3, 40],
      ]),
    );
    expect(batches.reduce((a, b) => a + b, 0)).toBe(4);
    expect(fs.readFileSync(file).subarray(8 * KiB, 12 * KiB)).toEqual(w);
    expect(r.subarray(KiB, 5 * KiB)).toEqual(content.subarray(16 * KiB, 20 * KiB));
    expect(Buffer.concat(v.map((b) => Buffer.from(b.buffer, b.byteOffset, b.byteLength)))).toEqual(content.subarray(20 * KiB, 20 * KiB + 4096));
    expect(tail.subarray(0, 40)).toEqual(content.subarray(content.length - 40));
    const s = ctx.stats();
    expect(s.inFlight).toBe(0);
    expect(s.submits).toBe(2);
    await ctx.close();
  });

  it('writes several buffers with writev, and ids come back for reuse', async () => {
    const { ctx, got, until } = collector(2);
    const parts = [Buffer.alloc(512, 1), Buffer.alloc(1536, 2)];
    ctx.writev(0, fd, parts, 32 * KiB);
    await until(1);
    expect(got[0]).toEqual([0, 2048]);
    // The same id again, now that its completion has come.
    ctx.fdsync(0, fd);
    await until(2);
    expect(got[1]).toEqual([0, 0]);
    expect(fs.readFileSync(file).subarray(32 * KiB, 34 * KiB)).toEqual(Buffer.concat(parts));
    fs.writeSync(fd, content.subarray(32 * KiB, 34 * KiB), 0, 2048, 32 * KiB);
    await ctx.close();
  });

  it('completes with -errno what the kernel refuses: a bad fd (EBADF), an unaligned O_DIRECT read (EINVAL)', async () => {
    const { ctx, got, until } = collector(4);
    const buf = Buffer.alloc(4096);
    // io_submit refuses the whole iocb: the error comes back as a completion, later.
    ctx.read(0, 1 << 30, buf, 0, 4096, 0, false);
    ctx.read(1, fd, buf, 0, 10, 0, false);
    ctx.submit();
    expect(got).toEqual([]);
    await until(2);
    expect(new Map(got)).toEqual(
      new Map([
        [0, -9],
        [1, 10],
      ]),
    );
    let direct = -1;
    try {
      direct = fs.openSync(file, fs.constants.O_RDONLY | (fs.constants.O_DIRECT as number));
    } catch {
      // this filesystem has no O_DIRECT: the EBADF half is enough
    }
    if (direct >= 0) {
      // 100 bytes is not a multiple of the logical block size.
      ctx.read(2, direct, buf, 0, 100, 0);
      await until(3);
      expect(got[2]).toEqual([2, -22]);
      fs.closeSync(direct);
    }
    await ctx.close();
  });

  it('holds iocbs back while the ring is full (EAGAIN) and submits them as completions free it', async () => {
    // One event asked of the kernel (it rounds up to a few per CPU), 256 requests at once.
    const depth = 256;
    const now = fs.readFileSync(file);
    const { ctx, got, until } = collector(depth, 1);
    const bufs = Array.from({ length: depth }, () => Buffer.alloc(256));
    for (let i = 0; i < depth; i++) ctx.read(i, fd, bufs[i] as Buffer, 0, 256, i * 256, false);
    ctx.submit();
    const s = ctx.stats();
    expect(s.eagains).toBeGreaterThan(0);
    expect(s.queued).toBeGreaterThan(0);
    await until(depth);
    expect(got.map(([id]) => id).sort((a, b) => a - b)).toEqual(Array.from({ length: depth }, (_, i) => i));
    expect(got.every(([, res]) => res === 256)).toBe(true);
    for (let i = 0; i < depth; i++) expect((bufs[i] as Buffer).equals(now.subarray(i * 256, i * 256 + 256)), `request ${i}`).toBe(true);
    expect(ctx.stats().queued).toBe(0);
    await ctx.close();
  });

  it('refuses misuse with a thrown error: ids out of range or in flight, ranges outside the buffer, close with I/O in flight, use after close', async () => {
    const { ctx, until } = collector(2);
    const buf = Buffer.alloc(4096);
    expect(() => ctx.read(2, fd, buf, 0, 512, 0)).toThrow(/out of range/);
    expect(() => ctx.read(0, fd, buf, 4000, 512, 0)).toThrow(/inside it/);
    expect(() => ctx.readv(0, fd, [], 0)).toThrow(/1 to 1024/);
    expect(() => ctx.read(0, fd, buf, 0, 512, -1)).toThrow(/position >= 0/);
    ctx.read(0, fd, buf, 0, 512, 0, false);
    expect(() => ctx.read(0, fd, buf, 0, 512, 0)).toThrow(expect.objectContaining({ code: 'EBUSY' }));
    expect(() => ctx.close()).toThrow(expect.objectContaining({ code: 'EBUSY' }));
    ctx.submit();
    await until(1);
    const closed = ctx.close();
    expect(ctx.close()).toBe(closed);
    await closed;
    expect(() => ctx.read(1, fd, buf, 0, 512, 0)).toThrow(expect.objectContaining({ code: 'EBADF' }));
    expect(() => AioContext.open(0, () => undefined)).toThrow(/depth 1\.\.2\^20/);
  });

  it('leaks no eventfd and no AIO ring over many open/close cycles, and closes off the event loop', async () => {
    const before = aioResources();
    const buf = Buffer.alloc(512);
    const calls: number[] = [];
    const destroys: number[] = [];
    // Ten chains at once: io_destroy waits for an RCU grace period (tens of ms) on the threadpool.
    const chain = async (): Promise<void> => {
      for (let cycle = 0; cycle < 30; cycle++) {
        const { ctx, until } = collector(4);
        for (let i = 0; i < 4; i++) ctx.read(i, fd, buf, 0, 128, i * 128, i === 3);
        await until(4);
        const t0 = performance.now();
        const closed = ctx.close();
        calls.push(performance.now() - t0);
        await closed;
        destroys.push(performance.now() - t0);
      }
    };
    await Promise.all(Array.from({ length: 10 }, chain));
    expect(aioResources()).toEqual(before);
    // The call does not wait for io_destroy, which runs on the threadpool. Compared within this
    // run, by medians, so that load (which slows both) or a preempted call cannot decide it:
    // had the call destroyed the context itself, it would take as long as the destroy.
    const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[xs.length >> 1] as number;
    expect(median(calls)).toBeLessThan(median(destroys) / 10);
  });

  // The cases that take a process with them run in a child: an exception thrown out of the
  // completion callback (uncaught), a context collected without close, a worker that ends with
  // I/O in flight.
  it('delivers every completion once when the callback throws, and reports the error as uncaught', () => {
    const script = `
      const addon = require(${JSON.stringify(addonPath)});
      const fs = require('fs');
      const fd = fs.openSync(${JSON.stringify(file)}, 'r');
      const results = new Int32Array(16);
      const seen = [];
      let uncaught = 0;
      let cursor = 0;
      process.on('uncaughtException', (e) => { uncaught++; if (e.message !== 'boom') throw e; });
      const ctx = addon.aioOpen(8, 8, (count) => {
        while (cursor < count) {
          const i = cursor++;
          seen.push(results[2 * i]);
          if (results[2 * i] === 2) throw new Error('boom');
        }
        cursor = 0;
        if (seen.length === 5) {
          addon.aioClose(ctx);
          process.stdout.write(JSON.stringify({ seen: seen.sort(), uncaught }));
        }
      }, results);
      const buf = Buffer.alloc(512);
      for (let i = 0; i < 5; i++) addon.aioQueue(ctx, i, 0, fd, buf, 0, 64, i * 64, false);
      addon.aioSubmit(ctx);
    `;
    const out = execFileSync(process.execPath, ['-e', script], { encoding: 'utf8' });
    expect(JSON.parse(out)).toEqual({ seen: [0, 1, 2, 3, 4], uncaught: 1 });
  });

  it('stops the kernel and frees everything when a context is collected without close, or its worker ends with I/O in flight', () => {
    const script = `
      const { Worker } = require('worker_threads');
      const addon = require(${JSON.stringify(addonPath)});
      const fs = require('fs');
      const rings = () => fs.readFileSync('/proc/self/maps', 'utf8').split('\\n').filter((l) => l.includes('/[aio]')).length;
      const before = rings();
      // Collected without close, nothing in flight.
      for (let i = 0; i < 50; i++) addon.aioOpen(4, 4, () => {}, new Int32Array(8));
      const opened = rings();
      // A worker that submits reads and is terminated before they can be reaped.
      const w = new Worker(\`
        const addon = require(${JSON.stringify(addonPath)});
        const fs = require('fs');
        const { parentPort } = require('worker_threads');
        const fd = fs.openSync(${JSON.stringify(file)}, 'r');
        const ctx = addon.aioOpen(64, 64, () => {}, new Int32Array(128));
        const buf = Buffer.alloc(64 * 512);
        for (let i = 0; i < 64; i++) addon.aioQueue(ctx, i, 0, fd, buf, i * 512, 512, i * 512, false);
        addon.aioSubmit(ctx);
        parentPort.postMessage('submitted');
      \`, { eval: true });
      w.once('message', async () => {
        await w.terminate();
        for (let i = 0; i < 5; i++) { global.gc(); await new Promise((r) => setTimeout(r, 20)); }
        process.stdout.write(JSON.stringify({ before, opened, after: rings() }));
      });
    `;
    const out = execFileSync(process.execPath, ['--expose-gc', '-e', script], { encoding: 'utf8' });
    const r = JSON.parse(out) as { before: number; opened: number; after: number };
    expect(r.opened).toBe(r.before + 50);
    expect(r.after).toBe(r.before);
  });
});
