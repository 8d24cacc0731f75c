export {
  FILTER_API_VERSION,
  FILTER_API_MIN_VERSION,
  OPS_BY_API_VERSION,
  FilterVerdict,
} from './api.js';
export type {
  FilterNext,
  FilterOpHandler,
  FilterOps,
  FilterCtlHandler,
  FilterInstance,
  FilterContext,
  FilterDefinition,
  FilterEvent,
  AttachedFilterInfo,
} from './api.js';
export { FilterEventType } from './events.js';
export type { SectorRange, SnapshotTakenData, RangesChangedData } from './events.js';
export {
  FilterNotFoundError,
  FilterAlreadyAttachedError,
  FilterBusyError,
  FilterApiVersionError,
  FilterExistsError,
  UnknownCtlCommandError,
  FreezeTimeoutError,
  DeviceFrozenError,
} from './errors.js';
export {
  DEFAULT_FREEZE_TIMEOUT_MS,
  registerFilter,
  unregisterFilter,
  listRegisteredFilters,
  attachFilter,
  detachFilter,
  setFilterAltitude,
  listFilters,
  filterCtl,
  onFilterEvent,
  withFrozenDevices,
} from './registry.js';
export type { AttachOptions } from './registry.js';
