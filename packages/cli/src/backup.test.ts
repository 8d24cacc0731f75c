import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { blkdevDiscard, blkdevRead, blkdevWrite, createDiskSync, MemoryBackend, type Disk } from '@blkfilter/bio';
import { cbtInfo, changedExtents, registerCbtFilter, resetCbt } from '@blkfilter/cbt';
import { attachFilter, detachFilter, FILTER_API_VERSION, filterCtl, listFilters, registerFilter, withFrozenDevices } from '@blkfilter/registry';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { clusterRanges, readManifest, restoreBackup, runBackup, verifyBackup } from './backup.js';

const MiB = 1 << 20;
const SIZE = 16 * MiB;

let dir: string;
let disk: Disk;
let n = 0;
const images: Disk[] = [];

beforeAll(async () => {
  registerCbtFilter();
  registerFilter({ name: 'test-taker', apiVersion: FILTER_API_VERSION, attach: (ctx) => ({ ctl: { take: (d) => ctx.snapshotTaken({ devices: d as string[] }) } }) });
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'backup-'));
  disk = createDiskSync({ name: 'bk0', backend: new MemoryBackend({ sizeBytes: SIZE }), scanPartitions: false });
  await attachFilter(disk.part0, 'cbt', { options: { stateFile: false } });
  await attachFilter(disk.part0, 'test-taker', { altitude: 1 });
});
afterAll(async () => {
  for (const f of listFilters(disk.part0)) await detachFilter(disk.part0, f.name);
  await disk.remove();
  for (const i of images) await i.remove();
  fs.rmSync(dir, { recursive: true, force: true });
});

/**
 * Takes a "snapshot": at a frozen instant, switches the CBT generation and copies the device
 * into a new memory disk that stands for the snapshot image (the snapshot package's job).
 */
async function take(): Promise<{ image: Disk; sha: string }> {
  await withFrozenDevices([disk.part0], () => filterCtl(disk.part0, 'test-taker', 'take', [disk.name]));
  // Nothing writes between the take and this copy in these tests (a real snapshot makes the
  // image at the frozen instant; the device's own bios wait while it is frozen).
  const copy = await blkdevRead(disk.part0, 0, SIZE);
  const image = createDiskSync({ name: `bk0-img${n++}`, backend: new MemoryBackend({ sizeBytes: SIZE }), scanPartitions: false });
  await blkdevWrite(image.part0, 0, copy);
  images.push(image);
  return { image, sha: createHash('sha256').update(copy).digest('hex') };
}

async function cbtFor(): Promise<NonNullable<Parameters<typeof runBackup>[0]['cbt']>> {
  const info = await cbtInfo(disk.part0);
  return {
    take: { generationId: info.snapGenerationId ?? info.generationId, snapNumber: info.snapNumber },
    changedSince: (generationId, since) => changedExtents(disk.part0, { since, generationId }),
  };
}

const qemu = (() => {
  try {
    execFileSync('qemu-img', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

describe('backups driven by CBT', () => {
  it('makes a full backup, then incrementals that read only what changed, and restores each point', async () => {
    for (let i = 0; i < 40; i++) await blkdevWrite(disk.part0, (i * 397 * 4096) % (SIZE - 65536), randomBytes(65536));
    const s1 = await take();
    const progress: number[] = [];
    const b1 = await runBackup({ source: s1.image.part0, dir, deviceName: 'bk0', cbt: await cbtFor(), onProgress: (d) => progress.push(d) });
    expect(b1.entry.kind).toBe('full');
    expect(b1.fullBecause).toMatch(/no earlier backup/);
    expect(b1.entry.bytesRead).toBe(SIZE);
    expect(progress.at(-1)).toBe(SIZE);
    expect(b1.verifiedClusters).toBeGreaterThan(0);

    // Some writes, a discard inside old data, then the second take.
    await blkdevWrite(disk.part0, 5 * MiB, randomBytes(256 * 1024));
    await blkdevWrite(disk.part0, 12 * MiB + 65536, randomBytes(4096));
    await blkdevDiscard(disk.part0, 0, 2 * 65536);
    const s2 = await take();
    const b2 = await runBackup({ source: s2.image.part0, dir, deviceName: 'bk0', cbt: await cbtFor() });
    expect(b2.entry.kind).toBe('incremental');
    const changed = 256 * 1024 + 65536 + 2 * 65536;
    expect(b2.entry.changedBytes).toBe(changed);
    expect(b2.entry.bytesRead).toBeLessThanOrEqual(changed * 1.05);

    // Nothing changed: an incremental with nothing in it is still a valid point.
    const s3 = await take();
    const b3 = await runBackup({ source: s3.image.part0, dir, deviceName: 'bk0', cbt: await cbtFor() });
    expect(b3.entry.kind).toBe('incremental');
    expect(b3.entry.bytesRead).toBe(0);

    for (const [at, snap] of [[1, s1], [2, s2], [3, s3]] as const) {
      const out = path.join(dir, `restored-${at}.raw`);
      const r = await restoreBackup({ dir, to: out, at });
      expect(r.sha256, `restore at ${at}`).toBe(snap.sha);
      expect((await verifyBackup(dir, out, at)).equal).toBe(true);
    }
    await expect(restoreBackup({ dir, to: path.join(dir, 'restored-1.raw'), at: 1 })).rejects.toMatchObject({ code: 'EEXIST' });
    await expect(restoreBackup({ dir, to: path.join(dir, 'x.raw'), at: 9 })).rejects.toThrow(/choose 1 to 3/);

    if (qemu) {
      const top = path.join(dir, (await readManifest(dir))?.backups.at(-1)?.file ?? '');
      const check = JSON.parse(execFileSync('qemu-img', ['check', '--output=json', top], { encoding: 'utf8' })) as Record<string, unknown>;
      expect(check['check-errors']).toBe(0);
      const chain = JSON.parse(execFileSync('qemu-img', ['info', '--backing-chain', '--output=json', top], { encoding: 'utf8' })) as unknown[];
      expect(chain).toHaveLength(3);
      execFileSync('qemu-img', ['compare', '-q', '-F', 'raw', top, path.join(dir, 'restored-3.raw')]);
      execFileSync('qemu-img', ['compare', '-q', '-F', 'raw', path.join(dir, '0002-incremental.qcow2'), path.join(dir, 'restored-2.raw')]);
    }
  });

  it('falls back to a full backup, and says why, when the CBT generation changed', async () => {
    await resetCbt(disk.part0);
    await blkdevWrite(disk.part0, 0, randomBytes(4096));
    const s = await take();
    const notices: string[] = [];
    const b = await runBackup({ source: s.image.part0, dir, deviceName: 'bk0', mode: 'incremental', cbt: await cbtFor(), onNotice: (m) => notices.push(m) });
    expect(b.entry.kind).toBe('full');
    expect(notices[0]).toMatch(/incremental backup not possible: CBT cannot tell what changed/);
    const out = path.join(dir, 'restored-reset.raw');
    expect((await restoreBackup({ dir, to: out })).sha256).toBe(s.sha);
  });

  it('refuses a folder that holds another device', async () => {
    const other = createDiskSync({ name: 'bk-other', backend: new MemoryBackend({ sizeBytes: 2 * MiB }), scanPartitions: false });
    images.push(other);
    await expect(runBackup({ source: other.part0, dir })).rejects.toThrow(/holds backups of "bk0"/);
  });

  it('widens extents to whole clusters and merges neighbours', () => {
    expect(clusterRanges([{ sector: 130, sectors: 8 }, { sector: 0, sectors: 1 }, { sector: 127, sectors: 2 }], 65536, 1 << 20)).toEqual([{ start: 0, end: 131072 }]);
    expect(clusterRanges([{ sector: 2040, sectors: 100 }], 65536, 1 << 20)).toEqual([{ start: 983040, end: 1048576 }]);
  });
});
