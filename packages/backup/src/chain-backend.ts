import fs from 'node:fs';
import {
  BlkStatus,
  copyToBioVecs,
  ReqOp,
  SECTOR_SIZE,
  type BackendCapabilities,
  type Bio,
  type BlockBackend,
  type BlockStatusExtent,
  type CompletionSink,
} from '@blkfilter/bio';
import { openChain, openView, readExtent, type OpenedImage } from './chain.js';
import { lockFolder, type FolderLock } from './fsutil.js';
import type { BackupPoint, Manifest } from './manifest.js';
import { closeAll, pick, refuseStale } from './points.js';
import { ClusterState } from './reader.js';

/** Options of {@link ChainBackend.open}. */
export interface OpenPointOptions {
  /** 1-based point (default: the newest; refused when the manifest is stale). */
  readonly at?: number;
  /** Which device of a folder that holds several. */
  readonly device?: string;
  /**
   * Named in the note left next to the folder's shared lock while the backend is open, so that
   * a prune refused meanwhile says who holds it (default `@blkfilter/backup ChainBackend`).
   */
  readonly holder?: string;
  /** Called once per damaged extent found while serving (its reads complete with IOERR). */
  readonly onDamage?: (err: Error) => void;
}

const CAPABILITIES: BackendCapabilities = { writeCache: false, discard: false, writeZeroes: false };

/** `host[c]` of a zero cluster (host cluster 0 is the image header, never data). */
const HOST_ZERO = 0;
/** `host[c]` of a compressed cluster: read through the image's reader. */
const HOST_COMPRESSED = 0xffffffff;

const EXTENT_UNCHECKED = 0;
const EXTENT_OK = 1;
const EXTENT_BAD = 2;

/** A read that must first check extents (or inflate compressed clusters): off the fast path. */
interface SlowRead {
  readonly bio: Bio;
  readonly sink: CompletionSink;
}

/**
 * A backup point as a read-only block backend: reads come straight from the qcow2 chain of the
 * point (no temporary restore), through the repository's checks. On open, under the folder's
 * shared lock (held until {@link close}, so a prune cannot remove the files), every image of
 * the chain is checked as restore checks it (size, header, structure, cluster map against the
 * manifest); the guest-to-host map of the chain is then held in memory (5 bytes per cluster).
 * Every data extent is checked against its SHA-256 the first time a read touches it (one read
 * of the extent, at most the digest window); later reads of it go straight to the page cache
 * with a synchronous `pread` and complete before `queueBio` returns. A damaged extent completes
 * its reads with IOERR (and `onDamage`), never with wrong data. Compressed clusters are read
 * and inflated through the image's reader, asynchronously.
 *
 * `blockStatus` reports as holes the clusters no image of the chain holds data for (unallocated
 * everywhere, or a zero cluster on top), which read as zeros; {@link allocationDepth} says how
 * deep in the chain each extent lives, as `qemu:allocation-depth` does.
 */
export class ChainBackend implements BlockBackend {
  readonly description: string;
  readonly sizeBytes: number;
  readonly readOnly = true;
  readonly minIoSize = SECTOR_SIZE;
  readonly capabilities = CAPABILITIES;
  /** 1-based point served, and its manifest record. */
  readonly position: number;
  readonly point: BackupPoint;
  readonly clusterSize: number;
  /** Images in the chain (oldest first). */
  readonly chainLength: number;
  /** Extents checked against their digests so far (for tests and status). */
  checkedExtents = 0;
  private readonly chain: readonly OpenedImage[];
  private readonly fds: number[];
  /** Per guest cluster: 0 when no image of the chain holds it, else 1 + index of the image that does. */
  private readonly layer: Uint8Array;
  /** Per guest cluster: host cluster index of its data, or {@link HOST_ZERO}, {@link HOST_COMPRESSED}. */
  private readonly host: Uint32Array;
  /** Per image: extent starts (for a binary search) and each extent's check state. */
  private readonly extentStarts: Float64Array[];
  private readonly extentState: Uint8Array[];
  private readonly checking = new Map<string, Promise<void>>();
  private readonly lock: FolderLock;
  private readonly onDamage: ((err: Error) => void) | null;
  private scratch: Buffer;
  private closed = false;

  private constructor(dir: string, position: number, point: BackupPoint, dev: Manifest['devices'][number], chain: readonly OpenedImage[], clusterSize: number, lock: FolderLock, onDamage: ((err: Error) => void) | null) {
    this.description = `backup:${dir}@${position}`;
    this.sizeBytes = dev.virtualSize;
    this.position = position;
    this.point = point;
    this.clusterSize = clusterSize;
    this.chain = chain;
    this.chainLength = chain.length;
    this.lock = lock;
    this.onDamage = onDamage;
    const clusters = Math.ceil(dev.virtualSize / clusterSize);
    this.layer = new Uint8Array(clusters);
    this.host = new Uint32Array(clusters);
    this.extentStarts = chain.map((c) => Float64Array.from(c.entry.extents, (e) => e[0]));
    this.extentState = chain.map((c) => new Uint8Array(c.entry.extents.length));
    this.fds = [];
    this.scratch = Buffer.alloc(clusterSize);
  }

  /**
   * Opens point `at` of the backup folder `dir` as a backend (wrap it with `createDisk`). Takes
   * the folder's shared lock for as long as the backend is open; throws (and holds nothing)
   * when the folder, the manifest or an image of the chain is damaged or missing.
   */
  static async open(dir: string, options: OpenPointOptions = {}): Promise<ChainBackend> {
    const lock = await lockFolder(dir, 'shared', options.holder ?? `@blkfilter/backup ChainBackend in ${process.argv[1] ?? 'node'}`);
    let chain: OpenedImage[] = [];
    try {
      const view = await openView(dir);
      if (options.at === undefined) await refuseStale(view);
      const { position, deviceIndex, point } = pick(view, options.at, options.device);
      if (position > 255) throw new RangeError('chains deeper than 255 images are not served');
      chain = await openChain(view, deviceIndex, position);
      const dev = view.manifest.devices[deviceIndex] as Manifest['devices'][number];
      const b = new ChainBackend(dir, position, point, dev, chain, view.manifest.clusterSize, lock, options.onDamage ?? null);
      await b.buildMap();
      return b;
    } catch (err) {
      await closeAll(chain);
      await lock.release();
      throw err;
    }
  }

  private async buildMap(): Promise<void> {
    const cs = this.clusterSize;
    for (const [i, { entry, reader }] of this.chain.entries()) {
      const mark = i + 1;
      for (const [s, l] of entry.zeros) {
        for (let c = s / cs; c < Math.ceil((s + l) / cs); c++) {
          this.layer[c] = mark;
          this.host[c] = HOST_ZERO;
        }
      }
      for (const [s, l] of entry.extents) {
        for (let c = s / cs; c < Math.ceil((s + l) / cs); c++) {
          const info = await reader.clusterAt(c);
          this.layer[c] = mark;
          this.host[c] = info.state === ClusterState.COMPRESSED ? HOST_COMPRESSED : info.hostOffset / cs;
        }
      }
      this.fds.push(fs.openSync(reader.path, 'r'));
    }
  }

  queueBio(bio: Bio, sink: CompletionSink): void {
    if (this.closed) {
      sink.complete(bio, BlkStatus.OFFLINE);
      return;
    }
    if (bio.op === ReqOp.FLUSH) {
      sink.complete(bio, BlkStatus.OK);
      return;
    }
    if (bio.op !== ReqOp.READ) {
      sink.complete(bio, BlkStatus.NOTSUPP);
      return;
    }
    const offset = bio.sector * SECTOR_SIZE;
    const ready = this.readyFor(offset, bio.size);
    if (ready === EXTENT_OK) {
      sink.complete(bio, this.readFast(bio, offset));
      return;
    }
    if (ready === EXTENT_BAD) {
      sink.complete(bio, BlkStatus.IOERR);
      return;
    }
    // First touch of an extent (or compressed data): check it, then read. Once per extent.
    this.readSlow({ bio, sink }).catch(() => sink.complete(bio, BlkStatus.IOERR));
  }

  /** OK when every cluster of the range can be read synchronously, BAD when one is damaged. */
  private readyFor(offset: number, length: number): number {
    const cs = this.clusterSize;
    const last = Math.ceil((offset + length) / cs);
    for (let c = Math.floor(offset / cs); c < last; c++) {
      const l = this.layer[c] as number;
      if (l === 0) continue;
      const h = this.host[c] as number;
      if (h === HOST_ZERO) continue;
      if (h === HOST_COMPRESSED) return EXTENT_UNCHECKED;
      const state = (this.extentState[l - 1] as Uint8Array)[this.extentIndex(l - 1, c * cs)] as number;
      if (state !== EXTENT_OK) return state;
    }
    return EXTENT_OK;
  }

  private extentIndex(image: number, guest: number): number {
    const starts = this.extentStarts[image] as Float64Array;
    let lo = 0;
    let hi = starts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if ((starts[mid] as number) <= guest) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /** Copies `[offset, offset + bio.size)` into the bio's vecs: zeros, or preads of runs of one image. */
  private readFast(bio: Bio, offset: number): BlkStatus {
    const cs = this.clusterSize;
    const end = offset + bio.size;
    let pos = offset;
    try {
      while (pos < end) {
        const c = Math.floor(pos / cs);
        const l = this.layer[c] as number;
        const h = this.host[c] as number;
        // The run: following clusters of the same image, contiguous on the host (or zeros).
        let runEnd = Math.min(end, (c + 1) * cs);
        let next = c + 1;
        const zero = l === 0 || h === HOST_ZERO;
        while (runEnd < end) {
          const nl = this.layer[next] as number;
          const nh = this.host[next] as number;
          const nzero = nl === 0 || nh === HOST_ZERO;
          if (zero ? !nzero : nzero || nl !== l || nh !== h + (next - c)) break;
          runEnd = Math.min(end, (next + 1) * cs);
          next++;
        }
        const n = runEnd - pos;
        if (n > this.scratch.length) this.scratch = Buffer.alloc(Math.max(n, this.scratch.length * 2));
        if (zero) this.scratch.fill(0, 0, n);
        else {
          const fd = this.fds[l - 1] as number;
          const at = h * cs + (pos - c * cs);
          let done = 0;
          while (done < n) {
            const got = fs.readSync(fd, this.scratch, done, n - done, at + done);
            if (got === 0) return BlkStatus.IOERR; // the image shrank under us
            done += got;
          }
        }
        copyToBioVecs(bio.vecs, pos - offset, this.scratch, 0, n);
        pos = runEnd;
      }
      return BlkStatus.OK;
    } catch {
      return BlkStatus.IOERR;
    }
  }

  private async readSlow(r: SlowRead): Promise<void> {
    const { bio, sink } = r;
    const cs = this.clusterSize;
    const offset = bio.sector * SECTOR_SIZE;
    const last = Math.ceil((offset + bio.size) / cs);
    let compressed = false;
    for (let c = Math.floor(offset / cs); c < last; c++) {
      const l = this.layer[c] as number;
      const h = this.host[c] as number;
      if (l === 0 || h === HOST_ZERO) continue;
      await this.checkExtent(l - 1, this.extentIndex(l - 1, c * cs));
      if (h === HOST_COMPRESSED) compressed = true;
    }
    if (this.readyFor(offset, bio.size) === EXTENT_BAD) {
      sink.complete(bio, BlkStatus.IOERR);
      return;
    }
    if (!compressed) {
      sink.complete(bio, this.closed ? BlkStatus.OFFLINE : this.readFast(bio, offset));
      return;
    }
    // Compressed clusters: cluster by cluster through the readers (they inflate and check).
    const buf = Buffer.alloc(cs);
    for (let c = Math.floor(offset / cs); c < last; c++) {
      const from = Math.max(offset, c * cs);
      const to = Math.min(offset + bio.size, (c + 1) * cs);
      const l = this.layer[c] as number;
      if (l === 0 || this.host[c] === HOST_ZERO) buf.fill(0);
      else await (this.chain[l - 1] as OpenedImage).reader.read(c * cs, Math.min(cs, this.sizeBytes - c * cs), buf);
      copyToBioVecs(bio.vecs, from - offset, buf, from - c * cs, to - from);
    }
    sink.complete(bio, BlkStatus.OK);
  }

  /** Checks extent `e` of image `i` against its digest, once (concurrent callers share it). */
  private checkExtent(i: number, e: number): Promise<void> {
    const states = this.extentState[i] as Uint8Array;
    if (states[e] !== EXTENT_UNCHECKED) return Promise.resolve();
    const key = `${i}:${e}`;
    let p = this.checking.get(key);
    if (p === undefined) {
      const { entry, reader, algorithm } = this.chain[i] as OpenedImage;
      const [s, l, sha] = entry.extents[e] as readonly [number, number, string];
      p = readExtent(reader, s, l, sha, Buffer.allocUnsafe(l), algorithm).then(
        () => {
          states[e] = EXTENT_OK;
          this.checkedExtents++;
          this.checking.delete(key);
        },
        (err: unknown) => {
          states[e] = EXTENT_BAD;
          this.checking.delete(key);
          this.onDamage?.(err as Error);
        },
      );
      this.checking.set(key, p);
    }
    return p;
  }

  blockStatus(offset: number, length: number): BlockStatusExtent[] {
    const out: BlockStatusExtent[] = [];
    this.runs(offset, length, (n, depth, hole) => {
      const last = out[out.length - 1];
      if (last !== undefined && last.hole === hole) out[out.length - 1] = { length: last.length + n, hole };
      else out.push({ length: n, hole });
      return depth;
    });
    return out;
  }

  /**
   * How deep in the chain each byte of `[offset, offset + length)` lives: runs of `depth` 0
   * (no image of the chain holds it), 1 (the point's own image), 2 (its backing file), ... as
   * `qemu:allocation-depth` reports them. A zero cluster counts at the depth of its image.
   */
  allocationDepth(offset: number, length: number): Array<{ length: number; depth: number }> {
    const out: Array<{ length: number; depth: number }> = [];
    this.runs(offset, length, (n, depth) => {
      const last = out[out.length - 1];
      if (last !== undefined && last.depth === depth) last.length += n;
      else out.push({ length: n, depth });
      return depth;
    });
    return out;
  }

  private runs(offset: number, length: number, emit: (n: number, depth: number, hole: boolean) => number): void {
    const cs = this.clusterSize;
    const end = Math.min(offset + length, this.sizeBytes);
    let pos = offset;
    while (pos < end) {
      const c = Math.floor(pos / cs);
      const l = this.layer[c] as number;
      const depth = l === 0 ? 0 : this.chainLength - l + 1;
      const hole = l === 0 || this.host[c] === HOST_ZERO;
      const to = Math.min(end, (c + 1) * cs);
      emit(to - pos, depth, hole);
      pos = to;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled(this.checking.values());
    for (const fd of this.fds) fs.closeSync(fd);
    await closeAll(this.chain);
    await this.lock.release();
  }
}
