export {
  CBT_FILTER_NAME,
  CBT_DEFAULT_ALTITUDE,
  CBT_DEFAULT_BLOCK_SIZE,
  CBT_MAX_DEFAULT_BLOCK_COUNT,
  CBT_MAX_BLOCK_SIZE,
  CBT_MAX_BLOCK_COUNT,
  CBT_MAX_CHANGES_NUMBER,
  CbtGenerationReason,
  FullCopyReason,
} from './types.js';
export type {
  CbtSectorRange,
  CbtOptions,
  CbtInfo,
  CbtMapRange,
  ChangedExtentsQuery,
  ChangedExtentsResult,
} from './types.js';
export { CbtBlockSizeError, CbtStateError, CbtNoSnapshotError } from './errors.js';
export { cbtFilter, registerCbtFilter, cbtInfo, cbtMap, changedExtents, markDirty, resetCbt } from './filter.js';
export { scanExtents } from './tracker.js';
