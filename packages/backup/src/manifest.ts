import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { DIGEST_PATTERN, isExtentAlgorithm, type ExtentAlgorithm } from './digest.js';
import { ManifestError } from './errors.js';
import { atomicWriteFile } from './fsutil.js';

/** File name of the manifest in a backup folder. */
export const MANIFEST_FILE = 'manifest.json';
/** File name of the prune journal (present only while a prune commits). */
export const JOURNAL_FILE = 'prune-journal.json';

/**
 * A guest byte range of data in one image, with the digest of its bytes (hex, of the folder's
 * {@link Manifest.extentDigest} algorithm): `[start, length, digest]`.
 */
export type ExtentDigest = readonly [start: number, length: number, digest: string];
/** A guest byte range stored as zero clusters (hiding the backing file): `[start, length]`. */
export type ZeroExtent = readonly [start: number, length: number];

/** One image of a point: one device's qcow2 file. */
export interface ImageEntry {
  /** The device this image is of. */
  readonly device: string;
  /** File name in the backup folder. */
  readonly file: string;
  /** `full`: no backing file; `incremental`: over the same device's image of the point before. */
  readonly kind: 'full' | 'incremental';
  /** The backing file name the image's header must hold (null for full). */
  readonly backing: string | null;
  /** File size in bytes and SHA-256 of the whole file. */
  readonly size: number;
  readonly sha256: string;
  /** Data clusters are deflate-compressed. */
  readonly compressed: boolean;
  /** CBT generation id and take number of the snapshot this image copies (null without CBT). */
  readonly generationId: string | null;
  readonly snapNumber: number | null;
  /** Bytes read from the source device. */
  readonly bytesRead: number;
  /** Guest bytes stored as data in this image. */
  readonly bytesWritten: number;
  /** Bytes CBT reported changed (incremental) or the device size (full). */
  readonly changedBytes: number;
  readonly durationMs: number;
  /**
   * Data extents with digests: maximal runs of data clusters, cut at every multiple of
   * {@link Manifest.digestSpan} of the guest disk, ascending.
   */
  readonly extents: readonly ExtentDigest[];
  /** Zero-cluster runs, ascending. */
  readonly zeros: readonly ZeroExtent[];
}

/** One backup point: the devices of one snapshot, at one instant. */
export interface BackupPoint {
  /** Sequence number, in file names too; grows by one per backup and is never reused. */
  readonly seq: number;
  readonly createdAt: string;
  /** The snapshot the point was taken from, when known. */
  readonly snapshotId: string | null;
  /** One image per device, in the order of {@link Manifest.devices}. */
  readonly images: readonly ImageEntry[];
}

/** The manifest of a backup folder. */
export interface Manifest {
  readonly format: 'blkfilter-backup';
  /**
   * 3: the file names the extent digest algorithm (`extentDigest`); new folders are written so.
   * 2: the extent digests are SHA-256 (the file has no `extentDigest`); such a folder stays
   * version 2 when backups are added to it, so the release that wrote it still reads it.
   */
  readonly version: 2 | 3;
  readonly clusterSize: number;
  /** Bytes of guest disk per extent digest window. */
  readonly digestSpan: number;
  /** The hash of every extent digest of the folder (always `sha256` for version 2). */
  readonly extentDigest: ExtentAlgorithm;
  readonly devices: ReadonlyArray<{ readonly name: string; readonly virtualSize: number }>;
  /** Oldest first. */
  readonly points: readonly BackupPoint[];
}

interface Stored extends Manifest {
  /** SHA-256 of the manifest's JSON without this field: any edit or bit flip fails it. */
  readonly digest: string;
}

/** What the file holds (without the digest), in its key order: version 2 has no `extentDigest`. */
function serialForm(m: Manifest): object {
  if (m.version === 2) {
    if (m.extentDigest !== 'sha256') throw new Error(`a version 2 manifest cannot record ${m.extentDigest} extent digests`);
    return { format: m.format, version: m.version, clusterSize: m.clusterSize, digestSpan: m.digestSpan, devices: m.devices, points: m.points };
  }
  return { format: m.format, version: m.version, clusterSize: m.clusterSize, digestSpan: m.digestSpan, extentDigest: m.extentDigest, devices: m.devices, points: m.points };
}

function digestOf(m: Manifest): string {
  return createHash('sha256').update(JSON.stringify(serialForm(m))).digest('hex');
}

/** The JSON text of `m`, with its digest. */
export function manifestText(m: Manifest): string {
  return `${JSON.stringify({ ...serialForm(m), digest: digestOf(m) }, null, 1)}\n`;
}

/** Parses and validates a manifest's text; `file` names it in errors. */
export function parseManifest(text: string, file: string): Manifest {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new ManifestError(file, `not valid JSON (${(err as Error).message}); the folder's chain cannot be trusted: restore the manifest from a copy`, { cause: err });
  }
  const o = raw as Omit<Partial<Stored>, 'version'> & { version?: unknown; backups?: unknown };
  if (typeof o !== 'object' || o === null || o.format !== 'blkfilter-backup') {
    if (typeof o === 'object' && o !== null && o.version === 1 && Array.isArray(o.backups)) {
      throw new ManifestError(file, 'a version 1 manifest (@blkfilter/cli 0.1, no checksums): restore its points with that version, and start a new folder for new backups');
    }
    throw new ManifestError(file, 'not a blkfilter backup manifest (no "format": "blkfilter-backup")');
  }
  if (o.version !== 2 && o.version !== 3) throw new ManifestError(file, `manifest version ${String(o.version)}: expected 2 or 3 (a newer release wrote it?)`);
  if (o.version === 3 && !isExtentAlgorithm(o.extentDigest)) throw new ManifestError(file, `extentDigest ${JSON.stringify(o.extentDigest)} is not a known extent digest (sha256, xxh64)`);
  const algorithm: ExtentAlgorithm = o.version === 3 ? (o.extentDigest as ExtentAlgorithm) : 'sha256';
  const plain: Manifest = {
    format: o.format,
    version: o.version,
    clusterSize: o.clusterSize as number,
    digestSpan: o.digestSpan as number,
    extentDigest: algorithm,
    devices: o.devices as Manifest['devices'],
    points: o.points as Manifest['points'],
  };
  if (typeof o.digest !== 'string' || o.digest !== digestOf(plain)) {
    throw new ManifestError(file, `its digest does not match its content (expected ${String(o.digest)}, computed ${digestOf(plain)}): it was edited or damaged`);
  }
  const isInt = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
  if (!isInt(plain.clusterSize) || !isInt(plain.digestSpan) || plain.digestSpan % plain.clusterSize !== 0) throw new ManifestError(file, 'clusterSize or digestSpan is malformed');
  if (!Array.isArray(plain.devices) || plain.devices.length === 0 || !plain.devices.every((d) => typeof d.name === 'string' && isInt(d.virtualSize))) {
    throw new ManifestError(file, 'devices is malformed: expected [{ name, virtualSize }, ...]');
  }
  if (!Array.isArray(plain.points)) throw new ManifestError(file, 'points is not a list');
  let lastSeq = 0;
  const files = new Set<string>();
  for (const [i, p] of plain.points.entries()) {
    if (!isInt(p.seq) || p.seq <= lastSeq) throw new ManifestError(file, `point ${i + 1}: seq ${String(p.seq)} does not grow`);
    lastSeq = p.seq;
    if (!Array.isArray(p.images) || p.images.length !== plain.devices.length) throw new ManifestError(file, `point ${i + 1} has ${String(p.images?.length)} images for ${plain.devices.length} devices`);
    for (const [d, img] of p.images.entries()) {
      const dev = plain.devices[d];
      const where = `point ${i + 1} (seq ${p.seq}), device ${dev?.name}`;
      if (img.device !== dev?.name) throw new ManifestError(file, `${where}: image is of "${img.device}"`);
      if (typeof img.file !== 'string' || img.file === '' || img.file.includes('/') || img.file.startsWith('.') || files.has(img.file)) {
        throw new ManifestError(file, `${where}: file name ${JSON.stringify(img.file)} is not a unique plain file name in the folder`);
      }
      files.add(img.file);
      const prev = i === 0 ? null : plain.points[i - 1]?.images[d]?.file;
      if (img.kind === 'full' ? img.backing !== null : img.kind !== 'incremental' || img.backing !== prev) {
        throw new ManifestError(file, `${where}: ${img.kind} image with backing ${JSON.stringify(img.backing)} does not follow the chain (expected ${img.kind === 'full' ? 'none' : JSON.stringify(prev)})`);
      }
      if (!isInt(img.size) || typeof img.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(img.sha256)) throw new ManifestError(file, `${where}: size or sha256 is malformed`);
      if (!Array.isArray(img.extents) || !Array.isArray(img.zeros)) throw new ManifestError(file, `${where}: extents or zeros is not a list`);
      let end = 0;
      for (const e of img.extents) {
        if (!Array.isArray(e) || !isInt(e[0]) || !isInt(e[1]) || e[1] === 0 || e[0] < end || typeof e[2] !== 'string' || !DIGEST_PATTERN[algorithm].test(e[2]) || e[0] + e[1] > dev.virtualSize) {
          throw new ManifestError(file, `${where}: extent ${JSON.stringify(e)} is malformed or out of order`);
        }
        end = e[0] + e[1];
      }
      end = 0;
      for (const z of img.zeros) {
        if (!Array.isArray(z) || !isInt(z[0]) || !isInt(z[1]) || z[1] === 0 || z[0] < end || z[0] + z[1] > dev.virtualSize) throw new ManifestError(file, `${where}: zero extent ${JSON.stringify(z)} is malformed or out of order`);
        end = z[0] + z[1];
      }
    }
  }
  return plain;
}

/** Reads a folder's manifest file; null when it has none. */
export async function readManifestFile(file: string): Promise<Manifest | null> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  return parseManifest(text, file);
}

/** Replaces the folder's manifest atomically (write, fsync, rename, fsync of the folder). */
export async function writeManifest(dir: string, m: Manifest, step?: (name: string) => void): Promise<void> {
  await atomicWriteFile(path.join(dir, MANIFEST_FILE), manifestText(m), step);
}
