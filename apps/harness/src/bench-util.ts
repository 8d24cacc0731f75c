import { Bio, BioVec, SECTOR_SIZE, submitBio, type BlockBackend, type CompletionSink, type Disk, type ReqOp } from '@blkfilter/bio';
import type { Bench } from 'tinybench';

/** One compared case: our path and its baseline, in operations and bytes per second. */
export interface CaseResult {
  readonly name: string;
  readonly blockSize: number;
  readonly queueDepth: number;
  readonly ours: Measure;
  readonly baseline: Measure & { readonly what: string };
  /** ours / baseline throughput: 1.0 means no cost over the baseline. */
  readonly ratio: number;
  /** The ratio this case should reach (an issue's goal), drawn on the report's chart. */
  readonly goal?: number;
}

export interface Measure {
  /** Median over the rounds. */
  readonly opsPerSec: number;
  /** Slowest round (equal to the median with one round). */
  readonly minOpsPerSec?: number;
  readonly mbPerSec: number;
  /** Relative margin of error of the mean batch time, in percent (tinybench). */
  readonly rmePercent: number;
  /**
   * CPU seconds (user + system, all threads) the server process spent per 100,000 requests,
   * median over the rounds, with the least and most (NBD and direct-io file cases; fio's own
   * figure for its baseline).
   */
  readonly cpuSecPer100k?: number;
  readonly cpuSecPer100kRange?: readonly [number, number];
}

/**
 * Starts `submit(i, slot, done)` for i in [0, total) keeping `qd` in flight; resolves when all
 * are done. Completions that arrive synchronously inside `submit` are trampolined through a
 * loop (as submitBio does), so a synchronous backend cannot grow the stack on either side.
 */
export function runAtDepth(total: number, qd: number, submit: (i: number, slot: number, done: (slot: number) => void) => void): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    let next = 0;
    let finished = 0;
    let inSubmit = false;
    const ready: number[] = [];
    const pump = (): void => {
      inSubmit = true;
      try {
        while (ready.length > 0 && next < total) submit(next++, ready.pop() as number, done);
      } catch (err) {
        reject(err);
      }
      inSubmit = false;
    };
    const done = (slot: number): void => {
      finished++;
      if (finished === total) {
        resolve();
        return;
      }
      ready.push(slot);
      if (!inSubmit) pump();
    };
    for (let s = 0; s < qd; s++) ready.push(s);
    pump();
  });
}

/**
 * Runs `rounds` interleaved rounds of both tasks on fresh tinybench instances and returns the
 * median of each side's per-round throughput.
 */
export async function compare(
  makeBench: () => Bench,
  name: string,
  blockSize: number,
  queueDepth: number,
  batch: number,
  ours: () => Promise<void>,
  baselineWhat: string,
  baseline: () => Promise<void>,
  rounds = 3,
): Promise<CaseResult> {
  // tinybench calls a task once more to find out whether it is async, overlapping a real
  // iteration; the tasks reuse pooled bios, so each side is serialised on its own chain.
  ours = serialised(ours);
  baseline = serialised(baseline);
  const o: Array<[number, number]> = [];
  const b: Array<[number, number]> = [];
  for (let r = 0; r < rounds; r++) {
    const bench = makeBench();
    // Alternate which goes first, so drift of the machine does not favour one side.
    if (r % 2 === 0) bench.add('ours', ours).add('baseline', baseline);
    else bench.add('baseline', baseline).add('ours', ours);
    await bench.run();
    for (const task of bench.tasks) {
      const res = task.result;
      if (res.state !== 'completed') throw new Error(`bench ${name}/${task.name} did not complete: ${res.state}`);
      const opsPerSec = (batch * 1000) / res.latency.mean;
      (task.name === 'ours' ? o : b).push([opsPerSec, res.latency.rme]);
    }
  }
  const med = (xs: Array<[number, number]>): Measure => {
    const sorted = [...xs].sort((x, y) => x[0] - y[0]);
    const [ops, rme] = sorted[Math.floor(sorted.length / 2)] as [number, number];
    return {
      opsPerSec: Math.round(ops),
      minOpsPerSec: Math.round((sorted[0] as [number, number])[0]),
      mbPerSec: Math.round((ops * blockSize) / 1e6),
      rmePercent: Math.round(rme * 10) / 10,
    };
  };
  const ourM = med(o);
  const baseM = med(b);
  return {
    name,
    blockSize,
    queueDepth,
    ours: ourM,
    baseline: { ...baseM, what: baselineWhat },
    ratio: Math.round((ourM.opsPerSec / baseM.opsPerSec) * 1000) / 1000,
  };
}

function serialised(fn: () => Promise<void>): () => Promise<void> {
  let chain: Promise<void> = Promise.resolve();
  return () => (chain = chain.then(fn));
}

/** Deterministic pseudo-random block numbers (xorshift), so both sides do the same I/O. */
export function randomBlocks(n: number, blocks: number, seed = 12345): Uint32Array {
  const out = new Uint32Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = (x >>> 0) % blocks;
  }
  return out;
}

/**
 * A task that runs `order.length` bios of `op` and `bs` bytes (block `order[i]`) at depth `qd`
 * on `disk`, from a pool of `qd` bios reused with `reset()` (no allocation per I/O): through
 * `submitBio`, or straight into `backend.queueBio` (the bare-backend baseline).
 */
export function pooledBioTask(disk: Disk, op: ReqOp, bs: number, qd: number, order: Uint32Array, backend?: BlockBackend): () => Promise<void> {
  const bios = Array.from({ length: qd }, () => new Bio(op, disk.part0, 0, bs, [new BioVec(Buffer.alloc(bs, 0xa5))]));
  const vecs = bios.map((b) => b.vecs);
  const slotDone: Array<(slot: number) => void> = new Array(qd);
  const finish = (bio: Bio): void => (slotDone[bio.private as number] as (slot: number) => void)(bio.private as number);
  const sink: CompletionSink = { complete: finish };
  return () =>
    runAtDepth(order.length, qd, (i, slot, done) => {
      const bio = (bios[slot] as Bio).reset(op, disk.part0, ((order[i] as number) * bs) / SECTOR_SIZE, bs, vecs[slot]);
      bio.private = slot;
      slotDone[slot] = done;
      if (backend === undefined) {
        bio.endIo = finish;
        submitBio(bio);
      } else {
        backend.queueBio(bio, sink);
      }
    });
}
