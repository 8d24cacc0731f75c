export { Qcow2Writer } from './qcow2/writer.js';
export type { Qcow2WriterOptions } from './qcow2/writer.js';
export { Qcow2Reader, RawReader, openImage, ClusterState, ImageFormatError } from './qcow2/reader.js';
export type { ImageReader } from './qcow2/reader.js';
export { runBackup, restoreBackup, verifyBackup, readManifest, imageSha256, clusterRanges, BackupChainError } from './backup.js';
export type { BackupManifest, BackupEntry, BackupOptions, BackupResult, RestoreOptions, ChangedExtentsAnswer } from './backup.js';
