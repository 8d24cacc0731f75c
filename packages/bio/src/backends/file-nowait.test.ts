import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type * as Native from '@blkfilter/native';
import { afterAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { createDisk } from '../device.js';
import { blkdevRead, blkdevWrite } from '../io.js';
import { FileBackend } from './file.js';

// The NOWAIT probe of inline reads, with the addon's preadNowait wrapped so a test can make it
// answer as the kernel does for data that is not cached (EAGAIN), for a file that refuses
// NOWAIT (EOPNOTSUPP) or for a failing disk (EIO), none of which a test can cause for real
// without dropping the whole machine's page cache.
const answer = vi.hoisted(() => ({ next: [] as number[], writes: [] as number[], xfs: false, writeCalls: 0 }));
vi.mock('@blkfilter/native', async (importOriginal) => {
  const real = await importOriginal<typeof Native>();
  return {
    ...real,
    preadNowait: (fd: number, buf: Uint8Array, offset: number, length: number, position: number): number => {
      const forced = answer.next.shift();
      return forced ?? real.preadNowait(fd, buf, offset, length, position);
    },
    // ext4 refuses every NOWAIT write (EOPNOTSUPP); with `xfs` the write is done, as XFS does.
    pwriteNowait: (fd: number, buf: Uint8Array, offset: number, length: number, position: number): number => {
      answer.writeCalls++;
      const forced = answer.writes.shift();
      if (forced !== undefined) return forced;
      return answer.xfs ? fs.writeSync(fd, buf, offset, length, position) : real.pwriteNowait(fd, buf, offset, length, position);
    },
  };
});

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-nowait-'));
let n = 0;
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
beforeEach(() => {
  answer.next.length = 0;
  answer.writes.length = 0;
  answer.xfs = false;
  answer.writeCalls = 0;
});

async function disk(): Promise<{ backend: FileBackend; read: (off: number, len: number) => Promise<Buffer>; write: (off: number, data: Buffer) => Promise<void> }> {
  const backend = await FileBackend.open(path.join(tmp, `img-${++n}.raw`), { create: { sizeBytes: 4 << 20 } });
  const d = await createDisk({ name: `nowait-${process.pid}-${n}`, backend, scanPartitions: false });
  return { backend, read: (off, len) => blkdevRead(d.part0, off, len), write: (off, data) => blkdevWrite(d.part0, off, data) };
}

describe('inline reads probed with RWF_NOWAIT', () => {
  it('reads cached data inline, and right', async () => {
    const { backend, read, write } = await disk();
    const data = randomBytes(64 * 1024);
    await write(4096, data);
    for (let i = 0; i < 16; i++) expect((await read(4096 + i * 4096, 4096)).equals(data.subarray(i * 4096, i * 4096 + 4096))).toBe(true);
    expect(backend.stats).toMatchObject({ inlineReads: 16, inlineMisses: 0 });
  });

  it('reads up to 1 MiB inline (only the copy is paid here), larger ones in the threadpool', async () => {
    const { backend, read, write } = await disk();
    const data = randomBytes(2 << 20);
    await write(0, data);
    expect((await read(0, 1 << 20)).equals(data.subarray(0, 1 << 20))).toBe(true);
    expect(backend.stats.inlineReads).toBe(1);
    expect((await read(0, 2 << 20)).equals(data)).toBe(true);
    expect(backend.stats.inlineReads).toBe(1);
  });

  it('sends a read the cache refuses (EAGAIN) to the threadpool, with the same data, and keeps probing', async () => {
    const { backend, read, write } = await disk();
    const data = randomBytes(8192);
    await write(0, data);
    answer.next.push(-11);
    expect((await read(0, 4096)).equals(data.subarray(0, 4096))).toBe(true);
    expect(backend.stats).toMatchObject({ inlineReads: 0, inlineMisses: 1 });
    // No backoff: the very next read is probed again, and is inline.
    expect((await read(4096, 4096)).equals(data.subarray(4096))).toBe(true);
    expect(backend.stats).toMatchObject({ inlineReads: 1, inlineMisses: 1 });
  });

  it('falls back to timing reads when the file refuses NOWAIT (EOPNOTSUPP)', async () => {
    const { backend, read, write } = await disk();
    const data = randomBytes(8192);
    await write(0, data);
    answer.next.push(-95);
    expect((await read(0, 4096)).equals(data.subarray(0, 4096))).toBe(true);
    expect(backend.stats).toMatchObject({ inlineReads: 0, inlineMisses: 1 });
    // preadNowait is not asked again: a forced answer left in the queue stays there.
    answer.next.push(-11);
    expect((await read(4096, 4096)).equals(data.subarray(4096))).toBe(true);
    expect(answer.next).toEqual([-11]);
    expect(backend.stats.inlineReads).toBe(1);
  });

  it('fails the bio with the errno of a failing read (EIO), never with stale data', async () => {
    const { read, write } = await disk();
    await write(0, randomBytes(4096));
    answer.next.push(-5);
    await expect(read(0, 4096)).rejects.toThrow(/EIO: preadv2 of 4096 bytes at 0/);
  });
});

describe('inline writes with RWF_NOWAIT', () => {
  it('writes inline where the kernel takes NOWAIT writes, and right', async () => {
    answer.xfs = true;
    const { backend, read, write } = await disk();
    const data = randomBytes(64 * 1024);
    for (let i = 0; i < 16; i++) await write(i * 4096, data.subarray(i * 4096, i * 4096 + 4096));
    expect((await read(0, data.length)).equals(data)).toBe(true);
    expect(backend.stats).toMatchObject({ inlineWrites: 16, inlineWriteMisses: 0, writeBatches: 0 });
  });

  it('sends a write the kernel refuses (EAGAIN) to the threadpool, with the same data, and keeps trying', async () => {
    answer.xfs = true;
    const { backend, read, write } = await disk();
    const data = randomBytes(8192);
    answer.writes.push(-11);
    await write(0, data.subarray(0, 4096));
    expect(backend.stats).toMatchObject({ inlineWrites: 0, inlineWriteMisses: 1, batchedWrites: 1 });
    await write(4096, data.subarray(4096));
    expect(backend.stats).toMatchObject({ inlineWrites: 1, inlineWriteMisses: 1, batchedWrites: 1 });
    expect((await read(0, 8192)).equals(data)).toBe(true);
  });

  it('never passes a write still waiting for the threadpool: writes issued in order land in order', async () => {
    answer.xfs = true;
    const { backend, read, write } = await disk();
    const first = Buffer.alloc(4096, 0x01);
    const second = Buffer.alloc(4096, 0x02);
    answer.writes.push(-11);
    // Both issued before either completes: the first is refused and queued, so the second queues
    // behind it instead of landing inline first (and being overwritten by the older data).
    await Promise.all([write(0, first), write(0, second)]);
    expect((await read(0, 4096)).equals(second)).toBe(true);
    expect(backend.stats).toMatchObject({ inlineWrites: 0, inlineWriteMisses: 1, batchedWrites: 2 });
  });

  it('stops trying once the file refuses NOWAIT writes (ext4: EOPNOTSUPP)', async () => {
    const { backend, read, write } = await disk();
    const data = randomBytes(3 * 4096);
    for (let i = 0; i < 3; i++) await write(i * 4096, data.subarray(i * 4096, i * 4096 + 4096));
    expect(answer.writeCalls).toBe(1);
    expect(backend.stats).toMatchObject({ inlineWrites: 0, inlineWriteMisses: 0, batchedWrites: 3 });
    expect((await read(0, data.length)).equals(data)).toBe(true);
  });

  it('fails the bio with the errno of a failing write (ENOSPC), not as written', async () => {
    answer.xfs = true;
    const { write } = await disk();
    answer.writes.push(-28);
    await expect(write(0, randomBytes(4096))).rejects.toThrow(/ENOSPC: pwritev2 of 4096 bytes at 0/);
  });

  it('does not write inline with sync (O_DSYNC: the write would wait for the disk)', async () => {
    answer.xfs = true;
    const backend = await FileBackend.open(path.join(tmp, `img-${++n}.raw`), { create: { sizeBytes: 1 << 20 }, sync: true });
    const d = await createDisk({ name: `nowait-${process.pid}-${n}`, backend, scanPartitions: false });
    await blkdevWrite(d.part0, 0, randomBytes(4096));
    expect(answer.writeCalls).toBe(0);
    expect(backend.stats.inlineWrites).toBe(0);
  });
});

describe('errno names on the threadpool path', () => {
  it('names what libuv calls UNKNOWN, so a full quota is NOSPC, not IOERR', async () => {
    const { errnoCode, statusForErrno } = await import('./file-request.js');
    const { BlkStatus } = await import('../status.js');
    // libuv has no name for EDQUOT (122 on Linux): its fs errors say UNKNOWN, errno -122.
    const quota = Object.assign(new Error('UNKNOWN: unknown error, write'), { code: 'UNKNOWN', errno: -122 });
    expect(errnoCode(quota)).toBe('EDQUOT');
    expect(statusForErrno(errnoCode(quota))).toBe(BlkStatus.NOSPC);
    expect(errnoCode(Object.assign(new Error('x'), { code: 'ENOSPC', errno: -28 }))).toBe('ENOSPC');
    expect(errnoCode(new Error('no code'))).toBe('EIO');
    expect(errnoCode(null)).toBe('EIO');
  });
});
