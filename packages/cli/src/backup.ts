import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { BlkError, blkdevRead, InvalidArgumentError, SECTOR_SIZE, type BlockDev } from '@blkfilter/bio';
import { DEFAULT_CLUSTER_SIZE } from './qcow2/format.js';
import { openImage, Qcow2Reader, type ImageReader } from './qcow2/reader.js';
import { Qcow2Writer } from './qcow2/writer.js';

/** The manifest kept in a backup folder: one entry per image of the chain, oldest first. */
export interface BackupManifest {
  readonly version: 1;
  /** The device the backups are of. */
  readonly device: string;
  readonly virtualSize: number;
  readonly clusterSize: number;
  readonly backups: BackupEntry[];
}

/** One backup of the chain. */
export interface BackupEntry {
  /** File name in the backup folder. */
  readonly file: string;
  readonly kind: 'full' | 'incremental';
  readonly createdAt: string;
  /** CBT generation id and take number of the snapshot this backup copies. */
  readonly generationId: string | null;
  readonly snapNumber: number | null;
  /** Snapshot the data came from, when known. */
  readonly snapshotId: string | null;
  /** Bytes read from the source device. */
  readonly bytesRead: number;
  /** Guest bytes stored as data in this image. */
  readonly bytesWritten: number;
  /** Bytes CBT reported changed (incremental) or the device size (full). */
  readonly changedBytes: number;
  readonly durationMs: number;
}

/** What CBT says changed since a take, as `@blkfilter/cbt`'s `changedExtents` answers. */
export type ChangedExtentsAnswer =
  | { readonly kind: 'extents'; readonly generationId: string; readonly snapNumber: number; readonly extents: ReadonlyArray<{ readonly sector: number; readonly sectors: number }> }
  | { readonly kind: 'full-copy-needed'; readonly reason: string; readonly message?: string };

/** Options of {@link runBackup}. */
export interface BackupOptions {
  /** The device to copy: a snapshot image (or any device that holds still). */
  readonly source: BlockDev;
  /** The backup folder (created if missing). */
  readonly dir: string;
  /** `auto` (default): incremental when the chain and CBT allow it, else full. */
  readonly mode?: 'auto' | 'full' | 'incremental';
  /** Name recorded in the manifest (default: the source's name). */
  readonly deviceName?: string;
  /**
   * CBT of the original device: `take` is the generation and take number the snapshot stands
   * for; `changedSince` answers what changed since an earlier take. Without it every backup is full.
   */
  readonly cbt?: {
    readonly take: { readonly generationId: string; readonly snapNumber: number; readonly snapshotId?: string | null };
    changedSince(generationId: string, since: number): Promise<ChangedExtentsAnswer>;
  };
  /** Cluster size of new chains (default 64 KiB). */
  readonly clusterSize?: number;
  /** Bytes read per request from the source (default 1 MiB). */
  readonly readSize?: number;
  /** Called as bytes are copied. */
  readonly onProgress?: (done: number, total: number) => void;
  /** Called with a human sentence when the backup has to be full although incremental was asked. */
  readonly onNotice?: (message: string) => void;
}

/** What a backup did. */
export interface BackupResult {
  readonly entry: BackupEntry;
  readonly path: string;
  /** Why a full backup was made (null for incremental, or full by request on an empty folder). */
  readonly fullBecause: string | null;
  /** Clusters re-read from the new image and checked against what was written. */
  readonly verifiedClusters: number;
}

/** The folder's manifest is missing, unreadable, or of another device. */
export class BackupChainError extends BlkError {
  constructor(message: string) {
    super('EBADCHAIN', message);
  }
}

const MANIFEST = 'manifest.json';

/** Reads a backup folder's manifest, or null when the folder has none yet. */
export async function readManifest(dir: string): Promise<BackupManifest | null> {
  let text: string;
  try {
    text = await fs.readFile(path.join(dir, MANIFEST), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  let m: BackupManifest;
  try {
    m = JSON.parse(text) as BackupManifest;
  } catch (err) {
    throw new BackupChainError(`${path.join(dir, MANIFEST)} is not valid JSON: ${(err as Error).message}`);
  }
  if (m.version !== 1 || !Array.isArray(m.backups)) throw new BackupChainError(`${path.join(dir, MANIFEST)} is not a blkfilter backup manifest (version 1)`);
  return m;
}

async function writeManifest(dir: string, m: BackupManifest): Promise<void> {
  const tmp = path.join(dir, `${MANIFEST}.tmp`);
  const fh = await fs.open(tmp, 'w');
  try {
    await fh.writeFile(`${JSON.stringify(m, null, 2)}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.rename(tmp, path.join(dir, MANIFEST));
}

/**
 * Backs up `source` into `dir` as a qcow2 image: full (every non-zero cluster) or incremental
 * (only CBT's changed extents since the last backup, over the previous image as backing file).
 * Zero clusters in an incremental hide discarded data of the backing file. The new image is
 * re-read and checked against what was written before the manifest records it.
 */
export async function runBackup(options: BackupOptions): Promise<BackupResult> {
  const { source, dir } = options;
  const mode = options.mode ?? 'auto';
  const started = performance.now();
  await fs.mkdir(dir, { recursive: true });
  const prev = await readManifest(dir);
  const virtualSize = source.sizeBytes;
  const deviceName = options.deviceName ?? source.name;
  if (prev !== null && (prev.virtualSize !== virtualSize || prev.device !== deviceName)) {
    throw new BackupChainError(
      `${dir} holds backups of "${prev.device}" (${prev.virtualSize} bytes), not of "${deviceName}" (${virtualSize} bytes): use another folder`,
    );
  }
  const clusterSize = prev?.clusterSize ?? options.clusterSize ?? DEFAULT_CLUSTER_SIZE;
  const last = prev?.backups.at(-1) ?? null;

  // Decide: incremental needs a previous backup, CBT, and the same generation.
  let extents: ReadonlyArray<{ sector: number; sectors: number }> | null = null;
  let fullBecause: string | null = null;
  if (mode !== 'full') {
    if (last === null) fullBecause = 'there is no earlier backup in this folder';
    else if (options.cbt === undefined) fullBecause = 'no changed-block tracking is available for this device';
    else if (last.generationId === null || last.snapNumber === null) fullBecause = 'the last backup has no CBT generation recorded';
    else {
      const answer = await options.cbt.changedSince(last.generationId, last.snapNumber);
      if (answer.kind === 'extents') extents = answer.extents;
      else fullBecause = `CBT cannot tell what changed since the last backup (${answer.reason}${answer.message ? `: ${answer.message}` : ''})`;
    }
    if (fullBecause !== null && mode === 'incremental') options.onNotice?.(`incremental backup not possible: ${fullBecause}; making a full backup instead`);
  }
  const kind = extents === null ? 'full' : 'incremental';
  const index = (prev?.backups.length ?? 0) + 1;
  const file = `${String(index).padStart(4, '0')}-${kind}.qcow2`;
  const target = path.join(dir, file);
  const writer = await Qcow2Writer.create(target, {
    virtualSize,
    clusterSize,
    ...(kind === 'incremental' && last !== null ? { backingFile: last.file, backingFormat: 'qcow2' as const } : {}),
  });
  const written = new Map<number, string>();
  let bytesRead = 0;
  let changedBytes = 0;
  try {
    const ranges = kind === 'full' ? [{ start: 0, end: virtualSize }] : clusterRanges(extents ?? [], clusterSize, virtualSize);
    const total = ranges.reduce((n, r) => n + (r.end - r.start), 0);
    changedBytes = kind === 'full' ? virtualSize : (extents ?? []).reduce((n, e) => n + e.sectors * SECTOR_SIZE, 0);
    const readSize = Math.max(clusterSize, Math.floor((options.readSize ?? 1 << 20) / clusterSize) * clusterSize);
    const buf = Buffer.alloc(readSize);
    let done = 0;
    options.onProgress?.(0, total);
    for (const r of ranges) {
      for (let pos = r.start; pos < r.end; pos += readSize) {
        const n = Math.min(readSize, r.end - pos);
        const chunk = buf.subarray(0, n);
        await blkdevRead(source, pos, n, chunk);
        bytesRead += n;
        for (let off = 0; off < n; off += clusterSize) {
          const c = chunk.subarray(off, Math.min(n, off + clusterSize));
          const index = (pos + off) / clusterSize;
          if (isZero(c)) {
            // Full: leave it unallocated (reads as zeros). Incremental: hide the backing file.
            if (kind === 'incremental') await writer.zeroCluster(index);
          } else {
            await writer.writeCluster(index, c);
            written.set(index, sha256(c));
          }
        }
        done += n;
        options.onProgress?.(done, total);
      }
    }
    await writer.close();
  } catch (err) {
    await writer.abort();
    throw err;
  }
  const verifiedClusters = await verifyWritten(target, written, clusterSize, virtualSize);
  const entry: BackupEntry = {
    file,
    kind,
    createdAt: new Date().toISOString(),
    generationId: options.cbt?.take.generationId ?? null,
    snapNumber: options.cbt?.take.snapNumber ?? null,
    snapshotId: options.cbt?.take.snapshotId ?? null,
    bytesRead,
    bytesWritten: writer.dataBytes,
    changedBytes,
    durationMs: Math.round(performance.now() - started),
  };
  await writeManifest(dir, {
    version: 1,
    device: deviceName,
    virtualSize,
    clusterSize,
    backups: [...(prev?.backups ?? []), entry],
  });
  return { entry, path: target, fullBecause: kind === 'full' ? (mode === 'full' ? 'a full backup was asked for' : fullBecause) : null, verifiedClusters };
}

/** Re-reads every data cluster of the new image and compares it with what was written. */
async function verifyWritten(file: string, written: Map<number, string>, clusterSize: number, virtualSize: number): Promise<number> {
  const r = await Qcow2Reader.open(file);
  try {
    const buf = Buffer.alloc(clusterSize);
    for (const [index, hash] of written) {
      const n = Math.min(clusterSize, virtualSize - index * clusterSize);
      await r.read(index * clusterSize, n, buf);
      if (sha256(buf.subarray(0, n)) !== hash) {
        throw new BackupChainError(`verification failed: cluster ${index} of ${file} does not hold what was written; the backup is not recorded`);
      }
    }
    return written.size;
  } finally {
    await r.close();
  }
}

/** Sector extents widened to whole clusters, merged, sorted, clipped to the disk. */
export function clusterRanges(extents: ReadonlyArray<{ sector: number; sectors: number }>, clusterSize: number, virtualSize: number): Array<{ start: number; end: number }> {
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

function isZero(b: Uint8Array): boolean {
  // Compare 8 bytes at a time where alignment allows: backups scan every byte they copy.
  const n8 = b.byteOffset % 8 === 0 ? Math.floor(b.length / 8) : 0;
  if (n8 > 0) {
    const words = new BigUint64Array(b.buffer, b.byteOffset, n8);
    for (let i = 0; i < n8; i++) if (words[i] !== 0n) return false;
  }
  for (let i = n8 * 8; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

function sha256(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

/** Options of {@link restoreBackup}. */
export interface RestoreOptions {
  /** The backup folder. */
  readonly dir: string;
  /** The raw image to create. */
  readonly to: string;
  /** 1-based position in the chain to restore (default: the newest). */
  readonly at?: number;
  /** Overwrite `to` if it exists. */
  readonly force?: boolean;
  readonly onProgress?: (done: number, total: number) => void;
}

/** Writes the device as it was at backup `at` into a new sparse raw image; returns its sha256. */
export async function restoreBackup(options: RestoreOptions): Promise<{ sha256: string; bytes: number; entry: BackupEntry }> {
  const { dir } = options;
  const m = await readManifest(dir);
  if (m === null || m.backups.length === 0) throw new BackupChainError(`${dir} holds no backups (no ${MANIFEST})`);
  const at = options.at ?? m.backups.length;
  const entry = m.backups[at - 1];
  if (!Number.isInteger(at) || entry === undefined) {
    throw new InvalidArgumentError(`backup ${at} does not exist in ${dir}: choose 1 to ${m.backups.length}`);
  }
  const reader = await Qcow2Reader.open(path.join(dir, entry.file));
  const fh = await fs.open(options.to, options.force === true ? 'w' : 'wx');
  const hash = createHash('sha256');
  try {
    await fh.truncate(m.virtualSize);
    const step = 1 << 20;
    const buf = Buffer.alloc(step);
    for (let pos = 0; pos < m.virtualSize; pos += step) {
      const n = Math.min(step, m.virtualSize - pos);
      const chunk = buf.subarray(0, n);
      await reader.read(pos, n, chunk);
      hash.update(chunk);
      if (!isZero(chunk)) await fh.write(chunk, 0, n, pos); // zeros stay holes
      options.onProgress?.(pos + n, m.virtualSize);
    }
    await fh.sync();
  } finally {
    await fh.close();
    await reader.close();
  }
  return { sha256: hash.digest('hex'), bytes: m.virtualSize, entry };
}

/** The sha256 of an image's guest content (raw or qcow2 with its chain). */
export async function imageSha256(file: string, onProgress?: (done: number, total: number) => void): Promise<string> {
  const r: ImageReader = await openImage(file);
  try {
    return await streamHash(r, onProgress);
  } finally {
    await r.close();
  }
}

async function streamHash(r: ImageReader, onProgress?: (done: number, total: number) => void): Promise<string> {
  const hash = createHash('sha256');
  const step = 1 << 20;
  const buf = Buffer.alloc(step);
  for (let pos = 0; pos < r.virtualSize; pos += step) {
    const n = Math.min(step, r.virtualSize - pos);
    await r.read(pos, n, buf);
    hash.update(buf.subarray(0, n));
    onProgress?.(pos + n, r.virtualSize);
  }
  return hash.digest('hex');
}

/**
 * Compares backup `at` of `dir` with an image (raw or qcow2), byte for byte. Resolves with
 * `{ equal: true }` or the first differing offset.
 */
export async function verifyBackup(dir: string, against: string, at?: number, onProgress?: (done: number, total: number) => void): Promise<{ equal: boolean; firstDifference: number | null; bytes: number }> {
  const m = await readManifest(dir);
  if (m === null || m.backups.length === 0) throw new BackupChainError(`${dir} holds no backups (no ${MANIFEST})`);
  const entry = m.backups[(at ?? m.backups.length) - 1];
  if (entry === undefined) throw new InvalidArgumentError(`backup ${at} does not exist in ${dir}: choose 1 to ${m.backups.length}`);
  const a = await Qcow2Reader.open(path.join(dir, entry.file));
  const b = await openImage(against);
  try {
    if (a.virtualSize !== b.virtualSize) return { equal: false, firstDifference: Math.min(a.virtualSize, b.virtualSize), bytes: a.virtualSize };
    const step = 1 << 20;
    const x = Buffer.alloc(step);
    const y = Buffer.alloc(step);
    for (let pos = 0; pos < a.virtualSize; pos += step) {
      const n = Math.min(step, a.virtualSize - pos);
      await a.read(pos, n, x);
      await b.read(pos, n, y);
      if (Buffer.compare(x.subarray(0, n), y.subarray(0, n)) !== 0) {
        let i = 0;
        while (x[i] === y[i]) i++;
        return { equal: false, firstDifference: pos + i, bytes: a.virtualSize };
      }
      onProgress?.(pos + n, a.virtualSize);
    }
    return { equal: true, firstDifference: null, bytes: a.virtualSize };
  } finally {
    await a.close();
    await b.close();
  }
}
