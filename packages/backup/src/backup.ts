import fs from 'node:fs/promises';
import path from 'node:path';
import { blkdevRead, InvalidArgumentError, SECTOR_SIZE, type BlockDev } from '@blkfilter/bio';
import type { ChangedExtentsQuery, ChangedExtentsResult } from '@blkfilter/cbt';
import { isZero, PARTIAL_SUFFIX } from './chain.js';
import { NEW_FOLDER_ALGORITHM } from './digest.js';
import { BackupCancelledError, ChainError, DuplicateTakeError } from './errors.js';
import { DEFAULT_CLUSTER_SIZE } from './format.js';
import { fsyncDir, lockFolder } from './fsutil.js';
import { HOLE, holeClusters, STATUS_SPAN } from './holes.js';
import { DIGEST_SPAN, fileDigest, ImageBuilder, verifyNewImage, type StepHook } from './image-builder.js';
import { MANIFEST_FILE, readManifestFile, writeManifest, type BackupPoint, type ImageEntry, type Manifest } from './manifest.js';
import { recover } from './recover.js';
import { Qcow2Writer } from './writer.js';

/**
 * The CBT side of a snapshot: the generation id and take number of the read map the
 * snapshot stands for (`CbtInfo.snapGenerationId ?? generationId`, `CbtInfo.snapNumber`), and
 * a way to ask what changed since an earlier take (`changedExtents` of `@blkfilter/cbt`).
 */
export interface CbtTake {
  readonly generationId: string;
  readonly snapNumber: number;
  changedSince(query: ChangedExtentsQuery): Promise<ChangedExtentsResult>;
}

/** One device of a backup point. */
export interface BackupSource {
  /** Name recorded in the manifest (the original device's name). */
  readonly name: string;
  /** What to copy: a snapshot image (or any device that holds still). */
  readonly image: BlockDev;
  /** CBT of the original device for this snapshot; without it the image is copied in full. */
  readonly cbt?: CbtTake | null;
}

/** Options of {@link backupPoint}. */
export interface BackupPointOptions {
  /** The backup folder (created if missing). */
  readonly dir: string;
  /** The devices of one snapshot; a folder always holds the same set of devices. */
  readonly sources: readonly BackupSource[];
  /** The snapshot, recorded so that the same snapshot is not backed up twice. */
  readonly snapshotId?: string | null;
  /** `auto` (default): incremental where the chain and CBT allow it, else full. */
  readonly mode?: 'auto' | 'full' | 'incremental';
  /** Cluster size of a new folder (default 64 KiB). */
  readonly clusterSize?: number;
  /** Write deflate-compressed qcow2 clusters. */
  readonly compress?: boolean;
  /** Bytes read per request from the source (default 1 MiB). */
  readonly readSize?: number;
  readonly onProgress?: (done: number, total: number) => void;
  /**
   * Cancels the backup: checked between reads and before the commit. A cancelled backup
   * throws {@link BackupCancelledError}, removes its partial files and records nothing.
   */
  readonly signal?: AbortSignal;
  /** Called with a sentence when a backup is full although incremental was possible or asked. */
  readonly onNotice?: (message: string) => void;
  /** For crash tests: called at each durable step. */
  readonly onStep?: StepHook;
}

/** What one device's image of a backup is. */
export interface BackupImageResult {
  readonly entry: ImageEntry;
  readonly path: string;
  /** Why the image is full (null for incremental). */
  readonly fullBecause: string | null;
  /** Data extents re-read from the new image and checked against their digests. */
  readonly verifiedExtents: number;
}

/** What {@link backupPoint} did. */
export interface BackupResult {
  readonly point: BackupPoint;
  /** 1-based position of the point in the chain (what `restore --at` takes). */
  readonly position: number;
  readonly images: readonly BackupImageResult[];
  /** Leftovers of an interrupted backup or prune that were cleared first. */
  readonly clearedLeftovers: readonly string[];
}

function slug(name: string): string {
  return name.replace(/[^A-Za-z0-9_.-]/g, '_').replace(/^\.+/, '_').slice(0, 64) || 'disk';
}

function imageName(seq: number, device: string): string {
  return `${String(seq).padStart(4, '0')}-${slug(device)}.qcow2`;
}

/** Sector extents widened to whole clusters, merged, sorted, clipped to the disk. */
export function clusterRanges(extents: ReadonlyArray<{ readonly sector: number; readonly sectors: number }>, clusterSize: number, virtualSize: number): Array<{ start: number; end: number }> {
  const sorted = [...extents].sort((a, b) => a.sector - b.sector);
  const out: Array<{ start: number; end: number }> = [];
  for (const e of sorted) {
    const start = Math.floor((e.sector * SECTOR_SIZE) / clusterSize) * clusterSize;
    const end = Math.min(virtualSize, Math.ceil(((e.sector + e.sectors) * SECTOR_SIZE) / clusterSize) * clusterSize);
    if (end <= start) continue;
    const tail = out.at(-1);
    if (tail !== undefined && start <= tail.end) tail.end = Math.max(tail.end, end);
    else out.push({ start, end });
  }
  return out;
}

/**
 * Backs up the devices of one snapshot into `dir` as one new point: per device a qcow2 image,
 * full or (where the previous point and CBT allow) incremental over the device's previous
 * image. Crash-safe: under the folder's lock, leftovers of an interrupted run are cleared
 * first; images are written under `.partial` names and synced, re-read and checked, then the
 * manifest is replaced atomically (the commit), then the images are renamed. A crash at any
 * point leaves the previous chain intact and the next backup working.
 *
 * Refuses a snapshot whose take (CBT generation and take number, or snapshot id) is already a
 * point of the chain ({@link DuplicateTakeError}), and a folder of other devices.
 */
export async function backupPoint(options: BackupPointOptions): Promise<BackupResult> {
  const { dir, sources } = options;
  const step = options.onStep;
  const mode = options.mode ?? 'auto';
  if (sources.length === 0) throw new InvalidArgumentError('backup needs at least one device');
  const names = new Set(sources.map((s) => s.name));
  if (names.size !== sources.length) throw new InvalidArgumentError(`device names must be unique: ${sources.map((s) => s.name).join(', ')}`);
  if (new Set(sources.map((s) => slug(s.name))).size !== sources.length) throw new InvalidArgumentError(`device names ${sources.map((s) => s.name).join(', ')} give the same file names`);
  await fs.mkdir(dir, { recursive: true });
  const lock = await lockFolder(dir, 'exclusive');
  const partials: string[] = [];
  try {
    const clearedLeftovers = await recover(dir, step);
    const prev = await readManifestFile(path.join(dir, MANIFEST_FILE));
    const clusterSize = prev?.clusterSize ?? options.clusterSize ?? DEFAULT_CLUSTER_SIZE;
    const span = prev?.digestSpan ?? DIGEST_SPAN;
    // A folder keeps the extent digest it was started with (SHA-256 for a version 2 folder).
    const algorithm = prev?.extentDigest ?? NEW_FOLDER_ALGORITHM;
    const devices = sources.map((s) => ({ name: s.name, virtualSize: s.image.sizeBytes }));
    if (prev !== null) {
      const same = prev.devices.length === devices.length && prev.devices.every((d, i) => d.name === devices[i]?.name && d.virtualSize === devices[i]?.virtualSize);
      if (!same) {
        const list = (ds: ReadonlyArray<{ name: string; virtualSize: number }>): string => ds.map((d) => `"${d.name}" (${d.virtualSize} bytes)`).join(', ');
        throw new ChainError(dir, null, `holds backups of ${list(prev.devices)}, not of ${list(devices)}: use another folder`);
      }
    }
    // The same take twice would add an empty point that claims a new instant.
    for (const [pi, p] of (prev?.points ?? []).entries()) {
      if (options.snapshotId != null && p.snapshotId === options.snapshotId) {
        throw new DuplicateTakeError(`snapshot ${options.snapshotId} is already point ${pi + 1} (${p.images.map((i) => i.file).join(', ')}) of ${dir}: take a new snapshot to back up again`);
      }
      for (const [d, s] of sources.entries()) {
        const img = p.images[d];
        if (s.cbt != null && img?.generationId === s.cbt.generationId && img.snapNumber === s.cbt.snapNumber) {
          throw new DuplicateTakeError(`take ${s.cbt.snapNumber} of CBT generation ${s.cbt.generationId} of "${s.name}" is already point ${pi + 1} (${img.file}) of ${dir}: take a new snapshot to back up again`);
        }
      }
    }
    const seq = (prev?.points.at(-1)?.seq ?? 0) + 1;
    const last = prev?.points.at(-1) ?? null;
    // Plan every device first, so that progress knows the total.
    const plans = [];
    for (const [d, s] of sources.entries()) {
      const before = last?.images[d] ?? null;
      let ranges: Array<{ start: number; end: number }> | null = null;
      let changedBytes = s.image.sizeBytes;
      let fullBecause: string | null = null;
      if (mode === 'full') fullBecause = 'a full backup was asked for';
      else if (before === null) fullBecause = 'there is no earlier backup in this folder';
      else if (s.cbt == null) fullBecause = 'no changed-block tracking is available for this device';
      else if (before.generationId === null || before.snapNumber === null) fullBecause = 'the last backup has no CBT generation recorded';
      else {
        const answer = await s.cbt.changedSince({ generationId: before.generationId, since: before.snapNumber });
        if (answer.kind === 'extents') {
          ranges = clusterRanges(answer.extents, clusterSize, s.image.sizeBytes);
          changedBytes = answer.extents.reduce((n, e) => n + e.sectors * SECTOR_SIZE, 0);
        } else fullBecause = `CBT cannot tell what changed since the last backup (${answer.reason}: ${answer.message})`;
      }
      if (fullBecause !== null && mode === 'incremental') options.onNotice?.(`"${s.name}": incremental backup not possible: ${fullBecause}; making a full backup instead`);
      plans.push({ source: s, before, ranges: ranges ?? [{ start: 0, end: s.image.sizeBytes }], incremental: ranges !== null, changedBytes, fullBecause });
    }
    const total = plans.reduce((n, p) => n + p.ranges.reduce((m, r) => m + r.end - r.start, 0), 0);
    let done = 0;
    options.onProgress?.(0, total);
    const images: BackupImageResult[] = [];
    for (const [d, plan] of plans.entries()) {
      const started = performance.now();
      const s = plan.source;
      const file = imageName(seq, s.name);
      const partial = path.join(dir, file + PARTIAL_SUFFIX);
      const backing = plan.incremental ? (plan.before as ImageEntry).file : null;
      const writer = await Qcow2Writer.create(partial, {
        virtualSize: s.image.sizeBytes,
        clusterSize,
        compress: options.compress === true,
        ...(backing !== null ? { backingFile: backing, backingFormat: 'qcow2' as const } : {}),
      });
      partials.push(partial);
      const builder = new ImageBuilder(writer, span, algorithm);
      let bytesRead = 0;
      try {
        const readSize = Math.max(clusterSize, Math.floor((options.readSize ?? 1 << 20) / clusterSize) * clusterSize);
        const buf = Buffer.alloc(readSize);
        let started = false;
        for (const r of plan.ranges) {
          // Block status first (a window at a time), then read only the clusters holding data.
          // A hole is stored as a zero cluster (incremental: it hides the backing file) or left
          // unallocated (full), as a cluster read back as all zeros is: the image and the
          // manifest are the same as if it had been read.
          for (let win = r.start; win < r.end; win += STATUS_SPAN) {
            const winEnd = Math.min(r.end, win + STATUS_SPAN);
            const holes = holeClusters(s.image, win, winEnd, clusterSize);
            const first = win / clusterSize;
            let pos = win;
            while (pos < winEnd) {
              if (options.signal?.aborted === true) throw new BackupCancelledError(`backup into ${dir} cancelled after ${done} of ${total} bytes; nothing was recorded and the chain is as it was`);
              let k = (pos - win) / clusterSize;
              const hole = holes !== null && holes[k] === HOLE;
              // The run of clusters of the same kind from here (data: at most readSize bytes).
              const limit = hole ? holes.length : k + readSize / clusterSize;
              k++;
              while (k < limit && win + k * clusterSize < winEnd && (holes !== null && holes[k] === HOLE) === hole) k++;
              const n = Math.min(winEnd, win + k * clusterSize) - pos;
              if (hole) {
                if (plan.incremental) for (let i = (pos - win) / clusterSize; i < k; i++) await builder.zero(first + i);
              } else {
                const chunk = buf.subarray(0, n);
                await blkdevRead(s.image, pos, n, chunk);
                bytesRead += n;
                for (let off = 0; off < n; off += clusterSize) {
                  const c = chunk.subarray(off, Math.min(n, off + clusterSize));
                  const index = (pos + off) / clusterSize;
                  // Full: a zero cluster stays unallocated (reads as zeros). Incremental: hide the backing file.
                  if (isZero(c)) {
                    if (plan.incremental) await builder.zero(index);
                  } else await builder.data(index, c);
                }
              }
              pos += n;
              done += n;
              if (!started) {
                started = true;
                step?.('copying');
              }
              options.onProgress?.(done, total);
            }
          }
        }
        await builder.close();
      } catch (err) {
        await writer.abort();
        throw err;
      }
      const { size, sha256 } = await fileDigest(partial);
      const entry: ImageEntry = {
        device: s.name,
        file,
        kind: plan.incremental ? 'incremental' : 'full',
        backing,
        size,
        sha256,
        compressed: writer.compressedClusters > 0,
        generationId: s.cbt?.generationId ?? null,
        snapNumber: s.cbt?.snapNumber ?? null,
        bytesRead,
        bytesWritten: writer.dataBytes,
        changedBytes: plan.changedBytes,
        durationMs: Math.round(performance.now() - started),
        extents: builder.extents,
        zeros: builder.zeros,
      };
      const verifiedExtents = await verifyNewImage(partial, entry, devices[d] as Manifest['devices'][number], clusterSize, span, algorithm);
      images.push({ entry, path: path.join(dir, file), fullBecause: plan.incremental ? null : plan.fullBecause, verifiedExtents });
    }
    if (options.signal?.aborted === true) throw new BackupCancelledError(`backup into ${dir} cancelled before it was recorded; nothing was recorded and the chain is as it was`);
    step?.('images-written');
    const point: BackupPoint = { seq, createdAt: new Date().toISOString(), snapshotId: options.snapshotId ?? null, images: images.map((i) => i.entry) };
    const next: Manifest = prev === null
      ? { format: 'blkfilter-backup', version: 3, clusterSize, digestSpan: span, extentDigest: algorithm, devices, points: [point] }
      : { ...prev, points: [...prev.points, point] };
    // The commit: once the manifest names the point, readers find its images (under .partial
    // until the renames below; a later backup finishes them).
    await writeManifest(dir, next, step);
    step?.('manifest-replaced');
    for (const p of partials) await fs.rename(p, p.slice(0, -PARTIAL_SUFFIX.length));
    partials.length = 0;
    await fsyncDir(dir);
    step?.('images-renamed');
    return { point, position: next.points.length, images, clearedLeftovers };
  } catch (err) {
    for (const p of partials) await fs.rm(p, { force: true }).catch(() => {});
    throw err;
  } finally {
    await lock.release();
  }
}
