import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { blkdevBlockStatus, blkdevRead, blkdevWrite, BlkError, createDisk, type Disk } from '@blkfilter/bio';
import { afterAll, describe, expect, it } from 'vitest';
import { ChainBackend } from './chain-backend.js';
import { Qcow2Reader } from './reader.js';
import { prune } from './repository.js';
import { cleanup, haveQemu, MiB, scribble, snapAndBackup, tmpDir, trackedDisk, type Taken } from './test-util.js';

afterAll(cleanup);

const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');
let n = 0;

/** A 1 full + 3 incremental chain of a 16 MiB disk, with a zeroed range in the third point. */
async function chainOf4(compress = false): Promise<{ dir: string; taken: Taken[]; src: Disk }> {
  const src = await trackedDisk(16 * MiB);
  const dir = tmpDir();
  const raws = tmpDir();
  const taken: Taken[] = [];
  for (let p = 0; p < 4; p++) {
    await scribble(src, p === 0 ? 40 : 6, p);
    if (p === 2) await blkdevWrite(src.part0, 0, Buffer.alloc(256 * 1024)); // zero clusters that hide data below
    taken.push(...(await snapAndBackup([src], dir, raws, { compress })).taken);
  }
  return { dir, taken, src };
}

async function open(dir: string, at: number, onDamage?: (e: Error) => void): Promise<{ b: ChainBackend; disk: Disk }> {
  const b = await ChainBackend.open(dir, { at, ...(onDamage ? { onDamage } : {}) });
  const disk = await createDisk({ name: `pt${process.pid}x${n++}`, backend: b, scanPartitions: false });
  return { b, disk };
}

describe('ChainBackend: a backup point as a block device', () => {
  it('reads every point of a 1 full + 3 incremental chain as it was taken, in any order and size', async () => {
    const { dir, taken } = await chainOf4();
    for (let at = 1; at <= 4; at++) {
      const { b, disk } = await open(dir, at);
      try {
        expect(b.chainLength).toBe(at);
        const whole = await blkdevRead(disk.part0, 0, disk.part0.sizeBytes);
        expect(sha(whole)).toBe(taken[at - 1]?.sha);
        // Unaligned small reads across cluster and image boundaries read the same bytes.
        const raw = fs.readFileSync(taken[at - 1]?.raw as string);
        for (const [off, len] of [[65536 - 512, 1024], [512, 4096], [3 * MiB - 4096, 200 * 1024], [16 * MiB - 512, 512]] as const) {
          expect(Buffer.compare(await blkdevRead(disk.part0, off, len), raw.subarray(off, off + len))).toBe(0);
        }
      } finally {
        await disk.remove();
      }
    }
  });

  it('reports holes where no image of the chain holds data, and the depth of each extent', async () => {
    const { dir, taken } = await chainOf4();
    const { b, disk } = await open(dir, 4);
    try {
      const raw = fs.readFileSync(taken[3]?.raw as string);
      const status = blkdevBlockStatus(disk.part0, 0, disk.part0.sizeBytes) ?? [];
      let pos = 0;
      let holes = 0;
      for (const e of status) {
        if (e.hole) {
          holes += e.length;
          expect(raw.subarray(pos, pos + e.length).every((x) => x === 0)).toBe(true);
        }
        pos += e.length;
      }
      expect(pos).toBe(disk.part0.sizeBytes);
      expect(holes).toBeGreaterThan(0);
      const depth = b.allocationDepth(0, b.sizeBytes);
      expect(depth.reduce((s, r) => s + r.length, 0)).toBe(b.sizeBytes);
      const seen = new Set(depth.map((r) => r.depth));
      for (const d of [0, 1, 2, 4]) expect(seen.has(d)).toBe(true); // unallocated, top, below, the full base
      // The zeroed range of point 3 lives at depth 2 for point 4 (a zero cluster hides the base).
      expect(depth[0]?.depth).toBe(2);
      expect(status[0]?.hole).toBe(true);
    } finally {
      await disk.remove();
    }
  });

  it.runIf(haveQemu)('answers like qemu-img map of the same chain (allocation depth per extent)', async () => {
    const { dir } = await chainOf4();
    const { b, disk } = await open(dir, 3);
    try {
      const top = path.join(dir, fs.readdirSync(dir).find((f) => f.startsWith('0003-')) as string);
      const map = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', top], { encoding: 'utf8' })) as Array<{ start: number; length: number; depth: number; present: boolean }>;
      expect(map.length).toBeGreaterThan(3);
      for (const m of map) {
        // qemu-img map counts depth from 0 at the top; unallocated extents are not present.
        const want = m.present ? m.depth + 1 : 0;
        expect(b.allocationDepth(m.start, m.length)).toEqual([{ length: m.length, depth: want }]);
      }
    } finally {
      await disk.remove();
    }
  });

  it('reads compressed chains', async () => {
    const { dir, taken } = await chainOf4(true);
    const { disk } = await open(dir, 4);
    try {
      expect(sha(await blkdevRead(disk.part0, 0, disk.part0.sizeBytes))).toBe(taken[3]?.sha);
    } finally {
      await disk.remove();
    }
  });

  it('never returns damaged data: a flipped byte in an extent fails the reads of that extent with IOERR', async () => {
    const { dir, taken } = await chainOf4();
    const top = path.join(dir, fs.readdirSync(dir).find((f) => f.startsWith('0004-')) as string);
    const damage: Error[] = [];
    const { b, disk } = await open(dir, 4, (e) => damage.push(e));
    try {
      // The first cluster the top image holds data for, and where that data is in the file.
      let guest = -1;
      for (let pos = 0, i = 0, d = b.allocationDepth(0, b.sizeBytes); i < d.length; pos += (d[i] as { length: number }).length, i++) {
        if (d[i]?.depth === 1 && !(blkdevBlockStatus(disk.part0, pos, 512)?.[0]?.hole ?? false)) {
          guest = pos;
          break;
        }
      }
      expect(guest).toBeGreaterThanOrEqual(0);
      const r = await Qcow2Reader.open(top, { backing: false });
      const host = (await r.clusterAt(Math.floor(guest / 65536))).hostOffset;
      await r.close();
      const fd = fs.openSync(top, 'r+');
      const one = Buffer.alloc(1);
      fs.readSync(fd, one, 0, 1, host + 100);
      fs.writeSync(fd, Buffer.from([(one[0] as number) ^ 0xff]), 0, 1, host + 100);
      fs.closeSync(fd);
      const outcome = await blkdevRead(disk.part0, guest, 4096).then(() => 'read ok', (e: unknown) => (e as Error).message);
      expect(outcome).not.toBe('read ok');
      expect(damage.length).toBe(1);
      expect(String(damage[0]?.message)).toMatch(/XXH64 [0-9a-f]{16}; the manifest recorded [0-9a-f]{16}/);
      // Reads elsewhere (a cluster of the full base below) still work and are right.
      const raw = fs.readFileSync(taken[3]?.raw as string);
      const depth = b.allocationDepth(0, b.sizeBytes);
      let base = -1;
      for (let pos = 0, i = 0; i < depth.length; pos += (depth[i] as { length: number }).length, i++) if (depth[i]?.depth === 4 && base < 0) base = pos;
      expect(Buffer.compare(await blkdevRead(disk.part0, base, 4096), raw.subarray(base, base + 4096))).toBe(0);
    } finally {
      await disk.remove();
    }
  });

  it('holds the folder: prune refuses while a point is served, naming the holder, and works after', async () => {
    const { dir } = await chainOf4();
    const b = await ChainBackend.open(dir, { at: 4, holder: 'blkfilter serve --backup (test)' });
    try {
      const err = await prune(dir, { keepLast: 1 }).catch((e: unknown) => e);
      expect(BlkError.isInstance(err)).toBe(true);
      expect((err as BlkError).code).toBe('EBUSY');
      expect((err as Error).message).toContain('blkfilter serve --backup (test)');
      expect((err as Error).message).toContain(`pid ${process.pid}`);
    } finally {
      await b.close();
    }
    expect((await prune(dir, { keepLast: 1 })).removedPoints).toBe(3);
  });

  it('refuses writes, and a missing point', async () => {
    const { dir } = await chainOf4();
    await expect(ChainBackend.open(dir, { at: 9 })).rejects.toThrow(/choose 1 to 4/);
    const { disk } = await open(dir, 2);
    try {
      expect(disk.part0.readOnly).toBe(true);
      await expect(blkdevWrite(disk.part0, 0, Buffer.alloc(512))).rejects.toThrow();
    } finally {
      await disk.remove();
    }
  });
});
