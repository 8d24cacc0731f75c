import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { nativeAvailable } from '@blkfilter/native';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createDisk } from '../device.js';
import { blkdevRead, blkdevWrite } from '../io.js';
import { mountLoopFs, type LoopFs } from '../testing.js';
import { FileBackend } from './file.js';

// Inline writes on a real XFS, which takes buffered RWF_NOWAIT writes (ext4, where the other
// tests run, refuses them). Needs root, mkfs.xfs and a loop device; skipped, saying why, elsewhere.

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-xfs-'));
let xfs: LoopFs | null = null;

beforeAll(() => {
  const got = nativeAvailable() ? mountLoopFs(dir, 'xfs', 320 << 20) : { why: 'the native addon did not load' };
  if ('why' in got) console.warn(`file-nowait-xfs.test.ts: skipped: ${got.why}`);
  else xfs = got;
});

afterAll(() => {
  xfs?.unmount();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('inline NOWAIT writes on XFS', () => {
  it('writes cached blocks inline, and the file holds exactly what was written', async (ctx) => {
    if (xfs === null) return ctx.skip();
    const file = path.join(xfs.mnt, 'img.raw');
    // Allocated blocks: a NOWAIT write into a hole may be refused (allocation can wait).
    fs.writeFileSync(file, Buffer.alloc(4 << 20, 0x11));
    const backend = await FileBackend.open(file);
    const disk = await createDisk({ name: `xfs-${process.pid}`, backend, scanPartitions: false });
    const expected = fs.readFileSync(file);
    for (let i = 0; i < 64; i++) {
      const data = randomBytes(4096);
      const at = ((i * 37) % 1024) * 4096;
      await blkdevWrite(disk.part0, at, data);
      data.copy(expected, at);
    }
    const stats = backend.stats;
    expect(stats.inlineWrites).toBeGreaterThan(0);
    expect(stats.inlineWrites + stats.inlineWriteMisses).toBe(64);
    expect((await blkdevRead(disk.part0, 0, 4 << 20)).equals(expected)).toBe(true);
    await disk.remove();
    expect(fs.readFileSync(file).equals(expected)).toBe(true);
  });
});
