export {
  SNAPSHOT_FILTER_NAME,
  SNAPSHOT_DEFAULT_ALTITUDE,
  SNAPSHOT_DEFAULT_CHUNK_SIZE,
  SNAPSHOT_MAX_CHUNK_SIZE,
  SNAPSHOT_DEFAULT_MAX_CONCURRENT_COPIES,
  SNAPSHOT_MAX_CONCURRENT_COPIES,
  DIFF_STORAGE_DEFAULT_STEP,
  DIFF_STORAGE_MAX_STEP,
  SnapshotState,
  SnapshotEventType,
} from './types.js';
export type {
  MemoryDiffStorageOptions,
  DirectoryDiffStorageOptions,
  DiffStorageOptions,
  CreateSnapshotOptions,
  AddDeviceOptions,
  DiffStorageUsage,
  LowSpaceEvent,
  StorageExtendedEvent,
  CorruptedEvent,
  DestroyedEvent,
  TimeoutEvent,
  SnapshotEvent,
  SnapshotDeviceInfo,
  SnapshotInfo,
} from './types.js';
export {
  SnapshotBusyError,
  SnapshotStateError,
  SnapshotNotFoundError,
  DiffStorageOverflowError,
  DiffStorageIoError,
  SnapshotCorruptedError,
  CowWouldBlockError,
  CowNoioReserveError,
} from './errors.js';
export { Snapshot, createSnapshot, listSnapshots, getSnapshot, registerSnapshotFilter } from './snapshot.js';
export { SnapshotImageBackend } from './image.js';
