import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fileExtents, nativeAvailable, nativeLoadError, NOWAIT_AGAIN, NOWAIT_UNSUPPORTED, preadNowait, pwriteNowait, seekData, seekHole } from './index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

// A sparse file: data at [1 MiB, 1 MiB + 64 KiB) and [3 MiB, 3 MiB + 4 KiB), 4 MiB long, on a
// filesystem that keeps holes (tmpfs, ext4, xfs all do; one that does not reports all data and
// the test says so instead of passing on nothing).
let dir: string;
let file: string;
let fd: number;
let holesKept = false;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-native-'));
  file = path.join(dir, 'sparse.raw');
  fd = fs.openSync(file, 'w+');
  fs.ftruncateSync(fd, 4 * MiB);
  fs.writeSync(fd, Buffer.alloc(64 * KiB, 1), 0, 64 * KiB, MiB);
  fs.writeSync(fd, Buffer.alloc(4 * KiB, 2), 0, 4 * KiB, 3 * MiB);
  holesKept = nativeAvailable() && seekData(fd, 0) === MiB;
});

afterAll(() => {
  fs.closeSync(fd);
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('@blkfilter/native', () => {
  it('loads here (the machines that run CI have a C compiler)', () => {
    expect(nativeLoadError()).toBeNull();
    expect(nativeAvailable()).toBe(true);
  });

  it('finds the data and the holes of a sparse file', (ctx) => {
    if (!holesKept) {
      console.warn(`skipped: ${os.tmpdir()} does not keep holes (SEEK_DATA(0) = ${seekData(fd, 0)})`);
      ctx.skip();
    }
    expect(seekData(fd, 0)).toBe(MiB);
    expect(seekHole(fd, MiB)).toBe(MiB + 64 * KiB);
    expect(seekData(fd, MiB + 64 * KiB)).toBe(3 * MiB);
    expect(seekHole(fd, 3 * MiB)).toBe(3 * MiB + 4 * KiB);
    // Only a hole up to the end: ENXIO is -1, not an exception.
    expect(seekData(fd, 3 * MiB + 4 * KiB)).toBe(-1);
    // An offset inside a hole is its own answer; past the end there is nothing.
    expect(seekHole(fd, 4 * MiB - 1)).toBe(4 * MiB - 1);
    expect(seekHole(fd, 3 * MiB + 1)).toBe(3 * MiB + 4 * KiB);
    expect(seekHole(fd, 4 * MiB)).toBe(-1);
    expect(fileExtents(fd, 0, 4 * MiB, 4 * MiB)).toEqual([
      { offset: 0, length: MiB, hole: true },
      { offset: MiB, length: 64 * KiB, hole: false },
      { offset: MiB + 64 * KiB, length: 2 * MiB - 64 * KiB, hole: true },
      { offset: 3 * MiB, length: 4 * KiB, hole: false },
      { offset: 3 * MiB + 4 * KiB, length: MiB - 4 * KiB, hole: true },
    ]);
  });

  it('maps a window inside the file, and what lies past its end as a hole', (ctx) => {
    if (!holesKept) ctx.skip();
    expect(fileExtents(fd, MiB + 4 * KiB, 8 * KiB, 4 * MiB)).toEqual([{ offset: MiB + 4 * KiB, length: 8 * KiB, hole: false }]);
    expect(fileExtents(fd, 3 * MiB - 4 * KiB, 12 * KiB, 4 * MiB)).toEqual([
      { offset: 3 * MiB - 4 * KiB, length: 4 * KiB, hole: true },
      { offset: 3 * MiB, length: 4 * KiB, hole: false },
      { offset: 3 * MiB + 4 * KiB, length: 4 * KiB, hole: true },
    ]);
    expect(fileExtents(fd, 4 * MiB - 4 * KiB, 12 * KiB, 4 * MiB)).toEqual([{ offset: 4 * MiB - 4 * KiB, length: 12 * KiB, hole: true }]);
  });

  it('names the errno of a real failure', () => {
    expect(() => seekData(987_654, 0)).toThrow(expect.objectContaining({ code: 'EBADF' }));
    expect(() => seekData(fd, -1)).toThrow(TypeError);
  });
});

describe('RWF_NOWAIT', () => {
  it('reads what the page cache holds at once, and says EAGAIN or a real errno otherwise', () => {
    const b = Buffer.alloc(64 * KiB);
    // Just written: cached.
    expect(preadNowait(fd, b, 0, 64 * KiB, MiB)).toBe(64 * KiB);
    expect(b.every((x) => x === 1)).toBe(true);
    // At the end of the file: 0 bytes.
    expect(preadNowait(fd, b, 0, 4096, 4 * MiB)).toBe(0);
    // A closed descriptor: -EBADF, not an exception.
    expect(preadNowait(987_654, b, 0, 4096, 0)).toBe(-9);
    // Outside the buffer: refused before any I/O.
    expect(() => preadNowait(fd, b, 60 * KiB, 8 * KiB, 0)).toThrow(TypeError);
    // Buffered NOWAIT writes: done, or refused as unsupported or would-block; never partial garbage.
    const w = pwriteNowait(fd, Buffer.alloc(4096, 3), 0, 4096, 2 * MiB);
    expect([4096, NOWAIT_AGAIN, NOWAIT_UNSUPPORTED]).toContain(w);
  });
});
