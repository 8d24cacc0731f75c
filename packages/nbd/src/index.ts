export {
  NBD_DEFAULT_PORT,
  NBD_MAX_PAYLOAD,
  NBD_MAX_STRING,
  NBD_MAX_EXTENTS,
  NBD_STATE_DIRTY,
  BASE_ALLOCATION,
  QEMU_DIRTY_BITMAP_PREFIX,
  NbdHandshakeFlag,
  NbdClientFlag,
  NbdTransmissionFlag,
  NbdOpt,
  NbdRep,
  NbdInfo,
  NbdCmd,
  NbdCmdFlag,
  NbdReplyFlag,
  NbdReplyType,
  NbdErrno,
  NbdAllocationFlag,
  nbdErrnoName,
  nbdCmdName,
  nbdOptName,
  nbdRepName,
} from './protocol.js';
export { NbdProtocolError, NbdOptionError, NbdExportNotFoundError, NbdConnectionError, NbdRequestError } from './errors.js';
export type { NbdExportConfig, NbdBitmapConfig, AllocationDepthSource } from './exports.js';
export { NbdServer, createNbdServer } from './server.js';
export type { NbdServerOptions, NbdServerTlsOptions, NbdListenOptions, NbdServerAddress, NbdServerLog } from './server.js';
export { NbdClientBackend } from './client.js';
export type { NbdClientOptions, NbdBlockSizes, NbdClientTlsOptions, NbdClientState, NbdClientStatus } from './client.js';
export { parseNbdUri, isNbdUri } from './uri.js';
export type { NbdUri } from './uri.js';
