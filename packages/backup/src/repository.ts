import { createHash, randomBytes, type Hash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import {
  BlkError,
  blkdevFlush,
  blkdevRead,
  blkdevWrite,
  blkdevZeroout,
  InvalidArgumentError,
  ReadOnlyDeviceError,
  SECTOR_SIZE,
  type BlockDev,
} from '@blkfilter/bio';
import type { ChangedExtentsQuery, ChangedExtentsResult } from '@blkfilter/cbt';
import {
  composeChain,
  IMAGE_NAME,
  isZero,
  openChain,
  openImageFile,
  openView,
  PARTIAL_SUFFIX,
  PRUNE_SUFFIX,
  readExtent,
  readJournal,
  staleFiles,
  type OpenedImage,
  type RepositoryView,
} from './chain.js';
import { ChainError, DuplicateTakeError, RepositoryDamageError, TargetExistsError } from './errors.js';
import { DEFAULT_CLUSTER_SIZE } from './format.js';
import { atomicWriteFile, fsyncDir, lockFolder } from './fsutil.js';
import {
  JOURNAL_FILE,
  MANIFEST_FILE,
  manifestText,
  parseManifest,
  readManifestFile,
  writeManifest,
  type BackupPoint,
  type ExtentDigest,
  type ImageEntry,
  type Manifest,
  type ZeroExtent,
} from './manifest.js';
import { openImage, type ImageReader } from './reader.js';
import { Qcow2Writer } from './writer.js';

/** Bytes of guest disk per extent digest window (and per restore step). */
export const DIGEST_SPAN = 4 << 20;

/** Called at each durable step of a backup or prune (crash tests kill the process here). */
export type StepHook = (step: string) => void;

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

/**
 * Completes or clears what an interrupted backup or prune left, under the folder's exclusive
 * lock: a committed prune (journal present) is rolled forward; a recorded image still under
 * its `.partial` name is renamed; `.partial`, `.prune` and `.tmp` files nobody recorded are
 * deleted, and so are old images a committed prune had not yet removed. Files that look like
 * newer points than the manifest knows are not touched: that is a stale manifest, an error.
 */
async function recover(dir: string, step?: StepHook): Promise<string[]> {
  const cleared: string[] = [];
  const journal = await readJournal(dir);
  if (journal !== null) {
    for (const f of journal.replace) {
      await fs.rename(path.join(dir, f + PRUNE_SUFFIX), path.join(dir, f)).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== 'ENOENT') throw err;
      });
    }
    await fsyncDir(dir);
    await atomicWriteFile(path.join(dir, MANIFEST_FILE), journal.manifest);
    for (const f of journal.remove) await fs.rm(path.join(dir, f), { force: true });
    await fs.rm(path.join(dir, JOURNAL_FILE), { force: true });
    await fsyncDir(dir);
    cleared.push(`completed an interrupted prune (${JOURNAL_FILE})`);
    step?.('recovered-prune');
  }
  const m = await readManifestFile(path.join(dir, MANIFEST_FILE));
  const recorded = new Set(m?.points.flatMap((p) => p.images.map((i) => i.file)) ?? []);
  for (const f of recorded) {
    const base = path.join(dir, f);
    try {
      await fs.lstat(base);
    } catch {
      // Recorded, but the backup died before its rename: finish it.
      await fs.rename(base + PARTIAL_SUFFIX, base).catch(() => {});
    }
  }
  const oldest = m?.points[0]?.seq ?? Infinity;
  const names = await fs.readdir(dir);
  const stale: string[] = [];
  for (const n of names) {
    const img = IMAGE_NAME.exec(n);
    let remove = n.endsWith(PARTIAL_SUFFIX) || n.endsWith(PRUNE_SUFFIX) || n === `${MANIFEST_FILE}.tmp` || n === `${JOURNAL_FILE}.tmp`;
    if (img !== null && !recorded.has(n)) {
      if (m !== null && Number(img[1]) < oldest) remove = true; // a committed prune's old file
      else stale.push(n);
    }
    if (remove) {
      await fs.rm(path.join(dir, n), { force: true });
      cleared.push(n);
    }
  }
  if (cleared.length > 0) await fsyncDir(dir);
  if (stale.length > 0) {
    throw new ChainError(
      path.join(dir, MANIFEST_FILE),
      null,
      m === null
        ? `missing, but the folder holds ${stale.join(', ')}: the manifest was lost; put it back from a copy, or back up into another folder`
        : `does not record ${stale.join(', ')}, newer than its newest point (seq ${m.points.at(-1)?.seq ?? 0}): the manifest is stale (an old copy?); put the right one back, or move those files away`,
    );
  }
  return cleared;
}

/** Accumulates a new image: writes clusters and records data extents with digests and zero runs. */
class ImageBuilder {
  readonly extents: ExtentDigest[] = [];
  readonly zeros: ZeroExtent[] = [];
  private runStart = 0;
  private runLen = 0;
  private runHash: Hash | null = null;

  constructor(
    readonly writer: Qcow2Writer,
    private readonly span: number,
  ) {}

  /** Guest cluster `index` holds `bytes` (the last cluster may be shorter). */
  async data(index: number, bytes: Buffer): Promise<void> {
    const g = index * this.writer.clusterSize;
    await this.writer.writeCluster(index, bytes);
    if (this.runHash !== null && this.runStart + this.runLen === g && Math.floor(this.runStart / this.span) === Math.floor(g / this.span)) {
      this.runHash.update(bytes);
      this.runLen += bytes.length;
      return;
    }
    this.endRun();
    this.runStart = g;
    this.runLen = bytes.length;
    this.runHash = createHash('sha256').update(bytes);
  }

  /** Guest cluster `index` reads as zeros, hiding the backing file. */
  async zero(index: number): Promise<void> {
    await this.writer.zeroCluster(index);
    const cs = this.writer.clusterSize;
    const g = index * cs;
    const len = Math.min(cs, this.writer.virtualSize - g);
    const last = this.zeros.at(-1);
    if (last !== undefined && last[0] + last[1] === g) this.zeros[this.zeros.length - 1] = [last[0], last[1] + len];
    else this.zeros.push([g, len]);
  }

  private endRun(): void {
    if (this.runHash !== null && this.runLen > 0) this.extents.push([this.runStart, this.runLen, this.runHash.digest('hex')]);
    this.runHash = null;
    this.runLen = 0;
  }

  async close(): Promise<void> {
    this.endRun();
    await this.writer.close();
  }
}

/** SHA-256 and size of a whole file. */
async function fileDigest(file: string): Promise<{ size: number; sha256: string }> {
  const fh = await fs.open(file, 'r');
  try {
    const hash = createHash('sha256');
    const buf = Buffer.allocUnsafe(4 << 20);
    let size = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, size);
      if (bytesRead === 0) break;
      hash.update(buf.subarray(0, bytesRead));
      size += bytesRead;
    }
    return { size, sha256: hash.digest('hex') };
  } finally {
    await fh.close();
  }
}

/**
 * Re-reads a new image as restore will: structure, cluster map against the recorded extents,
 * every data extent against its digest. Returns the number of extents checked.
 */
async function verifyNewImage(where: string, entry: ImageEntry, dev: Manifest['devices'][number], clusterSize: number, span: number): Promise<number> {
  const reader = await openImageFile(where, entry, dev, clusterSize);
  try {
    const scratch = Buffer.allocUnsafe(span);
    for (const [s, l, sha] of entry.extents) await readExtent(reader, s, l, sha, scratch);
    return entry.extents.length;
  } finally {
    await reader.close();
  }
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
      const builder = new ImageBuilder(writer, span);
      let bytesRead = 0;
      try {
        const readSize = Math.max(clusterSize, Math.floor((options.readSize ?? 1 << 20) / clusterSize) * clusterSize);
        const buf = Buffer.alloc(readSize);
        for (const r of plan.ranges) {
          for (let pos = r.start; pos < r.end; pos += readSize) {
            const n = Math.min(readSize, r.end - pos);
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
            done += n;
            if (bytesRead === n) step?.('copying');
            options.onProgress?.(done, total);
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
      const verifiedExtents = await verifyNewImage(partial, entry, devices[d] as Manifest['devices'][number], clusterSize, span);
      images.push({ entry, path: path.join(dir, file), fullBecause: plan.incremental ? null : plan.fullBecause, verifiedExtents });
    }
    step?.('images-written');
    const point: BackupPoint = { seq, createdAt: new Date().toISOString(), snapshotId: options.snapshotId ?? null, images: images.map((i) => i.entry) };
    const next: Manifest = prev === null
      ? { format: 'blkfilter-backup', version: 2, clusterSize, digestSpan: span, devices, points: [point] }
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

/** Picks the device and 1-based position a reader asked for. */
function pick(view: RepositoryView, at: number | undefined, device: string | undefined): { position: number; deviceIndex: number; point: BackupPoint } {
  const m = view.manifest;
  const n = m.points.length;
  if (n === 0) throw new ChainError(path.join(view.dir, MANIFEST_FILE), null, 'records no points');
  const position = at ?? n;
  const point = m.points[position - 1];
  if (!Number.isInteger(position) || point === undefined) throw new InvalidArgumentError(`backup ${position} does not exist in ${view.dir}: choose 1 to ${n}`);
  let deviceIndex = 0;
  if (device !== undefined) {
    deviceIndex = m.devices.findIndex((d) => d.name === device);
    if (deviceIndex < 0) throw new InvalidArgumentError(`${view.dir} holds no device "${device}": it holds ${m.devices.map((d) => d.name).join(', ')}`);
  } else if (m.devices.length > 1) {
    throw new InvalidArgumentError(`${view.dir} holds ${m.devices.map((d) => d.name).join(', ')}: choose one device`);
  }
  return { position, deviceIndex, point };
}

async function refuseStale(view: RepositoryView): Promise<void> {
  const stale = await staleFiles(view.dir, view.manifest);
  if (stale.length > 0) {
    throw new ChainError(
      path.join(view.dir, MANIFEST_FILE),
      null,
      `does not record ${stale.join(', ')}, newer than its newest point: the manifest is stale, so "the newest point" is unknown; give a point explicitly (--at) or put the right manifest back`,
    );
  }
}

async function closeAll(chain: readonly OpenedImage[]): Promise<void> {
  for (const c of chain) await c.reader.close().catch(() => {});
}

/** Options of {@link restore}. */
export interface RestoreOptions {
  /** Where to write: a raw image file to create, or a device (at least as large). */
  readonly to: string | BlockDev;
  /** 1-based position in the chain (default: the newest point). */
  readonly at?: number;
  /** Which device of a folder that holds several. */
  readonly device?: string;
  /** Replace an existing target file. */
  readonly force?: boolean;
  /** Also compute the SHA-256 of the restored disk (one more pass over the bytes in memory). */
  readonly hash?: boolean;
  readonly onProgress?: (done: number, total: number) => void;
}

/** What {@link restore} wrote. */
export interface RestoreResult {
  readonly position: number;
  readonly point: BackupPoint;
  readonly image: ImageEntry;
  readonly bytes: number;
  /** SHA-256 of the restored disk when `hash` was asked for, else null. */
  readonly sha256: string | null;
}

/**
 * Writes a device as it was at a point. Every image of the point's chain is checked first
 * (size, header, structure as `qemu-img check`, cluster map against the manifest), and every
 * data extent against its digest as it is read; nothing wrong is ever written out with
 * success. A file target is written under a temporary name next to it and renamed at the end
 * (fsync, rename, fsync of the folder); on any error nothing is left behind. A device target
 * cannot be swapped in, so the whole chain is checked in a first pass before anything is
 * written to it.
 */
export async function restore(dir: string, options: RestoreOptions): Promise<RestoreResult> {
  const lock = await lockFolder(dir, 'shared').catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') throw new BlkError('ENOENT', `${dir}: the backup folder does not exist`);
    throw err;
  });
  try {
    const view = await openView(dir);
    if (options.at === undefined) await refuseStale(view);
    const { position, deviceIndex, point } = pick(view, options.at, options.device);
    const dev = view.manifest.devices[deviceIndex] as Manifest['devices'][number];
    const image = point.images[deviceIndex] as ImageEntry;
    const span = view.manifest.digestSpan;
    const hash = options.hash === true ? createHash('sha256') : null;
    const chain = await openChain(view, deviceIndex, position);
    try {
      if (typeof options.to !== 'string') {
        const target = options.to;
        if (target.readOnly) throw new ReadOnlyDeviceError(`cannot restore to "${target.name}": the device is read-only (EROFS)`);
        if (target.sizeBytes < dev.virtualSize) throw new InvalidArgumentError(`cannot restore ${dev.virtualSize} bytes to "${target.name}": it holds only ${target.sizeBytes}`);
        await composeChain(chain, dev.virtualSize, span, async () => {}, (d, t) => options.onProgress?.(d / 2, t), true);
        await composeChain(
          chain,
          dev.virtualSize,
          span,
          async (offset, data, zero) => {
            hash?.update(data); // synchronously, so in window order
            if (zero) await blkdevZeroout(target, offset, data.length);
            else await blkdevWrite(target, offset, data);
          },
          (d, t) => options.onProgress?.(t / 2 + d / 2, t),
          true,
        );
        await blkdevFlush(target);
      } else {
        await restoreToFile(chain, dev.virtualSize, span, options.to, options.force === true, hash, options.onProgress);
      }
    } finally {
      await closeAll(chain);
    }
    return { position, point, image, bytes: dev.virtualSize, sha256: hash?.digest('hex') ?? null };
  } finally {
    await lock.release();
  }
}

async function restoreToFile(
  chain: readonly OpenedImage[],
  size: number,
  span: number,
  to: string,
  force: boolean,
  hash: Hash | null,
  onProgress?: (done: number, total: number) => void,
): Promise<void> {
  const target = path.resolve(to);
  if (!force) {
    const there = await fs.lstat(target).then(
      () => true,
      () => false,
    );
    if (there) throw new TargetExistsError(`${target} exists (EEXIST): choose another name, or pass --force (force: true) to overwrite it`);
  }
  const tmp = path.join(path.dirname(target), `.${path.basename(target)}.${process.pid}.${randomBytes(4).toString('hex')}.restoring`);
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(tmp, 'wx');
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new BlkError(e.code ?? 'EIO', `cannot create the restore target in ${path.dirname(target)}: ${e.message}`, { cause: err });
  }
  try {
    await fh.truncate(size);
    await composeChain(
      chain,
      size,
      span,
      async (offset, data, zero) => {
        hash?.update(data); // synchronously, so in window order
        if (zero) return; // a hole in the sparse file
        let done = 0;
        while (done < data.length) done += (await fh.write(data, done, data.length - done, offset + done)).bytesWritten;
      },
      onProgress,
      true,
    );
    await fh.sync();
    await fh.close();
    await fs.rename(tmp, target);
    await fsyncDir(path.dirname(target));
  } catch (err) {
    await fh.close().catch(() => {});
    await fs.rm(tmp, { force: true }).catch(() => {});
    throw err;
  }
}

/** One thing wrong that {@link verify} found. */
export interface VerifyProblem {
  /** The damaged file. */
  readonly file: string;
  /** Byte offset in it, when the problem is at one place. */
  readonly offset: number | null;
  /** `EBADIMG`, `EBADSUM`, `EBADCHAIN`, `EBADMANIFEST`, or an errno such as `ENOENT`. */
  readonly code: string;
  readonly message: string;
}

/** What {@link verify} found. */
export interface VerifyReport {
  /** True when every check held. */
  readonly ok: boolean;
  readonly problems: readonly VerifyProblem[];
  /** Not problems: commits in progress, leftovers the next backup clears. */
  readonly notes: readonly string[];
  /** Images checked, and their bytes. */
  readonly images: number;
  readonly bytes: number;
}

/** Options of {@link verify}. */
export interface VerifyOptions {
  /** Check only the chain of this point (1-based); default: every point. */
  readonly at?: number;
  readonly device?: string;
  readonly onProgress?: (done: number, total: number) => void;
}

function problemOf(err: unknown): VerifyProblem {
  if (RepositoryDamageError.isDamage(err)) return { file: err.file, offset: err.offset, code: err.code, message: err.message };
  const e = err as NodeJS.ErrnoException;
  return { file: e.path ?? '', offset: null, code: BlkError.isInstance(err) ? err.code : (e.code ?? 'EIO'), message: e.message };
}

/**
 * Checks a backup folder offline, without the source: the manifest (its own digest and
 * consistency), no stale or missing files, and for every image of the chosen chain its size,
 * whole-file SHA-256, header, structure (what `qemu-img check` checks), cluster map against
 * the manifest, and every data extent against its digest. Reports every damaged file (the
 * first problem in each) with its offset; `ok` only when all holds.
 */
export async function verify(dir: string, options: VerifyOptions = {}): Promise<VerifyReport> {
  const problems: VerifyProblem[] = [];
  let view: RepositoryView;
  let lock: Awaited<ReturnType<typeof lockFolder>>;
  try {
    lock = await lockFolder(dir, 'shared');
  } catch (err) {
    return { ok: false, problems: [problemOf(err)], notes: [], images: 0, bytes: 0 };
  }
  try {
    try {
      view = await openView(dir);
    } catch (err) {
      if (!RepositoryDamageError.isDamage(err)) throw err;
      return { ok: false, problems: [problemOf(err)], notes: [], images: 0, bytes: 0 };
    }
    const notes = [...view.notes];
    const m = view.manifest;
    // Stale files make "the newest point" unknown; a chain asked for by --at is judged on its own.
    for (const f of options.at === undefined ? await staleFiles(dir, m) : []) {
      problems.push({ file: path.join(dir, f), offset: null, code: 'EBADCHAIN', message: `${path.join(dir, f)}: not recorded in ${MANIFEST_FILE} and newer than its newest point: ${MANIFEST_FILE} is stale (an old copy?)` });
    }
    for (const n of await fs.readdir(dir)) {
      if (n.endsWith(PARTIAL_SUFFIX) || n.endsWith(PRUNE_SUFFIX)) notes.push(`${n}: left by an interrupted backup or prune, or a commit in progress; the next backup clears it`);
    }
    const targets: Array<{ entry: ImageEntry; deviceIndex: number; laterPoints: string }> = [];
    const last = options.at ?? m.points.length;
    if (!Number.isInteger(last) || last < 1 || last > m.points.length) throw new InvalidArgumentError(`backup ${last} does not exist in ${dir}: choose 1 to ${m.points.length}`);
    let devs = m.devices.map((_, i) => i);
    if (options.device !== undefined) {
      const d = m.devices.findIndex((x) => x.name === options.device);
      if (d < 0) throw new InvalidArgumentError(`${dir} holds no device "${options.device}": it holds ${m.devices.map((x) => x.name).join(', ')}`);
      devs = [d];
    }
    for (const d of devs) {
      // Without --at: every point. With it: the chain of that point, from its last full image.
      let first = options.at === undefined ? 0 : last - 1;
      while (options.at !== undefined && first > 0 && m.points[first]?.images[d]?.kind !== 'full') first--;
      for (let p = first; p < last; p++) targets.push({ entry: m.points[p]?.images[d] as ImageEntry, deviceIndex: d, laterPoints: `point ${p + 1} and later` });
    }
    const total = targets.reduce((n, t) => n + t.entry.size, 0);
    let done = 0;
    const scratch = Buffer.allocUnsafe(m.digestSpan);
    for (const t of targets) {
      try {
        const reader = await view.locate(t.entry.file);
        if (reader === null) throw new ChainError(path.join(dir, t.entry.file), null, `missing: the chain needs it for ${t.laterPoints}`);
        const digest = await fileDigest(reader);
        if (digest.size !== t.entry.size) throw new ChainError(reader, null, `the file has ${digest.size} bytes, the manifest recorded ${t.entry.size} (truncated, extended or swapped with another file)`);
        const img = await openImageFile(reader, t.entry, m.devices[t.deviceIndex] as Manifest['devices'][number], m.clusterSize);
        try {
          for (const [s, l, sha] of t.entry.extents) await readExtent(img, s, l, sha, scratch);
        } finally {
          await img.close();
        }
        // Last: a whole-file digest that fails while every part above held means damage in
        // bytes restore never reads (padding, unused table slots); still damage.
        if (digest.sha256 !== t.entry.sha256) throw new ChainError(reader, null, `the file's SHA-256 is ${digest.sha256}; the manifest recorded ${t.entry.sha256}`);
      } catch (err) {
        if (!RepositoryDamageError.isDamage(err) && !BlkError.isInstance(err) && (err as NodeJS.ErrnoException).code === undefined) throw err;
        problems.push(problemOf(err));
      }
      done += t.entry.size;
      options.onProgress?.(done, total);
    }
    return { ok: problems.length === 0, problems, notes, images: targets.length, bytes: total };
  } finally {
    await lock.release();
  }
}

/**
 * Compares a point with an image (raw, or qcow2 with its chain), byte for byte, reading the
 * point through the same checks as {@link restore}. Resolves with the first differing offset.
 */
export async function verifyAgainst(
  dir: string,
  against: string,
  options: { readonly at?: number; readonly device?: string; readonly onProgress?: (done: number, total: number) => void } = {},
): Promise<{ equal: boolean; firstDifference: number | null; bytes: number }> {
  const view = await openView(dir);
  if (options.at === undefined) await refuseStale(view);
  const { position, deviceIndex } = pick(view, options.at, options.device);
  const dev = view.manifest.devices[deviceIndex] as Manifest['devices'][number];
  const chain = await openChain(view, deviceIndex, position);
  let other: ImageReader | null = null;
  try {
    other = await openImage(against);
    const b = other;
    if (b.virtualSize !== dev.virtualSize) return { equal: false, firstDifference: Math.min(b.virtualSize, dev.virtualSize), bytes: dev.virtualSize };
    const y = Buffer.alloc(view.manifest.digestSpan);
    let first: number | null = null;
    await composeChain(
      chain,
      dev.virtualSize,
      view.manifest.digestSpan,
      async (offset, data) => {
        if (first !== null) return;
        await b.read(offset, data.length, y);
        if (Buffer.compare(data, y.subarray(0, data.length)) !== 0) {
          let i = 0;
          while (data[i] === y[i]) i++;
          first = offset + i;
        }
      },
      options.onProgress,
    );
    return { equal: first === null, firstDifference: first, bytes: dev.virtualSize };
  } finally {
    await closeAll(chain);
    await other?.close();
  }
}

/** Options of {@link prune}. */
export interface PruneOptions {
  /** Points to keep (at least 1): the newest ones. */
  readonly keepLast: number;
  /** Compress the new base (default: as the image it replaces was). */
  readonly compress?: boolean;
  readonly onProgress?: (done: number, total: number) => void;
  /** For crash tests: called at each durable step. */
  readonly onStep?: StepHook;
}

/** What {@link prune} did. */
export interface PruneResult {
  /** Points removed (the oldest). */
  readonly removedPoints: number;
  readonly keptPoints: number;
  /** Images rewritten as new full bases (the oldest kept point's incrementals). */
  readonly rebased: readonly string[];
  /** Files deleted. */
  readonly removedFiles: readonly string[];
}

/**
 * Keeps the newest `keepLast` points: the oldest kept point's incremental images are merged
 * with everything under them into new full images (written as `.prune`, synced and checked),
 * a journal holding the new manifest commits the change, the new bases are renamed over the
 * old files (the next incremental names them as its backing file), the manifest is replaced
 * and the old files deleted. Every kept point reads back the same bytes; a crash at any point
 * leaves either the old chain or the new one (the next backup or prune completes it).
 */
export async function prune(dir: string, options: PruneOptions): Promise<PruneResult> {
  const keep = options.keepLast;
  if (!Number.isInteger(keep) || keep < 1) throw new InvalidArgumentError(`--keep-last ${keep}: expected a whole number of points, at least 1`);
  const step = options.onStep;
  const lock = await lockFolder(dir, 'exclusive');
  const written: string[] = [];
  try {
    await recover(dir, step);
    const view = await openView(dir);
    const m = view.manifest;
    const n = m.points.length;
    if (n <= keep) return { removedPoints: 0, keptPoints: n, rebased: [], removedFiles: [] };
    const k = n - keep; // index of the oldest kept point
    const base = m.points[k] as BackupPoint;
    const images: ImageEntry[] = [];
    const rebased: string[] = [];
    const total = m.devices.reduce((s, d, i) => s + (base.images[i]?.kind === 'incremental' ? d.virtualSize : 0), 0);
    let done = 0;
    for (const [d, dev] of m.devices.entries()) {
      const entry = base.images[d] as ImageEntry;
      if (entry.kind === 'full') {
        images.push(entry);
        continue;
      }
      const chain = await openChain(view, d, k + 1);
      const target = path.join(dir, entry.file + PRUNE_SUFFIX);
      let builder: ImageBuilder;
      try {
        const writer = await Qcow2Writer.create(target, { virtualSize: dev.virtualSize, clusterSize: m.clusterSize, compress: options.compress ?? entry.compressed });
        written.push(target);
        builder = new ImageBuilder(writer, m.digestSpan);
        const cs = m.clusterSize;
        await composeChain(
          chain,
          dev.virtualSize,
          m.digestSpan,
          async (offset, data, zero) => {
            if (offset === 0) step?.('merging');
            if (zero) return;
            for (let off = 0; off < data.length; off += cs) {
              const c = data.subarray(off, Math.min(data.length, off + cs));
              if (!isZero(c)) await builder.data((offset + off) / cs, c);
            }
          },
          (x) => options.onProgress?.(done + x, total),
        );
        await builder.close();
      } finally {
        await closeAll(chain);
      }
      done += dev.virtualSize;
      const { size, sha256 } = await fileDigest(target);
      const next: ImageEntry = {
        ...entry,
        kind: 'full',
        backing: null,
        size,
        sha256,
        compressed: builder.writer.compressedClusters > 0,
        bytesWritten: builder.writer.dataBytes,
        extents: builder.extents,
        zeros: [],
      };
      await verifyNewImage(target, next, dev, m.clusterSize, m.digestSpan);
      images.push(next);
      rebased.push(entry.file);
    }
    step?.('bases-written');
    const kept: BackupPoint[] = [{ ...base, images }, ...m.points.slice(k + 1)];
    const after: Manifest = { ...m, points: kept };
    const remove = m.points.slice(0, k).flatMap((p) => p.images.map((i) => i.file));
    // The commit: from here on, readers see the new chain (journal) and recovery rolls forward.
    await atomicWriteFile(path.join(dir, JOURNAL_FILE), JSON.stringify({ manifest: manifestText(after), replace: rebased, remove }), step);
    written.length = 0;
    step?.('journal-written');
    for (const f of rebased) await fs.rename(path.join(dir, f + PRUNE_SUFFIX), path.join(dir, f));
    await fsyncDir(dir);
    step?.('bases-renamed');
    await writeManifest(dir, parseManifest(manifestText(after), JOURNAL_FILE));
    step?.('manifest-replaced');
    for (const f of remove) await fs.rm(path.join(dir, f), { force: true });
    await fs.rm(path.join(dir, JOURNAL_FILE), { force: true });
    await fsyncDir(dir);
    step?.('old-removed');
    return { removedPoints: k, keptPoints: kept.length, rebased, removedFiles: remove };
  } catch (err) {
    for (const f of written) await fs.rm(f, { force: true }).catch(() => {});
    throw err;
  } finally {
    await lock.release();
  }
}

/** A backup folder as {@link list} shows it. */
export interface RepositoryListing {
  readonly dir: string;
  readonly manifest: Manifest;
  readonly notes: readonly string[];
}

/** The points of a backup folder (its manifest, or a committing prune's). Throws if there is none. */
export async function list(dir: string): Promise<RepositoryListing> {
  const view = await openView(dir);
  return { dir, manifest: view.manifest, notes: view.notes };
}
