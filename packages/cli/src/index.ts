export { startDaemon, defaultControlPath } from './daemon.js';
export type { DaemonOptions, Daemon } from './daemon.js';
export { callControl, startControlServer, ControlError } from './control.js';
export type { ControlMethod } from './control.js';
export { buildProgram, main, ExitCode } from './cli.js';
