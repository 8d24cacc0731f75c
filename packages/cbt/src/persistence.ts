import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { bioEndioError, BlkStatus, BlkError, type Bio } from '@blkfilter/bio';
import type { FilterNext } from '@blkfilter/registry';
import { CbtStateError } from './errors.js';
import { CbtJournal, markBothRecord, markRecord, newGenerationRecord, replayJournal, takeRecord, type JournalOwner } from './journal.js';
import type { CbtMapState } from './map-state.js';
import { replaceFileAtomic, type CbtStateIo } from './state-io.js';
import { encodeState, readStateFile, type CbtState } from './state.js';
import { CbtGenerationReason } from './types.js';

/** A write waiting for the mark of its blocks to be durable (the rare path: first touch). */
class MarkWaiter {
  /** Null for a NOWAIT write that was answered AGAIN: only its mark waits. */
  readonly bio: Bio | null;
  readonly next: FilterNext;
  readonly first: number;
  readonly end: number;
  /** The generation serial its record was made in; a take or reset since means: mark again. */
  serial: number;
  /** The commit that carries its record. */
  batch: number;

  constructor(bio: Bio | null, next: FilterNext, first: number, end: number, serial: number, batch: number) {
    this.bio = bio;
    this.next = next;
    this.first = first;
    this.end = end;
    this.serial = serial;
    this.batch = batch;
  }
}

/** What loading found, for `cbtInfo().generationReason` and its detail. */
export interface LoadOutcome {
  readonly reason: CbtGenerationReason;
  readonly detail: string | null;
}

/** Default journal size past which a checkpoint replaces it. */
const DEFAULT_CHECKPOINT_BYTES = 4 * 1024 * 1024;

/**
 * Crash-safe persistence of one CBT map: a checkpoint (the state file) plus a journal of the
 * marks made since. A write's first touch of a block in a generation waits until its mark is
 * durable (group commit) before it goes down, so the state on disk always covers what may be
 * on disk; writes to blocks already marked pass with no cost. Takes, new generations and
 * marks made outside the bio stream are journaled too; queries wait for them to be durable.
 */
export class CbtPersistence implements JournalOwner {
  readonly stateFile: string;
  readonly journalFile: string;
  private readonly io: CbtStateIo;
  private readonly s: CbtMapState;
  private readonly startSect: number;
  private readonly device: string;
  private readonly checkpointBytes: number;
  private journal: CbtJournal | null;
  private epoch: number;
  /** Bumped at every take and new generation: a waiter's record from before is stale. */
  private serial: number;
  private waiters: MarkWaiter[];
  private checkpointing: Promise<void> | null;
  /** Set when the state on disk could be behind and could not be invalidated: writes fail. */
  private poisoned: BlkError | null;
  /** Set when persistence stopped (state invalidated after an I/O error): the map is in memory only. */
  private stopped: BlkError | null;

  constructor(io: CbtStateIo, stateFile: string, state: CbtMapState, startSect: number, device: string, checkpointBytes?: number) {
    this.io = io;
    this.stateFile = stateFile;
    this.journalFile = `${stateFile}.journal`;
    this.s = state;
    this.startSect = startSect;
    this.device = device;
    this.checkpointBytes = checkpointBytes ?? DEFAULT_CHECKPOINT_BYTES;
    this.journal = null;
    this.epoch = 0;
    this.serial = 0;
    this.waiters = [];
    this.checkpointing = null;
    this.poisoned = null;
    this.stopped = null;
  }

  /** Why persistence stopped, or null while the state on disk is kept exact. */
  get problem(): BlkError | null {
    return this.poisoned ?? this.stopped;
  }

  /**
   * Rebuilds the map from the checkpoint and its journal into the state (which the caller made
   * as a new generation for the device's geometry). On anything unusable the state stays new
   * and the outcome says why. `geometryMatches` tells whether the rebuilt map fits the device.
   */
  async load(fresh: () => void, geometryMatches: () => boolean): Promise<LoadOutcome> {
    const cp = await readStateFile(this.io, this.stateFile);
    if ('problem' in cp) {
      return cp.problem === 'missing'
        ? { reason: CbtGenerationReason.NEW, detail: null }
        : { reason: CbtGenerationReason.STATE_INVALID, detail: `state file "${this.stateFile}": ${cp.detail}` };
    }
    this.epoch = cp.epoch;
    if (!cp.clean && cp.version === 1) {
      return { reason: CbtGenerationReason.UNCLEAN_SHUTDOWN, detail: `state file "${this.stateFile}" was written by a version without a journal and never saved cleanly` };
    }
    this.adopt(cp);
    let reason: CbtGenerationReason = CbtGenerationReason.RESUMED;
    let detail: string | null = null;
    if (!cp.clean) {
      let jbuf: Buffer | null;
      try {
        jbuf = await this.io.readFile(this.journalFile);
      } catch (err) {
        fresh();
        return { reason: CbtGenerationReason.STATE_INVALID, detail: `journal "${this.journalFile}" is unreadable (${String(err)})` };
      }
      reason = CbtGenerationReason.RESUMED_AFTER_CRASH;
      if (jbuf !== null) {
        const r = replayJournal(jbuf, cp.epoch, this.s);
        if (r.kind === 'damaged') {
          fresh();
          return { reason: CbtGenerationReason.STATE_INVALID, detail: `${r.detail} ("${this.journalFile}")` };
        }
        detail = r.kind === 'replayed' ? `replayed ${r.records} record(s) in ${r.frames} commit(s) of the journal` : 'the journal was older than the checkpoint';
      } else {
        detail = 'no journal: the checkpoint alone is complete';
      }
    }
    if (!geometryMatches()) {
      fresh();
      return { reason: CbtGenerationReason.GEOMETRY_CHANGED, detail: `state file "${this.stateFile}" is for another geometry` };
    }
    return { reason, detail };
  }

  private adopt(cp: CbtState): void {
    const s = this.s;
    s.newGeneration(CbtGenerationReason.RESUMED, cp.generationId, { blockSize: cp.blockSize, blockCount: cp.blockCount }, cp.capacity);
    s.map = cp.map;
    s.readMap = cp.readMap;
    s.active = cp.changesNumber;
    s.snapNumber = cp.snapNumber;
    s.snapGenerationId = cp.snapGenerationId;
  }

  /** Starts the live state: a dirty checkpoint of the map as it is, and an empty journal. */
  async start(): Promise<void> {
    try {
      await this.writeCheckpoint(false);
      this.journal = await CbtJournal.create(this.io, this.journalFile, this.epoch, this);
    } catch (err) {
      throw new CbtStateError(
        `cannot start the CBT state of "${this.device}" in "${this.stateFile}" (${String(err)}); without it a crash would go unnoticed. Make its directory writable, choose another stateFile, or pass stateFile: false`,
        { cause: err },
      );
    }
  }

  private async writeCheckpoint(clean: boolean): Promise<void> {
    const s = this.s;
    const hasRead = s.snapNumber > 0 && s.readMap !== null;
    this.epoch++;
    // Encoded before the first await: the map may change while the file is written.
    const data = encodeState({
      blockSize: s.blockSize,
      blockCount: s.blockCount,
      capacity: s.capacity,
      startSect: this.startSect,
      generationId: s.generationId,
      changesNumber: s.active,
      snapNumber: hasRead ? s.snapNumber : 0,
      snapGenerationId: hasRead ? s.snapGenerationId : null,
      clean,
      epoch: this.epoch,
      version: 2,
      map: s.map,
      readMap: hasRead ? s.readMap : null,
    });
    await replaceFileAtomic(this.io, this.stateFile, data, randomUUID().slice(0, 8));
  }

  // --- the data path ------------------------------------------------------------------------------

  /**
   * A write touches blocks `[first, end)` not all marked in the active generation: record the
   * mark and hold the bio until it is durable. Returns false when the bio must not wait (NOWAIT:
   * completed with AGAIN, the mark still goes to the journal so a retry passes).
   */
  holdWrite(bio: Bio, next: FilterNext, first: number, end: number, nowait: boolean): void {
    if (this.poisoned !== null) {
      bioEndioError(bio, BlkStatus.IOERR, this.poisoned);
      return;
    }
    const j = this.journal;
    if (this.stopped !== null || j === null) {
      this.s.markBlocks(first, end, this.s.active);
      next.submit(bio);
      return;
    }
    const batch = j.nextBatch;
    j.append(markRecord(first, end, this.s.active));
    if (nowait) {
      // The mark is applied at its commit all the same, so a retry then passes.
      this.waiters.push(new MarkWaiter(null, next, first, end, this.serial, batch));
      bioEndioError(bio, BlkStatus.AGAIN, new BlkError('EAGAIN', `NOWAIT write to "${this.device}" must wait for its changed-block mark to be durable; retry`));
      return;
    }
    this.waiters.push(new MarkWaiter(bio, next, first, end, this.serial, batch));
  }

  /** A take happened (already applied to the map). */
  recordTake(snapshotId: string | null, overflowId: string): void {
    this.serial++;
    this.journal?.append(takeRecord(snapshotId, overflowId));
  }

  /** A new generation began (already applied to the map). */
  recordNewGeneration(): void {
    this.serial++;
    const s = this.s;
    this.journal?.append(newGenerationRecord(s.reason, s.generationId, s.blockSize, s.blockCount, s.capacity));
  }

  /** Blocks marked in both maps outside the bio stream (already applied to the maps). */
  recordMarkBoth(first: number, end: number): void {
    this.journal?.append(markBothRecord(first, end));
  }

  /** Resolves when everything recorded so far is durable (or persistence stopped); rejects when poisoned. */
  async sync(): Promise<void> {
    for (;;) {
      if (this.poisoned !== null) throw this.poisoned;
      if (this.checkpointing !== null) {
        await this.checkpointing;
        continue;
      }
      const j = this.journal;
      if (j === null || this.stopped !== null) return;
      if (!j.busy && j.pendingCount === 0) return;
      // A broken journal is handled by failed(): persistence stops, the loop then returns.
      await j.idle().catch(() => {});
    }
  }

  committed(batch: number): void {
    const s = this.s;
    const keep: MarkWaiter[] = [];
    const ready: MarkWaiter[] = [];
    for (const w of this.waiters) {
      if (w.batch > batch) keep.push(w);
      else if (w.serial === this.serial) {
        s.markBlocks(w.first, w.end, s.active);
        ready.push(w);
      } else {
        // A take or reset came between the record and now: the mark belongs to the new generation.
        const j = this.journal as CbtJournal;
        w.batch = j.nextBatch;
        w.serial = this.serial;
        j.append(markRecord(w.first, w.end, s.active));
        keep.push(w);
      }
    }
    this.waiters = keep;
    for (const w of ready) if (w.bio !== null) w.next.submit(w.bio);
    if (this.checkpointing === null && (this.journal?.size ?? 0) > this.checkpointBytes) this.checkpointing = this.checkpoint();
  }

  failed(err: Error): void {
    void this.invalidate(err);
  }

  /**
   * The journal could not be written: the state on disk may be behind what goes to the device.
   * Remove it (a missing state starts a new generation: honest), then let the held writes go on
   * with the map kept in memory; if it cannot even be removed, fail writes rather than lie.
   */
  private async invalidate(err: Error): Promise<void> {
    if (this.stopped !== null || this.poisoned !== null) return;
    const cause = new CbtStateError(
      `the CBT journal of "${this.device}" ("${this.journalFile}") could not be written (${err.message}); the state files were removed, so the next attach starts a new generation`,
      { cause: err },
    );
    this.stopped = cause;
    try {
      await this.io.unlink(this.stateFile);
      await this.io.unlink(this.journalFile);
      await this.io.syncDir(path.dirname(this.stateFile));
    } catch (err2) {
      this.stopped = null;
      this.poisoned = new CbtStateError(
        `the CBT state of "${this.device}" could not be written (${err.message}) nor removed (${String(err2)}): writes are refused so that the stale state is never trusted. Fix "${path.dirname(this.stateFile)}" and reattach CBT`,
        { cause: err2 },
      );
    }
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) {
      if (w.bio === null) this.s.markBlocks(w.first, w.end, this.s.active);
      else if (this.poisoned !== null) bioEndioError(w.bio, BlkStatus.IOERR, this.poisoned);
      else {
        this.s.markBlocks(w.first, w.end, this.s.active);
        w.next.submit(w.bio);
      }
    }
  }

  /**
   * Replaces a journal grown past its bound: a checkpoint of the map as it is now (which holds
   * the effect of every record but the pending first-touch marks, whose writes have not gone
   * down), then an empty journal of the next epoch, into which the pending records move.
   */
  private async checkpoint(): Promise<void> {
    const old = this.journal as CbtJournal;
    old.pause();
    try {
      // Takes, new generations and both-map marks are applied at once and are in the
      // checkpoint; first-touch marks are applied at commit and are re-recorded below.
      old.takePending();
      const written = this.writeCheckpoint(false);
      await written;
      const fresh = await CbtJournal.create(this.io, this.journalFile, this.epoch, this, old.batchCount);
      for (const r of old.takePending()) fresh.append(r);
      fresh.pause();
      this.journal = fresh;
      await old.close();
      for (const w of this.waiters) {
        w.batch = fresh.nextBatch;
        w.serial = this.serial;
        fresh.append(markRecord(w.first, w.end, this.s.active));
      }
      this.checkpointing = null;
      fresh.resume();
    } catch (err) {
      this.checkpointing = null;
      await this.invalidate(err instanceof Error ? err : new Error(String(err)));
    }
  }

  /**
   * Detach: everything durable, then (when `clean`) a clean checkpoint and no journal, so the
   * next attach resumes without replay. Throws when the state could not be saved.
   */
  async close(clean: boolean): Promise<void> {
    await this.sync();
    const j = this.journal;
    this.journal = null;
    if (j !== null) await j.close();
    if (this.stopped !== null) throw this.stopped;
    if (!clean) return;
    await this.writeCheckpoint(true);
    await this.io.unlink(this.journalFile);
    await this.io.syncDir(path.dirname(this.stateFile));
  }

  /** Rewrites the checkpoint as not clean, with the map as it is now (a change came in during a clean save). */
  async saveDirty(): Promise<void> {
    await this.writeCheckpoint(false);
  }
}
