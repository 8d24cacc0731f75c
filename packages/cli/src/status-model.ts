import type { NbdServerAddress } from '@blkfilter/nbd';

// The status model: what the daemon's `status` control method returns, `status --json` prints,
// `/api/status` serves and the status page and `/metrics` read. The daemon builds it in one
// place (its `status` method); this file only names its shape for the readers.

/** A filter in a device's stack, highest altitude first (the order bios meet them). */
export interface StatusFilter {
  readonly name: string;
  readonly altitude: number;
  readonly apiVersion?: number;
}

/** A served disk with its partitions. */
export interface StatusDevice {
  readonly name: string;
  readonly sizeBytes: number;
  readonly backend: string;
  readonly partitions: ReadonlyArray<{ readonly name: string; readonly start: number; readonly sectors: number }>;
  readonly filters: readonly StatusFilter[];
}

/** A snapshot, as `snapshot info --json` prints it. */
export interface StatusSnapshot {
  readonly id: string;
  readonly state: string;
  readonly chunkSize: number;
  readonly devices: ReadonlyArray<{ readonly device: string; readonly image: string | null; readonly chunks: number; readonly copiedChunks: number }>;
  readonly images: readonly string[];
  readonly storage: { readonly kind: string; readonly usedBytes: number; readonly allocatedBytes: number; readonly limitBytes: number; readonly stepBytes: number };
  readonly error: { readonly code: string; readonly message: string } | null;
  readonly createdAt: number;
  readonly takenAt: number | null;
  readonly history?: ReadonlyArray<{ readonly type: string; readonly time: number; readonly [k: string]: unknown }>;
}

/** A backup in progress (present once the daemon tracks them). */
export interface StatusBackup {
  readonly id: string | number;
  readonly snapshot?: string;
  readonly dir: string;
  readonly bytesDone: number;
  readonly bytesTotal: number;
  readonly startedAt?: number;
}

/** The whole model. */
export interface StatusModel {
  readonly nbd: NbdServerAddress;
  readonly devices: readonly StatusDevice[];
  readonly snapshots: readonly StatusSnapshot[];
  readonly backups?: readonly StatusBackup[];
}
