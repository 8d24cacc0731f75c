// The repository's library calls, one file per operation (backup, restore, verify, prune);
// this module gathers them for the package entry and the tests.
export { DIGEST_SPAN, type StepHook } from './image-builder.js';
export { backupPoint, clusterRanges, type BackupImageResult, type BackupPointOptions, type BackupResult, type BackupSource, type CbtTake } from './backup.js';
export { restore, verifyAgainst, type RestoreOptions, type RestoreResult } from './restore.js';
export { verify, type VerifyOptions, type VerifyProblem, type VerifyReport } from './verify.js';
export { list, prune, type PruneOptions, type PruneResult, type RepositoryListing } from './prune.js';
