// What a scenario step gets: its seeded generator, its deadline, counters, checks that fail the
// run with the scenario and step in the message, and cleanups that run even after a failure.
import { createDiskSync, listBlockDevices, MemoryBackend, submitBio, type Bio, type BlockBackend, type BlockDev, type Disk } from '@blkfilter/bio';
import { FaultBackend, writeMbr } from '@blkfilter/bio/testing';
import { detachFilter, listFilters } from '@blkfilter/registry';
import { Rng, runBio, SoakFailure } from './soak-util.js';

/** Bugs the soak can plant in itself, to prove its checks catch them. */
export const InjectedBug = {
  /** A filter on one device takes one WRITE and never completes it. */
  DROP_WRITE: 'drop-write',
} as const;

/** One of the values of {@link InjectedBug}. */
export type InjectedBug = (typeof InjectedBug)[keyof typeof InjectedBug];

/** Counters of one scenario over a run (printed in the JSON summary). */
export interface ScenarioStats {
  steps: number;
  /** Operations the scenario's workers ran (bios they submitted, control calls, NBD requests). */
  ops: number;
  /** Bios the block layer saw during the scenario's steps (every layer: clones, CoW reads, ...). */
  bios: number;
  /** Invariants checked. */
  checks: number;
  failures: number;
  /** Scenario-specific counts (takes, injected faults, garbage connections, ...). */
  counts: Record<string, number>;
}

/** Limits every step obeys. */
export interface StepLimits {
  /** A bio not completed after this long is a failure ("never completed"). */
  readonly bioTimeoutMs: number;
  /** Freeze timeout passed to attach, detach and reorder. */
  readonly freezeTimeoutMs: number;
  /** Most operations per worker per step. */
  readonly opsPerWorker: number;
  readonly injectBug: InjectedBug | null;
  /**
   * Also do what triggers the package bugs the soak has found and that are not fixed yet
   * ({@link KNOWN_BUGS}); by default those triggers are avoided so the soak stays useful.
   */
  readonly knownBugs: boolean;
  /** Stress mode: CPU contention and randomly delayed completions (see `SoakOptions.stress`). */
  readonly stress: boolean;
}

/**
 * Package bugs the soak found, still open: what each breaks, and what the soak avoids doing
 * unless run with `--known-bugs`. Remove an entry (and its avoidance) once the bug is fixed.
 */
export const KNOWN_BUGS: Readonly<Record<string, string>> = {
  // None open. (freeze-misses-parked-bio was fixed in the registry: a parked bio now wakes the freeze.)
};

/** The state of one step of one scenario. */
export class StepContext {
  readonly scenario: string;
  readonly step: number;
  readonly seed: number;
  readonly rng: Rng;
  /** `Date.now()` by which the workers should wrap up (checks may run a little past it). */
  readonly deadline: number;
  readonly limits: StepLimits;
  readonly stats: ScenarioStats;
  /** What the step is doing, for failure messages. */
  phase = 'setup';
  /** Set once the step failed: cleanups then wait less for freezes that may never drain. */
  failed = false;
  private readonly cleanups: Array<() => Promise<void>> = [];
  private readonly violations: string[] = [];

  constructor(scenario: string, step: number, seed: number, deadline: number, limits: StepLimits, stats: ScenarioStats) {
    this.scenario = scenario;
    this.step = step;
    this.seed = seed;
    this.rng = new Rng(seed);
    this.deadline = deadline;
    this.limits = limits;
    this.stats = stats;
  }

  /** A device name unique to this step (steps of one run never collide, even after a failure). */
  name(what: string): string {
    return `soak-${this.scenario}${this.step}-${what}`;
  }

  /** True once the step's deadline has passed. */
  get expired(): boolean {
    return Date.now() >= this.deadline;
  }

  /** Counts one check; fails the step when `ok` is false. */
  check(ok: boolean, message: string | (() => string)): void {
    this.stats.checks++;
    if (!ok) throw new SoakFailure(typeof message === 'string' ? message : message());
  }

  /** Adds `n` to a scenario-specific counter. */
  count(key: string, n = 1): void {
    this.stats.counts[key] = (this.stats.counts[key] ?? 0) + n;
  }

  /**
   * Records a broken invariant seen where throwing cannot reach the step (a filter's detach
   * hook, a timer); the step fails with it at its next {@link StepContext.checkViolations}.
   */
  violation(message: string): void {
    this.violations.push(message);
  }

  /** Fails the step with the violations recorded so far, if any. */
  checkViolations(): void {
    this.stats.checks++;
    if (this.violations.length > 0) throw new SoakFailure(this.violations.join('; '));
  }

  /** Runs `fn` at the end of the step, last registered first, even when the step failed. */
  onCleanup(fn: () => Promise<void>): void {
    this.cleanups.push(fn);
  }

  /** @internal runs the cleanups; returns the errors they threw. */
  async cleanup(): Promise<unknown[]> {
    const errors: unknown[] = [];
    while (this.cleanups.length > 0) {
      const fn = this.cleanups.pop() as () => Promise<void>;
      try {
        await fn();
      } catch (err) {
        errors.push(err);
      }
    }
    return errors;
  }

  /** Submits `bio` (with `submitBio` unless told otherwise) and waits for it, within the bio timeout. */
  bio(bio: Bio, submit: (bio: Bio) => void = submitBio): Promise<Bio> {
    this.stats.ops++;
    return runBio(bio, submit, { timeoutMs: this.limits.bioTimeoutMs });
  }

  /**
   * Runs `workers` concurrently, each calling its function until it returns false, the step's
   * operation budget is spent or the deadline passes. The first failure stops the others and
   * is rethrown once all have stopped (none is left running behind the step's back).
   */
  async runWorkers(workers: ReadonlyArray<(i: number) => Promise<boolean | void>>, opsPerWorker = this.limits.opsPerWorker): Promise<void> {
    let stop = false;
    const results = await Promise.allSettled(
      workers.map(async (work) => {
        for (let i = 0; i < opsPerWorker && !stop && !this.expired; i++) {
          try {
            if ((await work(i)) === false) return;
          } catch (err) {
            stop = true;
            throw err;
          }
        }
      }),
    );
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed !== undefined) throw failed.reason;
  }

  /**
   * A memory disk registered for cleanup: at the end of the step its filters (and those of its
   * partitions) are detached, then it is removed. `backend` wraps the memory backend if given.
   */
  memoryDisk(what: string, sizeBytes: number, wrap?: (inner: MemoryBackend) => BlockBackend): Disk {
    const memory = new MemoryBackend({ sizeBytes });
    const backend = wrap === undefined ? memory : wrap(memory);
    // Stress: a third of the bios complete a little later, at random (seeded), on every disk.
    const stressed = this.limits.stress ? new FaultBackend(backend, { seed: this.rng.u32(), rules: [{ delayMs: this.rng.range(0, 3), probability: 0.33 }] }) : backend;
    return this.disk(what, stressed);
  }

  /** A disk over `backend`, registered for cleanup like {@link StepContext.memoryDisk}. */
  disk(what: string, backend: BlockBackend): Disk {
    const disk = createDiskSync({ name: this.name(what), backend, scanPartitions: false });
    this.onCleanup(() => removeDisk(disk, this.failed ? Math.min(1000, this.limits.freezeTimeoutMs) : this.limits.freezeTimeoutMs));
    return disk;
  }
}

/**
 * Detaches every filter of `disk` and its partitions, then removes it; the disk is removed even
 * when a detach fails (its error is thrown after), so a failed step leaves no device behind.
 */
export async function removeDisk(disk: Disk, timeoutMs: number): Promise<void> {
  let first: unknown = null;
  for (const bdev of [...disk.partitions, disk.part0]) {
    for (const f of listFilters(bdev)) {
      try {
        await detachFilter(bdev, f.name, { timeoutMs });
      } catch (err) {
        first ??= err;
      }
    }
  }
  await disk.remove();
  if (first !== null) throw first;
}

/**
 * Writes an MBR with primary partitions (`[startSector, sectors]`, type 0x83) to sector 0 of
 * `disk` and rescans, so the disk gets its `p1`, `p2`, ... devices as a user's would.
 */
export function partitionMbr(disk: Disk, parts: ReadonlyArray<readonly [number, number]>): Promise<readonly BlockDev[]> {
  return writeMbr(disk, parts);
}

/** How many block devices exist now (disks, partitions, images). */
export function deviceCount(): number {
  return listBlockDevices().length;
}
