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
  /** Releases the backend (closes files, sockets). Called by `Disk.remove()` after in-flight bios drained. */
  close(): Promise<void>;
}
