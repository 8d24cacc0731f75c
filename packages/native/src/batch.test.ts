import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { WriteBatch, nativeAvailable } from './index.js';

const KiB = 1024;

let dir: string;
let file: string;
let fd: number;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-batch-'));
  file = path.join(dir, 'data.raw');
  fs.writeFileSync(file, Buffer.alloc(256 * KiB));
  fd = fs.openSync(file, 'r+');
});

afterAll(() => {
  fs.closeSync(fd);
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A batch whose completions resolve `next()` with a copy of the results. */
function opened(capacity: number): { batch: WriteBatch; next: () => Promise<number[]> } {
  let waiting: ((r: number[]) => void) | null = null;
  const batch = WriteBatch.open(capacity, (count) => {
    const r = Array.from(batch.results.subarray(0, count));
    const w = waiting;
    waiting = null;
    w?.(r);
  });
  return { batch, next: () => new Promise((resolve) => (waiting = resolve)) };
}

describe.runIf(nativeAvailable())('WriteBatch', () => {
  it('runs the writes added, in order, and reports each one', async () => {
    const { batch, next } = opened(8);
    const a = Buffer.alloc(4 * KiB, 0xa1);
    const b = Buffer.alloc(8 * KiB, 0xb2);
    const c = Buffer.alloc(4 * KiB, 0xc3);
    expect(batch.add(fd, a, 0, a.length, 0)).toBe(0);
    expect(batch.add(fd, b, 1024, 4 * KiB, 64 * KiB)).toBe(1);
    // Overlaps the first: written after it, so its bytes win.
    expect(batch.add(fd, c, 0, 2 * KiB, 2 * KiB)).toBe(2);
    expect(batch.size).toBe(3);
    const done = next();
    batch.submit();
    expect(batch.busy).toBe(true);
    expect(await done).toEqual([4 * KiB, 4 * KiB, 2 * KiB]);
    expect(batch.busy).toBe(false);
    const got = fs.readFileSync(file);
    expect(got.subarray(0, 2 * KiB).every((x) => x === 0xa1)).toBe(true);
    expect(got.subarray(2 * KiB, 4 * KiB).every((x) => x === 0xc3)).toBe(true);
    expect(got.subarray(64 * KiB, 68 * KiB).every((x) => x === 0xb2)).toBe(true);
    expect(got.subarray(68 * KiB, 72 * KiB).every((x) => x === 0)).toBe(true);
    batch.close();
  });

  it('reports a failed write as -errno and still runs the others', async () => {
    const { batch, next } = opened(4);
    const a = Buffer.alloc(KiB, 0x5a);
    const ro = fs.openSync(file, 'r');
    batch.add(ro, a, 0, a.length, 100 * KiB);
    batch.add(fd, a, 0, a.length, 101 * KiB);
    const done = next();
    batch.submit();
    const r = await done;
    fs.closeSync(ro);
    expect(r).toEqual([-9, KiB]); // EBADF: not open for writing
    expect(fs.readFileSync(file).subarray(100 * KiB, 102 * KiB).equals(Buffer.concat([Buffer.alloc(KiB), a]))).toBe(true);
    batch.close();
  });

  it('refuses misuse: adding or closing while a batch runs, a full batch, an empty submit, bad ranges', async () => {
    const { batch, next } = opened(2);
    const a = Buffer.alloc(KiB);
    expect(() => batch.submit()).toThrow(/nothing was added/);
    expect(() => batch.add(fd, a, 512, KiB, 0)).toThrow(/bad arguments/);
    expect(() => batch.add(fd, a, 0, KiB, -1)).toThrow(/bad arguments/);
    batch.add(fd, a, 0, KiB, 0);
    batch.add(fd, a, 0, KiB, KiB);
    expect(() => batch.add(fd, a, 0, KiB, 2 * KiB)).toThrow(/full/);
    const done = next();
    batch.submit();
    expect(() => batch.add(fd, a, 0, KiB, 0)).toThrow(/running/);
    expect(() => batch.close()).toThrow(/running/);
    await done;
    batch.close();
    batch.close();
    expect(() => batch.add(fd, a, 0, KiB, 0)).toThrow(/closed/);
    expect(() => WriteBatch.open(0, () => undefined)).toThrow(/capacity/);
  });

  it('can be submitted again and again (one hand-off per batch)', async () => {
    const { batch, next } = opened(16);
    const bufs = Array.from({ length: 10 }, (_, i) => Buffer.alloc(KiB, i + 1));
    for (let round = 0; round < 10; round++) {
      for (let i = 0; i < 10; i++) batch.add(fd, bufs[(i + round) % 10] as Buffer, 0, KiB, 128 * KiB + i * KiB);
      const done = next();
      batch.submit();
      expect((await done).every((x) => x === KiB)).toBe(true);
    }
    const got = fs.readFileSync(file);
    for (let i = 0; i < 10; i++) expect(got[128 * KiB + i * KiB]).toBe(((i + 9) % 10) + 1);
    batch.close();
  });
});
