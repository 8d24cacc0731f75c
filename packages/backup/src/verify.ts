import fs from 'node:fs/promises';
import path from 'node:path';
import { BlkError, InvalidArgumentError } from '@blkfilter/bio';
import { openImageFile, openView, PARTIAL_SUFFIX, PRUNE_SUFFIX, readExtent, staleFiles, type RepositoryView } from './chain.js';
import { ChainError, RepositoryDamageError } from './errors.js';
import { lockFolder } from './fsutil.js';
import { fileDigest } from './image-builder.js';
import { MANIFEST_FILE, type ImageEntry, type Manifest } from './manifest.js';

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
          for (const [s, l, sha] of t.entry.extents) await readExtent(img, s, l, sha, scratch, m.extentDigest);
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
