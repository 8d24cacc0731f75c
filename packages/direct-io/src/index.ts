export { DirectHandle, openDirect } from './direct.js';
export type { DirectOptions, DirectStats } from './direct.js';
export { MisalignedIoError, HandleClosedError } from './errors.js';
