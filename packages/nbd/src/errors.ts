import { BlkError } from '@blkfilter/bio';
import { nbdErrnoName, nbdOptName, nbdRepName } from './protocol.js';

/**
 * The peer broke the NBD protocol (bad magic, impossible lengths, a reply to a request never
 * sent). The connection is closed; `code` is `EPROTO`.
 */
export class NbdProtocolError extends BlkError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('EPROTO', message, options);
  }
}

/**
 * The server refused an option during the handshake. `reply` is the `NBD_REP_ERR_*` number,
 * `option` the `NBD_OPT_*` it answered; the message carries the server's own text.
 */
export class NbdOptionError extends BlkError {
  readonly option: number;
  readonly reply: number;

  constructor(option: number, reply: number, serverMessage: string) {
    super(
      'EPROTO',
      `NBD server refused ${nbdOptName(option)} with ${nbdRepName(reply)}${serverMessage ? `: ${serverMessage}` : ''}`,
    );
    this.option = option;
    this.reply = reply;
  }
}

/** The server has no export of the requested name (`NBD_REP_ERR_UNKNOWN`); `code` is `ENOENT`. */
export class NbdExportNotFoundError extends BlkError {
  readonly exportName: string;

  constructor(exportName: string, serverMessage: string) {
    super(
      'ENOENT',
      `NBD server has no export named ${JSON.stringify(exportName)}${serverMessage ? ` (${serverMessage})` : ''}; list them with \`nbdinfo --list\``,
    );
    this.exportName = exportName;
  }
}

/**
 * The connection to the NBD server failed or was lost; bios in flight complete with IOERR and
 * this error. `code` is the socket's code when known (`ECONNREFUSED`, `ECONNRESET`), else `ENOTCONN`.
 */
export class NbdConnectionError extends BlkError {
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/**
 * The server answered a request with an error. `nbdErrno` is the wire value (`NbdErrno`);
 * `code` its name (`EIO`, `ENOSPC`, ...).
 */
export class NbdRequestError extends BlkError {
  readonly nbdErrno: number;

  constructor(nbdErrno: number, message: string) {
    super(nbdErrnoName(nbdErrno), message);
    this.nbdErrno = nbdErrno;
  }
}
