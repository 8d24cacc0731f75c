// Small filters the soak attaches, detaches and reorders under load: one that passes everything
// (two copies, so there is something to reorder), one that takes bios and resubmits them later
// with `next.submit`, and one that plants a bug (drops a write) to prove the checks catch it.
import type { Bio } from '@blkfilter/bio';
import { FILTER_API_VERSION, FilterVerdict, listRegisteredFilters, registerFilter, type FilterInstance, type FilterNext } from '@blkfilter/registry';
import { Rng } from './soak-util.js';

/** A filter that sees every op and passes it. */
export const PASS_FILTER = 'soak-pass';
/** A second pass-through filter, so a stack can hold two and swap their order. */
export const PASS_FILTER_B = 'soak-pass-b';
/** A filter that takes some bios and resubmits them below itself a little later. */
export const DEFER_FILTER = 'soak-defer';
/** Test only: takes the first WRITE it sees and never completes it (a planted bug). */
export const DROP_WRITE_FILTER = 'soak-drop-write';

/** Options of the {@link DEFER_FILTER} filter. */
export interface DeferFilterOptions {
  /** Seed of the filter's own decisions. */
  readonly seed: number;
  /** Probability that a bio is taken. */
  readonly probability: number;
  /** Taken bios are resubmitted after 0 (next macrotask) to this many milliseconds. */
  readonly maxDelayMs: number;
  /** Told when the filter is detached while it still holds bios: the freeze should have drained them. */
  readonly onViolation: (message: string) => void;
}

const passOps = (): FilterInstance => {
  const pass = (): FilterVerdict => FilterVerdict.PASS;
  return { read: pass, write: pass, flush: pass, discard: pass, writeZeroes: pass };
};

function deferInstance(ctxName: string, options: DeferFilterOptions): FilterInstance {
  const rng = new Rng(options.seed);
  const held = new Set<Bio>();
  let detached = false;
  const take = (bio: Bio, next: FilterNext): FilterVerdict => {
    if (!rng.chance(options.probability)) return FilterVerdict.PASS;
    held.add(bio);
    const resubmit = (): void => {
      held.delete(bio);
      if (detached) options.onViolation(`filter ${DEFER_FILTER} on "${ctxName}" resubmitted a bio after it was detached`);
      next.submit(bio);
    };
    const delay = rng.int(options.maxDelayMs + 1);
    if (delay === 0) setImmediate(resubmit);
    else setTimeout(resubmit, delay);
    return FilterVerdict.TAKEN;
  };
  return {
    read: take,
    write: take,
    flush: take,
    discard: take,
    writeZeroes: take,
    detach() {
      detached = true;
      if (held.size > 0) {
        const first = [...held][0] as Bio;
        options.onViolation(
          `filter ${DEFER_FILTER} was detached from "${ctxName}" while it still held ${held.size} bio(s) (first: op ${first.op} at sector ${first.sector} of "${first.bdev.name}", submitted to "${first.acctBdev?.name ?? '?'}"): the freeze should have drained them`,
        );
      }
    },
  };
}

/** Registers the soak's filters with the registry (once per process). */
export function registerSoakFilters(): void {
  const have = new Set(listRegisteredFilters().map((f) => f.name));
  const define = (name: string, attach: Parameters<typeof registerFilter>[0]['attach']): void => {
    if (!have.has(name)) registerFilter({ name, apiVersion: FILTER_API_VERSION, description: 'blkfilter soak test filter', attach });
  };
  define(PASS_FILTER, passOps);
  define(PASS_FILTER_B, passOps);
  define(DEFER_FILTER, (ctx, options) => deferInstance(ctx.bdev.name, options as DeferFilterOptions));
  define(DROP_WRITE_FILTER, () => {
    let dropped = false;
    return {
      write: () => {
        if (dropped) return FilterVerdict.PASS;
        dropped = true;
        return FilterVerdict.TAKEN; // and never completed: the planted bug
      },
    };
  });
}
