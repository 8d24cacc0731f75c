// Shared by the tests (not exported by the package).
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { blkdevRead, blkdevWrite, createDiskSync, MemoryBackend, type Disk } from '@blkfilter/bio';
import { registerCbtFilter } from '@blkfilter/cbt';
import { attachFilter, detachFilter, listFilters } from '@blkfilter/registry';
import { createSnapshot, type Snapshot } from '@blkfilter/snapshot';
import { backupSnapshot, type BackupSnapshotOptions, type BackupSnapshotResult } from './snapshot-source.js';

let seq = 0;
const disks: Disk[] = [];
const dirs: string[] = [];

export const MiB = 1 << 20;

export const haveQemu = spawnSync('qemu-img', ['--version'], { stdio: 'ignore' }).status === 0;

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** A fresh temporary folder, removed by {@link cleanup}. */
export function tmpDir(prefix = 'blkfilter-backup-'): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  dirs.push(d);
  return d;
}

/** A memory disk with CBT attached (not persisted), removed by {@link cleanup}. */
export async function trackedDisk(sizeBytes: number): Promise<Disk> {
  registerCbtFilter();
  const d = createDiskSync({ name: `bk${process.pid}x${seq++}`, backend: new MemoryBackend({ sizeBytes }), scanPartitions: false });
  disks.push(d);
  await attachFilter(d.part0, 'cbt', { options: { stateFile: false } });
  return d;
}

/** Writes `count` random 64 KiB runs at pseudo-random places (deterministic places, random data). */
export async function scribble(d: Disk, count: number, salt: number): Promise<void> {
  const size = d.part0.sizeBytes;
  for (let i = 0; i < count; i++) {
    const at = (((i + 1) * 7919 * (salt + 3)) % Math.floor(size / 4096 - 16)) * 4096;
    await blkdevWrite(d.part0, at, randomBytes(65536));
  }
}

/** What a point must restore to: the device's bytes at the take, and a raw file of them. */
export interface Taken {
  readonly sha: string;
  readonly raw: string;
}

/**
 * Takes a real snapshot of `devices` (CBT switches at the same instant), backs its images up
 * into `dir` and destroys it; returns per device the bytes the point must restore to.
 */
export async function snapAndBackup(devices: readonly Disk[], dir: string, rawDir: string, options: Partial<BackupSnapshotOptions> = {}): Promise<{ result: BackupSnapshotResult; taken: Taken[]; snapshot: Snapshot }> {
  const s = await createSnapshot({ storage: { kind: 'memory', limitBytes: 64 * MiB } });
  try {
    for (const d of devices) await s.addDevice(d.part0);
    await s.take();
    const taken: Taken[] = [];
    for (const d of devices) {
      const bytes = await blkdevRead(s.image(d.part0), 0, d.part0.sizeBytes);
      const raw = path.join(rawDir, `${d.name}-${seq++}.raw`);
      fs.writeFileSync(raw, bytes);
      taken.push({ sha: createHash('sha256').update(bytes).digest('hex'), raw });
    }
    const images = devices.map((d) => s.image(d.part0));
    const result = await backupSnapshot({ dir, image: images.length === 1 ? (images[0] as never) : images, ...options });
    return { result, taken, snapshot: s };
  } finally {
    await s.destroy();
  }
}

export function sha256File(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

export async function cleanup(): Promise<void> {
  for (const d of disks.splice(0)) {
    for (const f of listFilters(d.part0)) await detachFilter(d.part0, f.name).catch(() => {});
    await d.remove();
  }
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
}
