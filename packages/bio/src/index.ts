export { BlkStatus, blkStatusName, blkStatusToErrno, blkStatusDescription, isBlkStatus, isRetryable } from './status.js';
export { ReqOp, ReqFlag, REQ_FLAG_MASK, opIsWrite, opHasData, opChangesData, opName, isReqOp, flagNames } from './op.js';
export {
  BlkError,
  InvalidBioError,
  ReadOnlyDeviceError,
  DeviceOfflineError,
  DeviceBusyError,
  NotSupportedError,
  DeviceExistsError,
  NoSuchDeviceError,
  InvalidArgumentError,
  PartitionTableError,
  BioCompletedTwiceError,
  BioNeverCompletedError,
  BioIoError,
} from './errors.js';
export {
  Bio,
  BioVec,
  SECTOR_SIZE,
  SECTOR_SHIFT,
  BLK_QC_T_NONE,
  bioEndio,
  bioEndioError,
  bioChain,
  bioSplit,
  bioClone,
  bioClearPolled,
  bvecBytes,
  copyToBioVecs,
  copyFromBioVecs,
  zeroBioVecs,
  sliceBioVecs,
  describeBio,
  BioTracker,
  enableBioDebug,
  disableBioDebug,
  bioDebugTracker,
} from './bio.js';
export type { BioEndIo, CompletionSink } from './bio.js';
export type { BlockBackend, BackendCapabilities, BlockStatusExtent } from './backend.js';
export {
  BlockDev,
  Disk,
  DEFAULT_LIMITS,
  createDisk,
  createDiskSync,
  findBlockDevice,
  getBlockDevice,
  listBlockDevices,
} from './device.js';
export type { QueueLimits, DiskOptions, BioFilterHook } from './device.js';
export { IoStats, IoClass, IO_LATENCY_BUCKETS, IO_STATS_OPS, IO_STATS_STATUSES } from './iostats.js';
export { HwQueue, bioPoll, blkPoll } from './queue.js';
export { submitBio, checkBio, bioSplitToLimits } from './submit.js';
export {
  submitBioWait,
  submitBioSplitWait,
  blkdevRead,
  blkdevWrite,
  blkdevFlush,
  blkdevDiscard,
  blkdevZeroout,
  blkdevBlockStatus,
  bioError,
} from './io.js';
export { MemoryBackend } from './backends/memory.js';
export type { MemoryBackendOptions } from './backends/memory.js';
export { readPartitionTable } from './partitions/index.js';
export type { PartitionInfo, PartitionTable } from './partitions/types.js';
export { allocIoBuffer, isIoBufferAligned } from './aligned.js';
export { FileBackend } from './backends/file.js';
export type { FileBackendOptions, FileBackendStats } from './backends/file.js';
export { LinearBackend } from './backends/linear.js';
export type { LinearBackendOptions } from './backends/linear.js';
export { memallocNoioSave, memallocNoioRestore, withNoio, inNoioScope, bioNeedsNoio } from './noio.js';
