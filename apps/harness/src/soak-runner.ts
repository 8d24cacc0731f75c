// The soak runner: round-robins through the scenarios until time is up, one bounded step at a
// time, and between steps (when everything is quiescent) checks what must hold for the whole
// process: every bio completed exactly once, no device, snapshot, descriptor, socket or heap
// left growing. Usable in-process (tests) and from the `soak` command.
import fs from 'node:fs';
import { Worker } from 'node:worker_threads';
import { bioDebugTracker, disableBioDebug, enableBioDebug, type BioTracker } from '@blkfilter/bio';
import { listSnapshots } from '@blkfilter/snapshot';
import { biosStep } from './soak-bios.js';
import { cbtStep } from './soak-cbt.js';
import { deviceCount, KNOWN_BUGS, StepContext, type InjectedBug, type ScenarioStats, type StepLimits } from './soak-context.js';
import { faultsStep } from './soak-faults.js';
import { nbdStep } from './soak-nbd.js';
import { powerCutStep } from './soak-power-cut.js';
import { fileStep } from './soak-file.js';
import { snapshotsStep } from './soak-snapshots.js';
import { deriveSeed, fdCount, sleep, SoakFailure } from './soak-util.js';

/** The scenarios, in the order the runner takes them. */
export const SOAK_SCENARIOS = {
  bios: biosStep,
  faults: faultsStep,
  snapshots: snapshotsStep,
  cbt: cbtStep,
  nbd: nbdStep,
  'power-cut': powerCutStep,
  file: fileStep,
} as const satisfies Record<string, (ctx: StepContext) => Promise<void>>;

/** A scenario's name. */
export type SoakScenario = keyof typeof SOAK_SCENARIOS;

/** Options of {@link runSoak}. */
export interface SoakOptions {
  /** Run for about this long (default 30); each scenario runs at least one step whatever it is. */
  readonly seconds?: number;
  /** The seed every random choice derives from (default: random, and printed). */
  readonly seed?: number;
  /** Only these scenarios (default: all). */
  readonly scenarios?: readonly SoakScenario[];
  /** Run only step `step` of the (single) scenario: how a failure is replayed. */
  readonly step?: number;
  /** Length of one step in milliseconds (default: from `seconds`, 500 to 3000). */
  readonly stepMs?: number;
  /** Operations per worker per step (default 2000). */
  readonly opsPerWorker?: number;
  /** A bio not completed after this long fails the run (default 15000: longer than a freeze may wait). */
  readonly bioTimeoutMs?: number;
  /** Freeze timeout for filter changes (default 10000). */
  readonly freezeTimeoutMs?: number;
  /** Most growth of the heap over its baseline, after a GC, in MiB (default 256). */
  readonly heapGrowthMb?: number;
  /** Open descriptors allowed over the baseline between steps (default 8). */
  readonly fdSlack?: number;
  /** Also do what triggers the known, unfixed package bugs (`KNOWN_BUGS`; default false). */
  readonly knownBugs?: boolean;
  /** Plant a bug, to check that the soak notices it. */
  readonly injectBug?: InjectedBug | null;
  /** Record the stack of every bio completion (slower; says where a double completion began). */
  readonly captureStacks?: boolean;
  /**
   * Timing faults a seed alone does not replay: a busy thread competes for the CPU the whole
   * run, and memory disks complete a random third of their bios a little later. Found the
   * snapshot destroy race that a plain replay of its seed passed.
   */
  readonly stress?: boolean;
  /** Progress lines (default: none). */
  readonly log?: (line: string) => void;
}

/** A broken invariant, with what is needed to replay it. */
export interface SoakFailureReport {
  readonly scenario: string;
  readonly step: number;
  readonly phase: string;
  readonly seed: number;
  readonly message: string;
  /** The command that replays this step (run in apps/harness). */
  readonly replay: string;
}

/** What {@link runSoak} returns (and the command prints as JSON). */
export interface SoakSummary {
  readonly ok: boolean;
  readonly seed: number;
  readonly seconds: number;
  readonly steps: number;
  /** Bios submitted, all layers (bio debug tracker). */
  readonly bios: number;
  readonly checks: number;
  readonly scenarios: Record<string, ScenarioStats>;
  readonly failures: SoakFailureReport[];
  readonly heap: { readonly gc: boolean; readonly baselineMb: number; readonly maxMb: number; readonly limitMb: number };
  readonly fds: { readonly baseline: number; readonly max: number };
  readonly devices: { readonly baseline: number };
  /** Known package bugs whose triggers this run avoided (empty with `knownBugs`). */
  readonly knownBugsAvoided: string[];
}

const MiB = 1 << 20;

function socketHandles(): number {
  return process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap' || r === 'TCPServerWrap' || r === 'PipeWrap').length;
}

function heapMb(): number {
  globalThis.gc?.();
  return Math.round((process.memoryUsage().heapUsed / MiB) * 10) / 10;
}

/** The command that replays `scenario` step `step` of the run with `seed`. */
export function replayCommand(seed: number, scenario: string, step: number, limits: StepLimits): string {
  const extra = `${limits.injectBug !== null ? ` --inject-bug ${limits.injectBug}` : ''}${limits.knownBugs ? ' --known-bugs' : ''}${limits.stress ? ' --stress' : ''}`;
  return `node --expose-gc dist/soak.js --seed ${seed} --scenario ${scenario} --step ${step}${extra}`;
}

async function waitFor(cond: () => boolean, ms: number): Promise<boolean> {
  const until = Date.now() + ms;
  while (!cond()) {
    if (Date.now() >= until) return false;
    await sleep(10);
  }
  return true;
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new SoakFailure(`${what} did not finish within ${ms} ms (hung)`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Runs the soak: scenarios in turn, each step bounded in time and operations and seeded from
 * `seed`, scenario and step number, until `seconds` have passed (every scenario runs at least
 * once). Stops at the first broken invariant. Turns bio debug mode on for the run (and off
 * after, if it was off). Listens for uncaught exceptions and unhandled rejections while it runs:
 * any is a failure (a bio completed twice throws from wherever the second completion happened).
 */
export async function runSoak(options: SoakOptions = {}): Promise<SoakSummary> {
  const seconds = options.seconds ?? 30;
  const seed = (options.seed ?? Math.floor(Math.random() * 0x7fffffff)) >>> 0;
  const names = [...(options.scenarios ?? (Object.keys(SOAK_SCENARIOS) as SoakScenario[]))];
  if (options.step !== undefined && names.length !== 1) throw new SoakFailure('--step replays one step of one scenario: give exactly one --scenario');
  const injectBug = options.injectBug ?? null;
  const log = options.log ?? (() => {});
  const limits: StepLimits = {
    bioTimeoutMs: options.bioTimeoutMs ?? 15_000,
    freezeTimeoutMs: options.freezeTimeoutMs ?? 10_000,
    opsPerWorker: options.opsPerWorker ?? 2000,
    injectBug,
    knownBugs: options.knownBugs ?? false,
    stress: options.stress ?? false,
  };
  const stepMs = options.stepMs ?? Math.min(3000, Math.max(500, (seconds * 1000) / (2 * names.length)));
  const heapLimitMb = options.heapGrowthMb ?? 256;
  const fdSlack = options.fdSlack ?? 8;

  const hadTracker = bioDebugTracker() !== null;
  const tracker: BioTracker = enableBioDebug({ captureStacks: options.captureStacks ?? false });
  const uncaught: string[] = [];
  const onUncaught = (err: unknown): void => {
    uncaught.push(err instanceof Error ? (err.stack ?? err.message) : String(err));
  };
  process.on('uncaughtException', onUncaught);
  process.on('unhandledRejection', onUncaught);
  // CPU contention: a thread that never sleeps, as another busy process on a 2-core machine.
  const burner = limits.stress ? new Worker('for (;;) {}', { eval: true }) : null;
  // Slow file system: opens and truncates answer 0-4 ms late (diff storage steps, CBT state).
  const restoreFs = limits.stress ? slowFileSystem(deriveSeed(seed, 'fs', 0)) : null;

  const stats: Record<string, ScenarioStats> = {};
  for (const n of names) stats[n] = { steps: 0, ops: 0, bios: 0, checks: 0, failures: 0, counts: {} };
  const failures: SoakFailureReport[] = [];
  const baseDevices = deviceCount();
  const baseFds = fdCount();
  const baseSockets = socketHandles();
  const baseHeap = heapMb();
  let maxHeap = baseHeap;
  let maxFds = baseFds;
  let steps = 0;
  const started = Date.now();
  const end = started + seconds * 1000;
  const stepOf: Record<string, number> = {};

  try {
    for (let k = 0; ; k++) {
      const single = options.step !== undefined;
      if (single ? k > 0 : Date.now() >= end && k >= names.length) break;
      const scenario = names[k % names.length] as SoakScenario;
      const step = single ? (options.step as number) : (stepOf[scenario] = (stepOf[scenario] ?? -1) + 1);
      const stepSeed = deriveSeed(seed, scenario, step);
      const s = stats[scenario] as ScenarioStats;
      const deadline = Date.now() + Math.max(300, Math.min(stepMs, end - Date.now()));
      const ctx = new StepContext(scenario, step, stepSeed, deadline, limits, s);
      const biosBefore = tracker.submitted;
      const checksBefore = s.checks;
      log(`soak: ${scenario} step ${step} (seed ${stepSeed})`);
      let error: unknown = null;
      try {
        await withTimeout(SOAK_SCENARIOS[scenario](ctx), stepMs + 60_000, `${scenario} step ${step}`);
        ctx.phase = 'end of step';
        ctx.checkViolations();
      } catch (err) {
        error = err;
      }
      ctx.failed = error !== null;
      ctx.phase = error === null ? 'cleanup' : ctx.phase;
      const cleanupErrors = await withTimeout(ctx.cleanup(), 30_000, `cleanup of ${scenario} step ${step}`).catch((e: unknown) => [e]);
      if (error === null && cleanupErrors.length > 0) {
        ctx.phase = 'cleanup';
        error = cleanupErrors[0];
      }
      if (error === null) {
        try {
          ctx.phase = 'invariants between steps';
          await checkQuiescent(ctx, tracker, uncaught, { baseDevices, baseFds, fdSlack, baseSockets, baseHeap, heapLimitMb });
          maxHeap = Math.max(maxHeap, heapMb());
          maxFds = Math.max(maxFds, fdCount());
        } catch (err) {
          error = err;
        }
      }
      s.steps++;
      s.bios += tracker.submitted - biosBefore;
      steps++;
      if (error !== null) {
        s.failures++;
        failures.push(report(ctx, error, tracker, uncaught, seed, limits));
        break;
      }
      log(`soak: ${scenario} step ${step} ok: ${tracker.submitted - biosBefore} bios, ${s.checks - checksBefore} checks`);
    }
  } finally {
    process.removeListener('uncaughtException', onUncaught);
    process.removeListener('unhandledRejection', onUncaught);
    if (!hadTracker) disableBioDebug();
    await burner?.terminate();
    restoreFs?.();
  }
  return {
    ok: failures.length === 0,
    seed,
    seconds: Math.round((Date.now() - started) / 100) / 10,
    steps,
    bios: tracker.submitted,
    checks: Object.values(stats).reduce((n, s) => n + s.checks, 0),
    scenarios: stats,
    failures,
    heap: { gc: typeof globalThis.gc === 'function', baselineMb: baseHeap, maxMb: maxHeap, limitMb: baseHeap + heapLimitMb },
    fds: { baseline: baseFds, max: maxFds },
    devices: { baseline: baseDevices },
    knownBugsAvoided: limits.knownBugs ? [] : Object.keys(KNOWN_BUGS),
  };
}

/**
 * Makes `fs.open` and `fs.ftruncate` (callback forms) answer a little late, at random: what a
 * loaded machine's file system does, and what a seed alone cannot replay. Returns the undo.
 */
function slowFileSystem(seed: number): () => void {
  const original = { open: fs.open, ftruncate: fs.ftruncate };
  let x = seed >>> 0 || 1;
  const delay = (): number => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % 5;
  };
  const late =
    <A extends unknown[]>(fn: (...args: A) => void) =>
    (...args: A): void => {
      const cb = args[args.length - 1];
      if (typeof cb !== 'function') {
        fn(...args);
        return;
      }
      const ms = delay();
      args[args.length - 1] = (...r: unknown[]) => setTimeout(() => (cb as (...r: unknown[]) => void)(...r), ms);
      fn(...args);
    };
  const mutable = fs as unknown as Record<string, unknown>;
  mutable.open = late(original.open as (...a: unknown[]) => void);
  mutable.ftruncate = late(original.ftruncate as (...a: unknown[]) => void);
  return () => {
    mutable.open = original.open;
    mutable.ftruncate = original.ftruncate;
  };
}

interface Baselines {
  readonly baseDevices: number;
  readonly baseFds: number;
  readonly fdSlack: number;
  readonly baseSockets: number;
  readonly baseHeap: number;
  readonly heapLimitMb: number;
}

/** The invariants that hold for the whole process once a step has ended and cleaned up. */
async function checkQuiescent(ctx: StepContext, tracker: BioTracker, uncaught: string[], b: Baselines): Promise<void> {
  ctx.check(uncaught.length === 0, () => `uncaught error: ${uncaught[0]}`);
  // Timers of deferred completions may still be due: give them a moment, then insist.
  await waitFor(() => tracker.inFlight === 0, 1000);
  ctx.stats.checks++;
  tracker.assertAllCompleted();
  ctx.check(deviceCount() === b.baseDevices, () => `${deviceCount()} block devices are registered after cleanup; the baseline is ${b.baseDevices}`);
  ctx.check(listSnapshots().length === 0, () => `${listSnapshots().length} snapshot(s) still live after cleanup`);
  if (b.baseFds >= 0) {
    await waitFor(() => fdCount() <= b.baseFds + b.fdSlack, 2000);
    ctx.check(fdCount() <= b.baseFds + b.fdSlack, () => `${fdCount()} file descriptors open after cleanup; the baseline is ${b.baseFds} (+${b.fdSlack} allowed)`);
  }
  await waitFor(() => socketHandles() <= b.baseSockets, 2000);
  ctx.check(socketHandles() <= b.baseSockets, () => `${socketHandles()} socket handles open after cleanup; the baseline is ${b.baseSockets}`);
  const heap = heapMb();
  ctx.check(heap <= b.baseHeap + b.heapLimitMb, () => `heap is ${heap} MiB after GC; the bound is ${b.baseHeap} + ${b.heapLimitMb} MiB`);
  ctx.check(uncaught.length === 0, () => `uncaught error: ${uncaught[0]}`);
}

function report(ctx: StepContext, error: unknown, tracker: BioTracker, uncaught: string[], seed: number, limits: StepLimits): SoakFailureReport {
  let message = error instanceof Error ? (error instanceof SoakFailure ? error.message : `${error.name}: ${error.message}`) : String(error);
  if (uncaught.length > 0 && !message.includes(uncaught[0] as string)) message += `\nuncaught error: ${uncaught[0]}`;
  // What never completed is the most useful fact about most failures: say it every time.
  if (tracker.inFlight > 0) {
    try {
      tracker.assertAllCompleted();
    } catch (e) {
      if (!message.includes((e as Error).message)) message += `\n${(e as Error).message}`;
    }
  }
  if (!(error instanceof SoakFailure) && error instanceof Error && error.stack !== undefined) message += `\n${error.stack.split('\n').slice(1, 6).join('\n')}`;
  return { scenario: ctx.scenario, step: ctx.step, phase: ctx.phase, seed, message, replay: replayCommand(seed, ctx.scenario, ctx.step, limits) };
}
