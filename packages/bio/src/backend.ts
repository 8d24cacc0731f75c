import type { Bio, CompletionSink } from './bio.js';

/** What a backend can do beyond READ and WRITE. */
export interface BackendCapabilities {
  /**
   * The backend has a volatile write cache: FLUSH, PREFLUSH and FUA mean something and are
   * passed down. Without one the block layer completes FLUSH at once and strips PREFLUSH/FUA,
   * as the kernel does for a queue without a write-back cache.
   */
  readonly writeCache: boolean;
  /** DISCARD is implemented; reads of a discarded range then return zeros. */
  readonly discard: boolean;
  /** WRITE_ZEROES is implemented. */
  readonly writeZeroes: boolean;
}

/**
 * One run of an allocation answer ({@link BlockBackend.blockStatus}, `blkdevBlockStatus`):
 * `length` bytes that are all a hole or all data. Holes map to NBD's `base:allocation` flags
 * `NBD_STATE_HOLE | NBD_STATE_ZERO` (3), data to 0.
 */
export interface BlockStatusExtent {
  /** Bytes in the run, > 0. */
  readonly length: number;
  /**
   * True: not allocated, and reads as zeros (SEEK_HOLE's hole). False: allocated data, which may
   * still read as zeros (a backend need not look inside).
   */
  readonly hole: boolean;
}

/**
 * Where a disk's data lives (memory, a file, an NBD server, another device). The block layer
 * hands it bios that were validated against the disk's limits and remapped to whole-disk
 * sectors; the backend moves the data and completes each bio exactly once through `sink`.
 */
export interface BlockBackend {
  /** A short description for messages: `memory`, `file:/var/img/disk.raw`. */
  readonly description: string;
  /** Size in bytes; the disk's capacity is this rounded down to its logical block size. */
  readonly sizeBytes: number;
  /** The backend refuses writes (the disk is then read-only). */
  readonly readOnly: boolean;
  /** The smallest I/O alignment the backend needs (512, or 4096 for some O_DIRECT files). */
  readonly minIoSize: number;
  /** Optional operations. */
  readonly capabilities: BackendCapabilities;
  /**
   * Performs `bio` and calls `sink.complete(bio, status)` exactly once, now or later. Must not
   * throw: failures are completions with an error status.
   */
  queueBio(bio: Bio, sink: CompletionSink): void;
  /**
   * Optional: which bytes of `[offset, offset + length)` are holes (the allocation map, like
   * `SEEK_HOLE`/`SEEK_DATA`). Advisory: a range reported as a hole MUST read as zeros; a range
   * reported as data may also read as zeros. Answers synchronously, without a bio, from what the
   * backend knows (its page map; for a file, the filesystem's extent map through `lseek`), and
   * never throws. A backend that cannot answer at all leaves it undefined.
   *
   * Offsets are bytes of the backend (not of a partition), not necessarily block aligned; the
   * range was checked against `sizeBytes` by the caller (`blkdevBlockStatus`, the one way in,
   * which also rounds holes to the device's logical blocks, so an answer may be byte granular).
   * Returns extents that cover exactly the range, in order, each longer than 0, neighbours
   * merged (no two adjacent extents with the same `hole`); `[]` for length 0; or null when this
   * backend cannot tell (callers then treat the range as data).
   */
  blockStatus?(offset: number, length: number): BlockStatusExtent[] | null;
  /** Releases the backend (closes files, sockets). Called by `Disk.remove()` after in-flight bios drained. */
  close(): Promise<void>;
}
