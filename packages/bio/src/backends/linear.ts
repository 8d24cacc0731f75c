import type { BackendCapabilities, BlockBackend, BlockStatusExtent } from '../backend.js';
import { bioClone, SECTOR_SIZE, type Bio, type CompletionSink } from '../bio.js';
import type { BlockDev } from '../device.js';
import { InvalidArgumentError } from '../errors.js';
import { submitBio } from '../submit.js';

/** Options of {@link LinearBackend}. */
export interface LinearBackendOptions {
  /** First sector of the range on the target (default 0). */
  readonly startSect?: number;
  /** Length in sectors (default: the rest of the target). */
  readonly nrSects?: number;
}

/**
 * A device that maps its sectors linearly onto a range of another device (device-mapper's
 * `linear` target): each bio is cloned, shifted and submitted to the target, so the target's
 * filters see it. Stacks of any depth are safe: submission and completion both run in loops.
 */
export class LinearBackend implements BlockBackend {
  readonly description: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly minIoSize: number;
  readonly capabilities: BackendCapabilities;
  readonly target: BlockDev;
  readonly startSect: number;

  constructor(target: BlockDev, options: LinearBackendOptions = {}) {
    const start = options.startSect ?? 0;
    const nr = options.nrSects ?? target.nrSects - start;
    if (!Number.isSafeInteger(start) || start < 0 || !Number.isSafeInteger(nr) || nr <= 0 || start + nr > target.nrSects) {
      throw new InvalidArgumentError(`linear range ${start} + ${nr} sectors does not fit in "${target.name}" (${target.nrSects} sectors)`);
    }
    const lbsSectors = target.disk.limits.logicalBlockSize / SECTOR_SIZE;
    if (start % lbsSectors !== 0 || nr % lbsSectors !== 0) {
      throw new InvalidArgumentError(`linear range ${start} + ${nr} sectors is not aligned to the ${target.disk.limits.logicalBlockSize}-byte blocks of "${target.name}"`);
    }
    this.target = target;
    this.startSect = start;
    this.sizeBytes = nr * SECTOR_SIZE;
    this.readOnly = target.readOnly;
    this.minIoSize = target.disk.limits.logicalBlockSize;
    const limits = target.disk.limits;
    this.capabilities = Object.freeze({
      writeCache: target.disk.backend.capabilities.writeCache,
      discard: limits.maxDiscardSectors > 0,
      writeZeroes: limits.maxWriteZeroesSectors > 0,
    });
    this.description = `linear:${target.name}+${start}`;
  }

  queueBio(bio: Bio, sink: CompletionSink): void {
    void sink; // completion goes back through bio.hwq, which dispatch set to this sink
    const clone = bioClone(bio, this.target);
    clone.sector = bio.sector + this.startSect;
    clone.private = bio;
    clone.endIo = linearEndIo;
    submitBio(clone);
  }

  /**
   * The target's allocation for the same bytes, shifted by `startSect` (and the target's own
   * partition start), or null when the target's backend cannot tell or its disk was removed.
   * Filters on the target are not consulted: allocation is a property of the backend. Walks a
   * stack of linear devices in a loop, so any depth is safe. The range was checked by
   * `blkdevBlockStatus` against this device, which fits in the target.
   */
  blockStatus(offset: number, length: number): BlockStatusExtent[] | null {
    return linearBlockStatus(this, offset, length);
  }

  async close(): Promise<void> {}
}

function linearBlockStatus(top: LinearBackend, offset: number, length: number): BlockStatusExtent[] | null {
  let linear = top;
  let pos = offset;
  for (;;) {
    const target = linear.target;
    if (target.disk.removed) return null;
    pos += (linear.startSect + target.startSect) * SECTOR_SIZE;
    const backend = target.disk.backend;
    if (backend instanceof LinearBackend) {
      linear = backend;
      continue;
    }
    if (backend.blockStatus === undefined) return null;
    return length === 0 ? [] : backend.blockStatus(pos, length);
  }
}

function linearEndIo(clone: Bio): void {
  const bio = clone.private as Bio;
  if (clone.error !== null && bio.error === null) bio.error = clone.error;
  (bio.hwq as CompletionSink).complete(bio, clone.status);
}
