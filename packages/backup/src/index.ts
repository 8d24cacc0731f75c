export {
  backupPoint,
  restore,
  verify,
  verifyAgainst,
  prune,
  list,
  clusterRanges,
  DIGEST_SPAN,
} from './repository.js';
export type {
  BackupPointOptions,
  BackupSource,
  BackupResult,
  BackupImageResult,
  CbtTake,
  RestoreOptions,
  RestoreResult,
  VerifyOptions,
  VerifyReport,
  VerifyProblem,
  PruneOptions,
  PruneResult,
  RepositoryListing,
  StepHook,
} from './repository.js';
export { backupSnapshot, cbtTakeOf } from './snapshot-source.js';
export type { BackupSnapshotOptions, BackupSnapshotResult } from './snapshot-source.js';
export { MANIFEST_FILE, parseManifest } from './manifest.js';
export type { Manifest, BackupPoint, ImageEntry, ExtentDigest, ZeroExtent } from './manifest.js';
export {
  DamageCode,
  RepositoryDamageError,
  ImageFormatError,
  ChecksumError,
  ChainError,
  ManifestError,
  DuplicateTakeError,
  RepositoryBusyError,
  BackupCancelledError,
  TargetExistsError,
} from './errors.js';
export { Qcow2Reader, RawReader, openImage, ClusterState } from './reader.js';
export type { ImageReader, ClusterInfo, Qcow2OpenOptions, BackingResolver, CheckResult } from './reader.js';
export { Qcow2Writer } from './writer.js';
export type { Qcow2WriterOptions } from './writer.js';
export { ChainBackend } from './chain-backend.js';
export type { OpenPointOptions } from './chain-backend.js';
export { OverlayBackend } from './overlay.js';
export type { OverlayOptions } from './overlay.js';
export { startLiveRestore, LIVE_MAP_SUFFIX } from './live-restore.js';
export type { LiveRestore, LiveRestoreOptions } from './live-restore.js';
