// Wire constants of the NBD protocol, as named in NetworkBlockDevice/nbd doc/proto.md. Every
// number here is big-endian on the wire. 64-bit magics are split into two 32-bit halves so the
// hot path never needs a BigInt.

/** The IANA port for NBD. */
export const NBD_DEFAULT_PORT = 10809;

/** Largest READ/WRITE payload we serve and advertise (2^25, as qemu-nbd and the spec's default). */
export const NBD_MAX_PAYLOAD = 32 * 1024 * 1024;

/** Longest string (export name, description, context name, error message) on the wire. */
export const NBD_MAX_STRING = 4096;

/** Most descriptors in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (the spec's SHOULD NOT exceed). */
export const NBD_MAX_EXTENTS = 1 << 20;

/** `NBDMAGIC`, first 8 bytes the server sends. */
export const NBD_INIT_MAGIC_HI = 0x4e42444d;
/** Low half of `NBDMAGIC`. */
export const NBD_INIT_MAGIC_LO = 0x41474943;
/** `IHAVEOPT`: newstyle handshake magic and option request magic (high half). */
export const NBD_OPTS_MAGIC_HI = 0x49484156;
/** Low half of `IHAVEOPT`. */
export const NBD_OPTS_MAGIC_LO = 0x454f5054;
/** `0x3e889045565a9`: option reply magic (high half). */
export const NBD_REP_MAGIC_HI = 0x0003e889;
/** Low half of the option reply magic. */
export const NBD_REP_MAGIC_LO = 0x045565a9;
/** Magic of a transmission request. */
export const NBD_REQUEST_MAGIC = 0x25609513;
/** Magic of a simple reply. */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
/** Magic of a structured reply chunk. */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Size of a transmission request header. */
export const NBD_REQUEST_SIZE = 28;
/** Size of a simple reply header. */
export const NBD_SIMPLE_REPLY_SIZE = 16;
/** Size of a structured reply chunk header. */
export const NBD_STRUCTURED_REPLY_SIZE = 20;

/** Handshake flags the server sends after `IHAVEOPT`. */
export const NbdHandshakeFlag = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** Client flags, the client's answer to the handshake flags. */
export const NbdClientFlag = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** Transmission flags of an export (`NBD_FLAG_*`). */
export const NbdTransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

/** Option types of the handshake (`NBD_OPT_*`). */
export const NbdOpt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const ERR = 0x80000000;

/** Option reply types (`NBD_REP_*`); errors have bit 31 set. */
export const NbdRep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: ERR + 1,
  ERR_POLICY: ERR + 2,
  ERR_INVALID: ERR + 3,
  ERR_PLATFORM: ERR + 4,
  ERR_TLS_REQD: ERR + 5,
  ERR_UNKNOWN: ERR + 6,
  ERR_SHUTDOWN: ERR + 7,
  ERR_BLOCK_SIZE_REQD: ERR + 8,
  ERR_TOO_BIG: ERR + 9,
} as const;

/** Information types of `NBD_REP_INFO` (`NBD_INFO_*`). */
export const NbdInfo = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** Transmission commands (`NBD_CMD_*`). */
export const NbdCmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

/** Command flags (`NBD_CMD_FLAG_*`). */
export const NbdCmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

/** Structured reply flags. */
export const NbdReplyFlag = {
  DONE: 1 << 0,
} as const;

/** Structured reply chunk types (`NBD_REPLY_TYPE_*`); error chunks have bit 15 set. */
export const NbdReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const;

/** Error values of replies (`NBD_E*`): a fixed subset of Linux errno numbers. */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** One of the numbers in {@link NbdErrno}. */
export type NbdErrno = (typeof NbdErrno)[keyof typeof NbdErrno];

/** Flags of a `base:allocation` extent. */
export const NbdAllocationFlag = {
  HOLE: 1 << 0,
  ZERO: 1 << 1,
} as const;

/** Flag of a `qemu:dirty-bitmap:<name>` extent: the range changed. */
export const NBD_STATE_DIRTY = 1;

/** The `base:allocation` metadata context. */
export const BASE_ALLOCATION = 'base:allocation';
/** qemu's context for how deep in a backing chain each extent lives (`qemu-nbd -A`). */
export const QEMU_ALLOCATION_DEPTH = 'qemu:allocation-depth';
/** Prefix of qemu's dirty-bitmap contexts: `qemu:dirty-bitmap:<name>`. */
export const QEMU_DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';

const ERRNO_NAMES: Record<number, string> = {};
for (const [name, value] of Object.entries(NbdErrno)) ERRNO_NAMES[value] = name;

/** `'EIO'` for 5; `'E<n>'` for a number the protocol does not define. */
export function nbdErrnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `E${errno}`;
}

const CMD_NAMES: Record<number, string> = {};
for (const [name, value] of Object.entries(NbdCmd)) CMD_NAMES[value] = name;

/** `'WRITE'` for `NbdCmd.WRITE`; `'CMD(<n>)'` for an unknown command. */
export function nbdCmdName(cmd: number): string {
  return CMD_NAMES[cmd] ?? `CMD(${cmd})`;
}

const OPT_NAMES: Record<number, string> = {};
for (const [name, value] of Object.entries(NbdOpt)) OPT_NAMES[value] = name;

/** `'GO'` for `NbdOpt.GO`; `'OPT(<n>)'` for an unknown option. */
export function nbdOptName(opt: number): string {
  return OPT_NAMES[opt] ?? `OPT(${opt})`;
}

const REP_NAMES: Record<number, string> = {};
for (const [name, value] of Object.entries(NbdRep)) REP_NAMES[value] = name;

/** `'ERR_UNKNOWN'` for `NbdRep.ERR_UNKNOWN`; `'REP(<n>)'` otherwise. */
export function nbdRepName(rep: number): string {
  return REP_NAMES[rep] ?? `REP(0x${rep.toString(16)})`;
}
