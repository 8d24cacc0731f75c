import {
  BlkStatus,
  copyFromBioVecs,
  copyToBioVecs,
  ReqFlag,
  ReqOp,
  SECTOR_SIZE,
  type BackendCapabilities,
  type Bio,
  type BlockBackend,
  type CompletionSink,
} from '@blkfilter/bio';
import type { Chance, OpClock } from './power-cut.js';

interface DeviceWrite {
  /** Op number when the write reached the device (issued: it may be on stable storage from then). */
  readonly issued: number;
  /** Op number of its completion (a FUA write is durable from then). */
  done: number;
  readonly fua: boolean;
  readonly offset: number;
  /** Null for a discard or write-zeroes (reads zeros). */
  readonly data: Buffer | null;
  readonly length: number;
}

const CAPABILITIES: BackendCapabilities = Object.freeze({ writeCache: true, discard: true, writeZeroes: true });

/**
 * A disk in memory with a volatile write cache, recording every write and flush with the shared
 * {@link OpClock}: {@link crashImage} rebuilds what a power cut at any op could leave (writes
 * made durable by a completed FLUSH or FUA kept; any subset of the others). Completions come
 * on a later turn, so bios overlap as they would on a real device.
 */
export class PowerCutDevice implements BlockBackend {
  readonly description = 'power-cut recording memory';
  readonly readOnly = false;
  readonly minIoSize = SECTOR_SIZE;
  readonly capabilities = CAPABILITIES;
  readonly sizeBytes: number;
  private readonly clock: OpClock;
  private readonly initial: Buffer;
  private readonly current: Buffer;
  private readonly writes: DeviceWrite[] = [];
  /** [issued, done] op numbers of completed flushes. */
  private readonly flushes: Array<[number, number]> = [];

  constructor(clock: OpClock, initial: Buffer) {
    this.clock = clock;
    this.initial = Buffer.from(initial);
    this.current = Buffer.from(initial);
    this.sizeBytes = initial.length;
  }

  queueBio(bio: Bio, sink: CompletionSink): void {
    const offset = bio.sector * SECTOR_SIZE;
    const op = bio.op;
    if (op === ReqOp.READ) {
      copyToBioVecs(bio.vecs, 0, this.current, offset, bio.size);
      setImmediate(() => sink.complete(bio, BlkStatus.OK));
      return;
    }
    if (op === ReqOp.FLUSH) {
      const issued = this.clock.tick();
      setImmediate(() => {
        this.flushes.push([issued, this.clock.tick()]);
        sink.complete(bio, BlkStatus.OK);
      });
      return;
    }
    let data: Buffer | null = null;
    if (op === ReqOp.WRITE) {
      data = Buffer.allocUnsafe(bio.size);
      copyFromBioVecs(bio.vecs, 0, data, 0, bio.size);
      data.copy(this.current, offset);
    } else {
      this.current.fill(0, offset, offset + bio.size);
    }
    const w: DeviceWrite = { issued: this.clock.tick(), done: Infinity, fua: (bio.flags & ReqFlag.FUA) !== 0, offset, data, length: bio.size };
    this.writes.push(w);
    setImmediate(() => {
      w.done = this.clock.tick();
      sink.complete(bio, BlkStatus.OK);
    });
  }

  /** The device's content now (every write applied). */
  content(): Buffer {
    return Buffer.from(this.current);
  }

  /**
   * What a power cut just before op `cut` could leave: writes issued before it, each kept if a
   * FUA completion or a flush issued after its completion (and completed before the cut) made
   * it durable, else kept or lost by `chance`, sector by sector.
   */
  crashImage(cut: number, chance: Chance): Buffer {
    const out = Buffer.from(this.initial);
    for (const w of this.writes) {
      if (w.issued >= cut) continue;
      const durable = (w.fua && w.done < cut) || this.flushes.some(([issued, done]) => issued > w.done && done < cut);
      for (let i = 0; i < w.length; i += SECTOR_SIZE) {
        if (!durable && chance() < 0.5) continue;
        if (w.data === null) out.fill(0, w.offset + i, w.offset + i + SECTOR_SIZE);
        else w.data.copy(out, w.offset + i, i, i + SECTOR_SIZE);
      }
    }
    return out;
  }

  async close(): Promise<void> {}
}
