import { BlkError } from '@blkfilter/bio';

/**
 * The error codes that mean "this repository (or image) is damaged or inconsistent": a
 * malformed image, a checksum that does not match, a chain or manifest that does not hold.
 * The CLI answers all of them with its own exit code.
 */
export const DamageCode = {
  /** A qcow2 image is malformed: a field, offset, length or table does not hold. */
  IMAGE: 'EBADIMG',
  /** Bytes do not match the digest the manifest recorded for them. */
  CHECKSUM: 'EBADSUM',
  /** The chain does not match its manifest: a missing, swapped, extra or stale file. */
  CHAIN: 'EBADCHAIN',
  /** The manifest itself is unreadable, malformed, or fails its own digest. */
  MANIFEST: 'EBADMANIFEST',
} as const;
export type DamageCode = (typeof DamageCode)[keyof typeof DamageCode];

const DAMAGE = new Set<string>(Object.values(DamageCode));

/**
 * Base of every "the repository is damaged" error: names the file and (when known) the byte
 * offset in it where the damage was found, so that it can be located without the source.
 */
export class RepositoryDamageError extends BlkError {
  /** The file that is damaged (absolute or as given). */
  readonly file: string;
  /** Byte offset in `file` of the damage, or null when it is not about one place. */
  readonly offset: number | null;

  constructor(code: DamageCode, file: string, offset: number | null, message: string, options?: { cause?: unknown }) {
    super(code, `${file}${offset === null ? '' : ` at offset ${offset}`}: ${message}`, options);
    this.file = file;
    this.offset = offset;
  }

  /** True for any damage error (by code, so also across duplicate installs). */
  static isDamage(value: unknown): value is RepositoryDamageError {
    return BlkError.isInstance(value) && DAMAGE.has(value.code);
  }
}

/** A malformed qcow2 image: what was expected at which offset, and what was found. */
export class ImageFormatError extends RepositoryDamageError {
  constructor(file: string, offset: number | null, message: string, options?: { cause?: unknown }) {
    super(DamageCode.IMAGE, file, offset, message, options);
  }
}

/** Bytes that do not match the digest recorded for them in the manifest. */
export class ChecksumError extends RepositoryDamageError {
  constructor(file: string, offset: number | null, message: string) {
    super(DamageCode.CHECKSUM, file, offset, message);
  }
}

/** A chain that does not match its manifest (missing, swapped, extra or stale files). */
export class ChainError extends RepositoryDamageError {
  constructor(file: string, offset: number | null, message: string) {
    super(DamageCode.CHAIN, file, offset, message);
  }
}

/** A manifest that cannot be trusted: not JSON, not ours, or failing its own digest. */
export class ManifestError extends RepositoryDamageError {
  constructor(file: string, message: string, options?: { cause?: unknown }) {
    super(DamageCode.MANIFEST, file, null, message, options);
  }
}

/** The snapshot's take is already a point of the chain: backing it up again adds nothing. */
export class DuplicateTakeError extends BlkError {
  constructor(message: string) {
    super('EEXIST', message);
  }
}

/** Another backup or prune holds the folder's lock. */
export class RepositoryBusyError extends BlkError {
  constructor(message: string) {
    super('EBUSY', message);
  }
}

/** The restore target exists and `force` was not given. */
export class TargetExistsError extends BlkError {
  constructor(message: string) {
    super('EEXIST', message);
  }
}

/** A backup was cancelled (its `signal` aborted): its partial files are removed, nothing recorded. */
export class BackupCancelledError extends BlkError {
  constructor(message: string) {
    super('ECANCELED', message);
  }
}
