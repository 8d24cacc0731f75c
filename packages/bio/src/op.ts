/**
 * Request operations, numbered as the kernel's `enum req_op`: the direction is the low bit
 * (odd = data flows to the device), so {@link opIsWrite} is one AND.
 */
export const ReqOp = {
  READ: 0,
  WRITE: 1,
  FLUSH: 2,
  DISCARD: 3,
  WRITE_ZEROES: 9,
} as const;

/** One of the numbers in {@link ReqOp}. */
export type ReqOp = (typeof ReqOp)[keyof typeof ReqOp];

/** Request flags, a bitmask on `Bio.flags` (the kernel's `REQ_*` modifiers). */
export const ReqFlag = {
  /** Synchronous: someone waits for it (latency over throughput). */
  SYNC: 1 << 0,
  /** Forced unit access: the data is on stable media when the bio completes. */
  FUA: 1 << 1,
  /** Flush the volatile cache before this bio's data is written. */
  PREFLUSH: 1 << 2,
  /** Do not block: complete with `BlkStatus.AGAIN` where the bio would have to wait. */
  NOWAIT: 1 << 3,
  /** Completion is reaped by polling the queue named by the bio's cookie. */
  POLLED: 1 << 4,
  /** WRITE_ZEROES must not deallocate (the kernel's `REQ_NOUNMAP`). */
  NOUNMAP: 1 << 5,
  /** Metadata I/O (partition tables, diff-storage headers). */
  META: 1 << 6,
  /**
   * Swap I/O (the kernel's `REQ_SWAP`): completing it may be what frees memory, so whoever
   * handles it must not wait for memory that needs I/O (see `memallocNoioSave`).
   */
  SWAP: 1 << 7,
} as const;

/** One flag of {@link ReqFlag}; `Bio.flags` holds any OR of them. */
export type ReqFlag = (typeof ReqFlag)[keyof typeof ReqFlag];

/** Every defined flag bit, for validation. */
export const REQ_FLAG_MASK: number = Object.values(ReqFlag).reduce((m, f) => m | f, 0);

/** True for ops whose data flows to the device (WRITE, DISCARD, WRITE_ZEROES). */
export function opIsWrite(op: number): boolean {
  return (op & 1) === 1;
}

/** True for ops that carry a data payload (READ, WRITE). */
export function opHasData(op: number): boolean {
  return op === ReqOp.READ || op === ReqOp.WRITE;
}

/** True for ops that change what the device returns for a range (WRITE, DISCARD, WRITE_ZEROES). */
export function opChangesData(op: number): boolean {
  return op === ReqOp.WRITE || op === ReqOp.DISCARD || op === ReqOp.WRITE_ZEROES;
}

const OP_NAMES: Record<number, string> = {
  [ReqOp.READ]: 'READ',
  [ReqOp.WRITE]: 'WRITE',
  [ReqOp.FLUSH]: 'FLUSH',
  [ReqOp.DISCARD]: 'DISCARD',
  [ReqOp.WRITE_ZEROES]: 'WRITE_ZEROES',
};

/** `'WRITE'` for `ReqOp.WRITE`; `'OP(42)'` for a number that is not an op. */
export function opName(op: number): string {
  return OP_NAMES[op] ?? `OP(${op})`;
}

/** True when `op` is one of the numbers in {@link ReqOp}. */
export function isReqOp(op: number): op is ReqOp {
  return OP_NAMES[op] !== undefined;
}

/** `'FUA|SYNC'` for those flags; `''` for none. */
export function flagNames(flags: number): string {
  const names: string[] = [];
  for (const [name, bit] of Object.entries(ReqFlag)) if ((flags & bit) !== 0) names.push(name);
  return names.join('|');
}
