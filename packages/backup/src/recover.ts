import fs from 'node:fs/promises';
import path from 'node:path';
import { IMAGE_NAME, PARTIAL_SUFFIX, PRUNE_SUFFIX, readJournal } from './chain.js';
import { ChainError } from './errors.js';
import { atomicWriteFile, fsyncDir } from './fsutil.js';
import type { StepHook } from './image-builder.js';
import { JOURNAL_FILE, MANIFEST_FILE, readManifestFile } from './manifest.js';

/**
 * Completes or clears what an interrupted backup or prune left, under the folder's exclusive
 * lock: a committed prune (journal present) is rolled forward; a recorded image still under
 * its `.partial` name is renamed; `.partial`, `.prune` and `.tmp` files nobody recorded are
 * deleted, and so are old images a committed prune had not yet removed. Files that look like
 * newer points than the manifest knows are not touched: that is a stale manifest, an error.
 */
export async function recover(dir: string, step?: StepHook): Promise<string[]> {
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
