import fs from 'node:fs/promises';
import path from 'node:path';
import { BlkError } from '@blkfilter/bio';
import { ALGORITHM_NAME, extentDigest, type ExtentAlgorithm } from './digest.js';
import { ChainError, ChecksumError, ManifestError } from './errors.js';
import type { ImageEntry, Manifest } from './manifest.js';
import { JOURNAL_FILE, MANIFEST_FILE, parseManifest, readManifestFile } from './manifest.js';
import { ClusterState, Qcow2Reader } from './reader.js';

/** Suffix of an image written by a backup that is not yet renamed to its recorded name. */
export const PARTIAL_SUFFIX = '.partial';
/** Suffix of a new base written by a prune that is not yet renamed over the old file. */
export const PRUNE_SUFFIX = '.prune';
/** Names of the images this package writes: `NNNN-device.qcow2`. */
export const IMAGE_NAME = /^(\d{4,})-(.+)\.qcow2$/;

/** The prune journal: the manifest after the prune, and the files it replaces and removes. */
export interface PruneJournal {
  readonly manifest: string;
  readonly replace: readonly string[];
  readonly remove: readonly string[];
}

/** The manifest a reader should believe, and where each recorded file is on disk right now. */
export interface RepositoryView {
  readonly dir: string;
  readonly manifest: Manifest;
  /** Path on disk of a recorded file (a committed prune's `.prune`, a committed backup's `.partial`). */
  locate(file: string): Promise<string | null>;
  /** Things a reader should know: a commit in progress, leftovers the next backup clears. */
  readonly notes: readonly string[];
}

async function exists(p: string): Promise<boolean> {
  try {
    await fs.lstat(p);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw err;
  }
}

/** Reads the prune journal, or null. */
export async function readJournal(dir: string): Promise<PruneJournal | null> {
  const file = path.join(dir, JOURNAL_FILE);
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  try {
    const j = JSON.parse(text) as PruneJournal;
    if (typeof j.manifest !== 'string' || !Array.isArray(j.replace) || !Array.isArray(j.remove)) throw new Error('missing fields');
    parseManifest(j.manifest, file);
    return j;
  } catch (err) {
    if (ManifestError.isInstance(err)) throw err;
    throw new ManifestError(file, `the prune journal is unreadable (${(err as Error).message})`, { cause: err });
  }
}

/**
 * The folder as a reader must see it, without writing anything: the manifest (or, while a
 * prune commits, its journal's), and a `locate` that finds each recorded file under its name or
 * under the temporary name of a commit in progress. Throws when the folder does not exist,
 * holds no manifest, or the manifest is damaged.
 */
export async function openView(dir: string): Promise<RepositoryView> {
  const st = await fs.stat(dir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') throw new BlkError('ENOENT', `${dir}: the backup folder does not exist`);
    throw err;
  });
  if (!st.isDirectory()) throw new BlkError('ENOTDIR', `${dir}: not a folder, expected a backup folder`);
  const notes: string[] = [];
  const journal = await readJournal(dir);
  let manifest: Manifest | null;
  if (journal !== null) {
    manifest = parseManifest(journal.manifest, path.join(dir, JOURNAL_FILE));
    notes.push(`a prune is committing (${JOURNAL_FILE}); the next backup or prune completes it`);
  } else {
    manifest = await readManifestFile(path.join(dir, MANIFEST_FILE));
  }
  if (manifest === null) {
    const names = (await fs.readdir(dir)).filter((n) => IMAGE_NAME.test(n));
    if (names.length > 0) {
      throw new ChainError(path.join(dir, MANIFEST_FILE), null, `missing, but the folder holds ${names.slice(0, 3).join(', ')}${names.length > 3 ? ', ...' : ''}: the manifest was lost or deleted; put it back from a copy`);
    }
    throw new BlkError('ENOENT', `${dir} holds no backups (no ${MANIFEST_FILE})`);
  }
  const m = manifest;
  const locate = async (file: string): Promise<string | null> => {
    const base = path.join(dir, file);
    if (journal !== null && journal.replace.includes(file) && (await exists(base + PRUNE_SUFFIX))) return base + PRUNE_SUFFIX;
    if (await exists(base)) return base;
    if (await exists(base + PARTIAL_SUFFIX)) return base + PARTIAL_SUFFIX;
    return null;
  };
  return { dir, manifest: m, locate, notes };
}

/**
 * Files named like our images but not in the manifest, newer than its newest point: the
 * manifest is stale (an old copy put back) or was replaced. Leftovers of an interrupted backup
 * are `.partial` files, never named like this, so these are not leftovers.
 */
export async function staleFiles(dir: string, manifest: Manifest): Promise<string[]> {
  const newest = manifest.points.at(-1)?.seq ?? 0;
  const recorded = new Set(manifest.points.flatMap((p) => p.images.map((i) => i.file)));
  return (await fs.readdir(dir)).filter((n) => {
    const m = IMAGE_NAME.exec(n);
    return m !== null && !recorded.has(n) && Number(m[1]) > newest;
  });
}

/** One image of a chain, opened and checked against its manifest entry. */
export interface OpenedImage {
  readonly entry: ImageEntry;
  readonly reader: Qcow2Reader;
  /** The hash of the entry's extent digests (the folder's). */
  readonly algorithm: ExtentAlgorithm;
}

/**
 * Opens image `entry` (without its backing chain) and checks everything restore relies on:
 * that it exists, its size, its header (virtual size, cluster size, backing name) and its
 * whole structure (as `qemu-img check`), and that its cluster map is exactly the data and
 * zero extents the manifest recorded.
 */
export async function openEntry(view: RepositoryView, entry: ImageEntry, deviceIndex: number, laterPoints: string): Promise<Qcow2Reader> {
  const where = await view.locate(entry.file);
  if (where === null) throw new ChainError(path.join(view.dir, entry.file), null, `missing: the chain needs it for ${laterPoints}; earlier points still restore`);
  return openImageFile(where, entry, view.manifest.devices[deviceIndex] as Manifest['devices'][number], view.manifest.clusterSize);
}

/** {@link openEntry} for a file at a known path (a new image before it is recorded). */
export async function openImageFile(where: string, entry: ImageEntry, dev: Manifest['devices'][number], clusterSize: number): Promise<Qcow2Reader> {
  const reader = await Qcow2Reader.open(where, { backing: false, confined: true });
  try {
    // We write version 3 images with a 104-byte header; anything else is not what we wrote.
    if (reader.version !== 3) throw new ChainError(where, 4, `qcow2 version ${reader.version}: the images of a backup folder are version 3`);
    if (reader.fileSize !== entry.size) {
      throw new ChainError(where, null, `the file has ${reader.fileSize} bytes, the manifest recorded ${entry.size} (truncated, extended or swapped with another file)`);
    }
    if (reader.virtualSize !== dev.virtualSize) throw new ChainError(where, 24, `virtual size ${reader.virtualSize}, the manifest recorded ${dev.virtualSize} for "${dev.name}"`);
    if (reader.clusterSize !== clusterSize) throw new ChainError(where, 20, `cluster size ${reader.clusterSize}, the manifest recorded ${clusterSize}`);
    if (reader.backingFile !== entry.backing) {
      throw new ChainError(where, 8, `backing file ${JSON.stringify(reader.backingFile)}, the manifest recorded ${JSON.stringify(entry.backing)} (files swapped or renamed?)`);
    }
    await checkMap(reader, entry, where);
    return reader;
  } catch (err) {
    await reader.close().catch(() => {});
    throw err;
  }
}

const EXPECT_ZERO = 1;
const EXPECT_DATA = 2;
const SEEN = 3;

async function checkMap(reader: Qcow2Reader, entry: ImageEntry, file: string): Promise<void> {
  const cs = reader.clusterSize;
  const expected = new Uint8Array(reader.guestClusters);
  for (const [start, length] of entry.extents) expected.fill(EXPECT_DATA, start / cs, Math.ceil((start + length) / cs));
  for (const [start, length] of entry.zeros) expected.fill(EXPECT_ZERO, start / cs, Math.ceil((start + length) / cs));
  const name = (s: number): string => (s === EXPECT_DATA ? 'data' : s === EXPECT_ZERO ? 'a zero cluster' : 'unallocated');
  await reader.check((index, info) => {
    const actual = info.state === ClusterState.ZERO ? EXPECT_ZERO : info.state === ClusterState.UNALLOCATED ? 0 : EXPECT_DATA;
    const want = expected[index] as number;
    if (actual !== want) {
      throw new ChainError(file, info.entryOffset, `the L2 entry makes guest offset ${index * cs} ${name(actual)}; the manifest recorded ${name(want)}`);
    }
    expected[index] = SEEN;
  });
  const missing = expected.findIndex((s) => s === EXPECT_DATA || s === EXPECT_ZERO);
  if (missing >= 0) throw new ChainError(file, null, `guest offset ${missing * cs} is unallocated in the image; the manifest recorded ${name(expected[missing] as number)}`);
}

/**
 * Reads the data extent `[start, start + length)` of one image (every cluster of it is data,
 * as {@link openEntry} checked) into `into`, and checks its digest (of `algorithm`) against `want`.
 */
export async function readExtent(reader: Qcow2Reader, start: number, length: number, want: string, into: Buffer, algorithm: ExtentAlgorithm): Promise<void> {
  const firstHost = await readExtentData(reader, start, length, into);
  const got = extentDigest(algorithm, into.subarray(0, length));
  if (got !== want) throw digestError(reader, firstHost, start, length, got, want, algorithm);
}

function digestError(reader: Qcow2Reader, firstHost: number, start: number, length: number, got: string, want: string, algorithm: ExtentAlgorithm): ChecksumError {
  return new ChecksumError(reader.path, firstHost, `the data of guest offset ${start} (${length} bytes) has ${ALGORITHM_NAME[algorithm]} ${got}; the manifest recorded ${want}`);
}

/** Most buffers one scatter read is given (Linux's IOV_MAX). */
const MAX_PARTS = 1024;
/** Bytes per read of a {@link ReadBatch} (larger runs are read in pieces, at the same time). */
const READ_PIECE = 1 << 20;

/**
 * The host reads of one image gathered for one window: runs of host-contiguous clusters, each
 * read with one scatter read into its buffer pieces (adjacent pieces of one buffer merged).
 * The images of a backup are written in guest order, so a window's data clusters of one image
 * are usually one run: one system call instead of one per extent.
 */
export class ReadBatch {
  private runs: Array<{ host: number; bytes: number; parts: Uint8Array[]; what: string }> = [];

  constructor(private readonly reader: Qcow2Reader) {}

  add(host: number, into: Uint8Array, what: string): void {
    const last = this.runs[this.runs.length - 1];
    if (last === undefined || last.host + last.bytes !== host || last.parts.length >= MAX_PARTS) {
      this.runs.push({ host, bytes: into.length, parts: [into], what });
      return;
    }
    last.bytes += into.length;
    const prev = last.parts[last.parts.length - 1] as Uint8Array;
    if (prev.buffer === into.buffer && prev.byteOffset + prev.length === into.byteOffset) last.parts[last.parts.length - 1] = new Uint8Array(prev.buffer, prev.byteOffset, prev.length + into.length);
    else last.parts.push(into);
  }

  /**
   * Reads everything added, in pieces of at most {@link READ_PIECE} bytes at the same time (the
   * I/O threads copy from the page cache in parallel); resolves, or rejects with the first
   * error, only once every read has ended (the buffers are reused after).
   */
  async flush(): Promise<void> {
    const runs = this.runs;
    this.runs = [];
    const reads: Array<Promise<void>> = [];
    for (const r of runs) {
      let host = r.host;
      let group: Uint8Array[] = [];
      let groupBytes = 0;
      for (let part of r.parts) {
        while (part.length > 0) {
          const take = Math.min(part.length, READ_PIECE - groupBytes);
          group.push(part.subarray(0, take));
          groupBytes += take;
          part = part.subarray(take);
          if (groupBytes === READ_PIECE) {
            reads.push(this.reader.readHostv(group, host, r.what));
            host += groupBytes;
            group = [];
            groupBytes = 0;
          }
        }
      }
      if (groupBytes > 0) reads.push(this.reader.readHostv(group, host, r.what));
    }
    for (const r of await Promise.allSettled(reads)) if (r.status === 'rejected') throw r.reason;
  }
}

/**
 * Reads a data extent of one image into `into` (unchecked); returns the host offset of its
 * first cluster. With `batch`, plain data clusters are only added to it (read when it is
 * flushed); compressed ones are read at once.
 */
async function readExtentData(reader: Qcow2Reader, start: number, length: number, into: Buffer, batch?: ReadBatch): Promise<number> {
  const cs = reader.clusterSize;
  const first = start / cs;
  const count = Math.ceil(length / cs);
  const reads = batch ?? new ReadBatch(reader);
  let firstHost = -1;
  for (let k = 0; k < count; k++) {
    const info = await reader.clusterAt(first + k);
    if (firstHost < 0) firstHost = info.hostOffset;
    const bytes = Math.min(cs, length - k * cs);
    if (info.state === ClusterState.DATA) {
      reads.add(info.hostOffset, into.subarray(k * cs, k * cs + bytes), `data of guest offset ${start}`);
    } else if (info.state === ClusterState.COMPRESSED) {
      const whole = Buffer.allocUnsafe(cs);
      await reader.readCompressed(first + k, info, whole);
      whole.copy(into, k * cs, 0, bytes);
    } else {
      throw new ChainError(reader.path, info.entryOffset, `guest offset ${(first + k) * cs} is not data, but the manifest recorded data there`);
    }
  }
  if (batch === undefined) await reads.flush();
  return firstHost;
}

/** Flushes every batch (the images' reads run at the same time); rejects only once all ended. */
async function flushAll(batches: readonly ReadBatch[]): Promise<void> {
  for (const r of await Promise.allSettled(batches.map((b) => b.flush()))) if (r.status === 'rejected') throw r.reason;
}

/** Called with each window of the composed disk, in order; `zero` when it is all zeros. */
export type WindowSink = (offset: number, data: Buffer, zero: boolean) => Promise<void>;

/** One window's worth of work in flight: its buffers and the promise that frees them. */
interface Slot {
  readonly out: Buffer;
  scratch: Buffer;
  busy: Promise<void> | null;
}

function windowBuffer(bytes: number): Buffer {
  return Buffer.alloc(Math.max(1, bytes));
}

/** A window planned into a slot: where its extents go, and its reads (gathered, not yet issued). */
interface Planned {
  readonly w: number;
  readonly len: number;
  readonly end: number;
  readonly slot: Slot;
  readonly out: Buffer;
  readonly pending: Pending[];
  readonly overlay: Array<{ zero: boolean; from: number; to: number; length: number }>;
  readonly batches: ReadBatch[];
}

/** A data extent read for a window, waiting for its digest. */
interface Pending {
  readonly reader: Qcow2Reader;
  readonly buf: Buffer;
  readonly offset: number;
  readonly start: number;
  readonly length: number;
  readonly digest: string;
  readonly algorithm: ExtentAlgorithm;
  readonly firstHost: number;
}

/**
 * Composes a device's disk at a point from its chain (oldest image first), one digest window
 * at a time: the oldest image's extents are read straight into the window, newer images' into
 * a scratch area; once every extent's digest matched the manifest, newer zero and data
 * extents are laid over in order and the window goes to `sink`. Every byte that reaches `sink`
 * was checked; nothing is read through backing-file names, which {@link openEntry} matched.
 *
 * With `overlap`, the next windows are read and hashed while earlier ones are written: sinks
 * still start in window order, but may run at the same time (they must not share state). After an error no further sink starts, and every sink already started has
 * finished before this rejects.
 */
export async function composeChain(
  chain: readonly OpenedImage[],
  virtualSize: number,
  span: number,
  sink: WindowSink,
  onProgress?: (done: number, total: number) => void,
  overlap = false,
): Promise<void> {
  const slots: Slot[] = Array.from({ length: overlap ? 3 : 1 }, () => ({ out: windowBuffer(span), scratch: windowBuffer(span), busy: null }));
  const ei = chain.map(() => 0);
  const zi = chain.map(() => 0);
  let turn = 0;
  let previousSink: Promise<void> = Promise.resolve();
  let failure: unknown = null;
  let broken = false;
  /**
   * Plans window `w` into the next slot (waiting until the slot is free): zero fills are done,
   * the data reads are gathered in `batches`, not yet issued.
   */
  const plan = async (w: number): Promise<Planned> => {
    const len = Math.min(span, virtualSize - w);
    const end = w + len;
    const slot = slots[turn++ % slots.length] as Slot;
    if (slot.busy !== null) await slot.busy;
    slot.busy = null;
    const out = slot.out;
    const pending: Pending[] = [];
    const overlay: Array<{ zero: boolean; from: number; to: number; length: number }> = [];
    let scratchUsed = 0;
    const batches: ReadBatch[] = [];
    for (const [i, { entry, reader, algorithm }] of chain.entries()) {
      const batch = new ReadBatch(reader);
      batches.push(batch);
      const zeros = entry.zeros;
      let z = zi[i] as number;
      while (z < zeros.length && (zeros[z] as readonly [number, number])[0] < end) {
        const [s, l] = zeros[z] as readonly [number, number];
        const a = Math.max(s, w);
        const b = Math.min(s + l, end);
        if (b > a) overlay.push({ zero: true, from: 0, to: a - w, length: b - a });
        if (s + l > end) break;
        z++;
      }
      zi[i] = z;
      const extents = entry.extents;
      let e = ei[i] as number;
      let cursor = w; // the oldest image fills the gaps between its extents with zeros
      while (e < extents.length && (extents[e] as readonly [number, number, string])[0] < end) {
        const [s, l, sha] = extents[e] as readonly [number, number, string];
        if (s + l > end) throw new ManifestError(path.join(path.dirname(reader.path), MANIFEST_FILE), `extent at ${s} of ${entry.file} crosses a digest window`);
        if (i === 0) {
          out.fill(0, cursor - w, s - w);
          cursor = s + l;
          const firstHost = await readExtentData(reader, s, l, out.subarray(s - w), batch);
          pending.push({ reader, buf: out, offset: s - w, start: s, length: l, digest: sha, algorithm, firstHost });
        } else {
          if (scratchUsed + l > slot.scratch.length) {
            await flushAll(batches); // the reads into the old scratch land first
            const bigger = windowBuffer(Math.max(slot.scratch.length * 2, scratchUsed + l));
            slot.scratch.copy(bigger, 0, 0, scratchUsed);
            slot.scratch = bigger;
          }
          const firstHost = await readExtentData(reader, s, l, slot.scratch.subarray(scratchUsed), batch);
          pending.push({ reader, buf: slot.scratch, offset: scratchUsed, start: s, length: l, digest: sha, algorithm, firstHost });
          overlay.push({ zero: false, from: scratchUsed, to: s - w, length: l });
          scratchUsed += l;
        }
        e++;
      }
      ei[i] = e;
      if (i === 0) out.fill(0, cursor - w, len);
    }
    return { w, len, end, slot, out, pending, overlay, batches };
  };
  let reads: Promise<void> | null = null;
  try {
    let cur: Planned | null = virtualSize > 0 ? await plan(0) : null;
    // The images are different files: their reads of a window run at the same time.
    reads = cur === null ? null : flushAll(cur.batches);
    while (cur !== null) {
      const { w, len, end, slot, out, pending, overlay } = cur;
      await reads;
      reads = null;
      // With overlap, the next window's reads are issued before this window is hashed and its
      // writes are queued: the I/O threads take them first, and the reads are what this loop
      // waits for (the writes keep up).
      let next: Planned | null = null;
      if (overlap && end < virtualSize) {
        next = await plan(end);
        reads = flushAll(next.batches);
        reads.catch(() => {}); // awaited at the next turn (or below, on an error)
      }
      const verified = verifyPending(pending);
      const after = previousSink;
      let sinkCalled: () => void = () => {};
      previousSink = new Promise<void>((r) => (sinkCalled = r));
      slot.busy = (async () => {
        try {
          await verified;
          await after; // sinks start in window order
          for (const o of overlay) {
            if (o.zero) out.fill(0, o.to, o.to + o.length);
            else slot.scratch.copy(out, o.to, o.from, o.from + o.length);
          }
          if (broken) return; // an earlier window failed: write nothing more
          const data = out.subarray(0, len);
          const written = sink(w, data, pending.length === 0 || isZero(data));
          sinkCalled();
          await written;
        } catch (err) {
          broken = true;
          throw err;
        } finally {
          sinkCalled();
        }
      })();
      // Keep a rejection from going unhandled while the next window is read.
      slot.busy.catch(() => {});
      if (!overlap) await slot.busy;
      onProgress?.(end, virtualSize);
      if (!overlap && end < virtualSize) {
        next = await plan(end);
        reads = flushAll(next.batches);
      }
      cur = next;
    }
  } catch (err) {
    failure = err;
    broken = true;
  }
  // Never return (or throw) while a read or a sink of ours is still running.
  if (reads !== null) await reads.catch(() => {});
  const settled = await Promise.allSettled(slots.map((s) => s.busy ?? Promise.resolve()));
  if (failure !== null) throw failure;
  for (const r of settled) if (r.status === 'rejected') throw r.reason;
}

async function verifyPending(pending: readonly Pending[]): Promise<void> {
  for (const p of pending) {
    // Hashed here, on this thread: a worker thread measured no faster on this 2-core machine
    // under load (the digests compete with the reads and writes for the same cores).
    const got = extentDigest(p.algorithm, p.buf.subarray(p.offset, p.offset + p.length));
    if (got !== p.digest) throw digestError(p.reader, p.firstHost, p.start, p.length, got, p.digest, p.algorithm);
  }
}

const ZEROS = Buffer.alloc(1 << 20);

/** True when every byte is zero (memcmp against a zero page: BigInt reads cost too much here). */
export function isZero(b: Uint8Array): boolean {
  for (let off = 0; off < b.length; off += ZEROS.length) {
    const n = Math.min(ZEROS.length, b.length - off);
    if (Buffer.compare(b.subarray(off, off + n), ZEROS.subarray(0, n)) !== 0) return false;
  }
  return true;
}

/** Opens the chain of `device` up to point `at` (1-based), oldest first; closes all on error. */
export async function openChain(view: RepositoryView, deviceIndex: number, at: number): Promise<OpenedImage[]> {
  const opened: OpenedImage[] = [];
  try {
    // A point's chain starts at the last full image at or before it: older chains do not matter.
    let first = at - 1;
    while (first > 0 && view.manifest.points[first]?.images[deviceIndex]?.kind !== 'full') first--;
    for (let p = first; p < at; p++) {
      const entry = view.manifest.points[p]?.images[deviceIndex] as ImageEntry;
      const laterPoints = p + 1 === at ? `point ${at}` : `points ${p + 1} to ${at}`;
      opened.push({ entry, reader: await openEntry(view, entry, deviceIndex, laterPoints), algorithm: view.manifest.extentDigest });
    }
    return opened;
  } catch (err) {
    for (const o of opened) await o.reader.close().catch(() => {});
    throw err;
  }
}
