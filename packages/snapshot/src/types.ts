import type { BlkError } from '@blkfilter/bio';

/** The name the copy-on-write filter is registered under with `@blkfilter/registry`. */
export const SNAPSHOT_FILTER_NAME = 'snapshot-cow';

/**
 * Altitude of the copy-on-write filter: below CBT's 1000, so a tracking filter sees (and
 * counts) every write before the CoW filter may hold it for a copy, and the CoW filter's own
 * reads of the old data, sent below it, are never counted as changes.
 */
export const SNAPSHOT_DEFAULT_ALTITUDE = 500;

/** Default chunk size: 256 KiB, blksnap's default (`chunk_minimum_shift` 18). */
export const SNAPSHOT_DEFAULT_CHUNK_SIZE = 256 * 1024;

/** Largest chunk size: 64 MiB. */
export const SNAPSHOT_MAX_CHUNK_SIZE = 64 * 1024 * 1024;

/** Default cap on chunk copies in flight per snapshot ({@link CreateSnapshotOptions.maxConcurrentCopies}). */
export const SNAPSHOT_DEFAULT_MAX_CONCURRENT_COPIES = 32;

/** Largest cap on chunk copies in flight per snapshot. */
export const SNAPSHOT_MAX_CONCURRENT_COPIES = 4096;

/** Default growth step of the diff storage: 64 MiB. */
export const DIFF_STORAGE_DEFAULT_STEP = 64 * 1024 * 1024;

/** Largest growth step of the diff storage: 1 GiB (one memory buffer or one file per step). */
export const DIFF_STORAGE_MAX_STEP = 1024 * 1024 * 1024;

/** Diff storage kept in memory buffers, one per step. */
export interface MemoryDiffStorageOptions {
  readonly kind: 'memory';
  /** Most bytes the storage may grow to; at least one chunk. */
  readonly limitBytes: number;
  /** Growth step in bytes, a multiple of the chunk size (default 64 MiB, capped by the limit). */
  readonly stepBytes?: number;
}

/** Diff storage kept in files in a directory, one file per step, removed at destroy. */
export interface DirectoryDiffStorageOptions {
  readonly kind: 'directory';
  /** The directory (created if missing). Files are named `blkfilter-snapshot-<id>-<n>.diff`. */
  readonly path: string;
  /** Most bytes the storage may grow to; at least one chunk. */
  readonly limitBytes: number;
  /** Growth step in bytes, a multiple of the chunk size (default 64 MiB, capped by the limit). */
  readonly stepBytes?: number;
}

/** Where a snapshot keeps the old data of chunks (and what its images were written with). */
export type DiffStorageOptions = MemoryDiffStorageOptions | DirectoryDiffStorageOptions;

/** Options of {@link createSnapshot}. */
export interface CreateSnapshotOptions {
  /** The diff storage, shared by all the snapshot's devices. */
  readonly storage: DiffStorageOptions;
  /**
   * Copy-on-write unit in bytes: a power of two, at least each device's logical block size,
   * at most 64 MiB. Default 256 KiB.
   */
  readonly chunkSize?: number;
  /**
   * Most chunk copies in flight at once, for all the snapshot's devices together (1 to 4096,
   * default 32). First writes past it wait in FIFO order for a copy to finish, so a burst of
   * them (or one huge discard after take) reads at most this many chunks at a time; with diff
   * storage in files, each copy in flight holds a chunk-sized buffer.
   */
  readonly maxConcurrentCopies?: number;
}

/** Options of `Snapshot.addDevice`. */
export interface AddDeviceOptions {
  /** Name of the snapshot image device. Default `<device>-snap<N>`, the lowest free N. */
  readonly imageName?: string;
}

/** Lifecycle states of a snapshot. */
export const SnapshotState = {
  /** Created; devices may be added. */
  CREATED: 'created',
  /** Taken: copy-on-write runs and the images are readable. */
  TAKEN: 'taken',
  /** The diff storage overflowed or failed: CoW stopped, image reads fail with IOERR. */
  CORRUPTED: 'corrupted',
  /** Destroyed: filters detached, images removed, storage freed. */
  DESTROYED: 'destroyed',
} as const;

/** One of the values in {@link SnapshotState}. */
export type SnapshotState = (typeof SnapshotState)[keyof typeof SnapshotState];

/** Type names of the events `Snapshot.waitEvent` resolves with. */
export const SnapshotEventType = {
  /** Free diff storage fell under half a step and it is being extended by one. */
  LOW_SPACE: 'low-space',
  /** The diff storage grew by one step. */
  STORAGE_EXTENDED: 'storage-extended',
  /** The snapshot is corrupted; `error` says why. */
  CORRUPTED: 'corrupted',
  /** The snapshot was destroyed (also the answer to every wait after that). */
  DESTROYED: 'destroyed',
  /** No event arrived within `timeoutMs`. */
  TIMEOUT: 'timeout',
} as const;

/** One of the values in {@link SnapshotEventType}. */
export type SnapshotEventType = (typeof SnapshotEventType)[keyof typeof SnapshotEventType];

/** What the diff storage holds, in bytes. */
export interface DiffStorageUsage {
  /** Bytes of chunks stored. */
  readonly usedBytes: number;
  /** Bytes allocated so far (steps added). */
  readonly allocatedBytes: number;
  /** Most bytes it may grow to. */
  readonly limitBytes: number;
}

/** `low-space`: free space fell under half a step; one more step is being allocated. */
export interface LowSpaceEvent extends DiffStorageUsage {
  readonly type: 'low-space';
  readonly time: number;
  /** Bytes about to be added (blksnap's `requested_nr_sect`, in bytes). */
  readonly requestedBytes: number;
}

/** `storage-extended`: the diff storage grew by one step. */
export interface StorageExtendedEvent extends DiffStorageUsage {
  readonly type: 'storage-extended';
  readonly time: number;
}

/** `corrupted`: copy-on-write stopped; image reads fail with IOERR from now on. */
export interface CorruptedEvent {
  readonly type: 'corrupted';
  readonly time: number;
  /** The original device whose chunk could not be saved, or null when no device is concerned. */
  readonly device: string | null;
  /** Why: a `DiffStorageOverflowError` (ENOSPC), a `DiffStorageIoError`, a read error of the original. */
  readonly error: BlkError;
}

/** `destroyed`: the snapshot is gone. */
export interface DestroyedEvent {
  readonly type: 'destroyed';
  readonly time: number;
}

/** `timeout`: nothing happened within the wait's `timeoutMs`. */
export interface TimeoutEvent {
  readonly type: 'timeout';
  readonly time: number;
  readonly timeoutMs: number;
}

/** What `Snapshot.waitEvent` resolves with (blksnap's SNAPSHOT_WAIT_EVENT). */
export type SnapshotEvent = LowSpaceEvent | StorageExtendedEvent | CorruptedEvent | DestroyedEvent | TimeoutEvent;

/** One device of a snapshot, in {@link SnapshotInfo}. */
export interface SnapshotDeviceInfo {
  /** The original device's name. */
  readonly device: string;
  /** The snapshot image's name, or null before take (and after destroy). */
  readonly image: string | null;
  /** Chunks of the device (the last may be shorter than the chunk size). */
  readonly chunks: number;
  /** Chunks saved in diff storage so far (by CoW or by image writes). */
  readonly copiedChunks: number;
}

/** The state of a snapshot (blksnap's SNAPSHOTINFO), from `Snapshot.info()` or {@link listSnapshots}. */
export interface SnapshotInfo {
  readonly id: string;
  readonly state: SnapshotState;
  readonly chunkSize: number;
  readonly devices: readonly SnapshotDeviceInfo[];
  /** Image names, in device order (empty before take). */
  readonly images: readonly string[];
  readonly storage: DiffStorageUsage & {
    readonly kind: 'memory' | 'directory';
    /** The directory, for the directory kind. */
    readonly path: string | null;
    readonly stepBytes: number;
  };
  /** Why the snapshot is corrupted, or null. */
  readonly error: BlkError | null;
  /** `Date.now()` at creation. */
  readonly createdAt: number;
  /** `Date.now()` at take, or null. */
  readonly takenAt: number | null;
  /**
   * The last events (up to 64, oldest first), for a timeline: reading them consumes nothing,
   * unlike `waitEvent`, which hands each event to one waiter.
   */
  readonly history: readonly SnapshotEvent[];
}
