import fs from 'node:fs/promises';
import path from 'node:path';
import { InvalidArgumentError } from '@blkfilter/bio';
import { composeChain, isZero, openChain, openView, PRUNE_SUFFIX } from './chain.js';
import { atomicWriteFile, fsyncDir, lockFolder } from './fsutil.js';
import { fileDigest, ImageBuilder, verifyNewImage, type StepHook } from './image-builder.js';
import { JOURNAL_FILE, manifestText, parseManifest, writeManifest, type BackupPoint, type ImageEntry, type Manifest } from './manifest.js';
import { closeAll } from './points.js';
import { recover } from './recover.js';
import { Qcow2Writer } from './writer.js';

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
        builder = new ImageBuilder(writer, m.digestSpan, m.extentDigest);
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
      await verifyNewImage(target, next, dev, m.clusterSize, m.digestSpan, m.extentDigest);
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
