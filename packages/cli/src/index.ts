export { startDaemon, defaultControlPath } from './daemon.js';
export type { DaemonOptions, Daemon } from './daemon.js';
export { callControl, startControlServer, ControlError } from './control.js';
export type { ControlMethod } from './control.js';
export { buildProgram, main, ExitCode } from './cli.js';
export { connectExport, disconnectDevice, listConnections, findConnection, connectPrerequisites, mountsOf, ConnectError } from './connect.js';
export type { Connection, ConnectionStatus, ConnectMethod, ConnectOptions } from './connect.js';
export { withFrozenFilesystems, FreezeError } from './freeze.js';
export type { FreezeOptions, FrozenResult } from './freeze.js';
