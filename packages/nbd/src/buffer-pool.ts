// Payload buffers by power-of-two size class, shared by every connection of a process. A fresh
// 1 MiB Buffer per request costs several times the copy itself (INTEROP.md), so READ and WRITE
// payloads come from here and go back when the request is done. The pool is bounded in bytes:
// it never holds more than its bound (64 MiB, or the largest server cap), whatever the connections do, and it gives memory
// back when the load goes: a buffer that sat unused in the pool for a whole trim interval is
// dropped (a low-water mark per size class, checked by an unref'd timer that runs only while
// the pool holds something), so an idle daemon does not keep its busiest moment's buffers.
//
// Buffers are made by `allocIoBuffer`, page aligned (4096): an O_DIRECT export then reads into
// and writes from them as they are, with no bounce. Every size class is a power of two of at
// least 4096 bytes, so a payload at offset 0 is aligned in address and in length up to the
// size class; the allocation (a native call and a memset) is paid once per pooled buffer.

import { allocIoBuffer } from '@blkfilter/bio';

const MIN_SHIFT = 12; // 4 KiB
const MAX_SHIFT = 25; // 32 MiB
/**
 * Default bound on the bytes the pool holds. The pool only ever holds buffers that were lent, so
 * with a bound above what is in flight at its peak it never drops one, and the buffers that exist
 * stay at that peak. A bound below it churns: a server at its buffer cap (`maxBufferedBytes`,
 * default 48 MiB) swings between most of it in flight and most of it given back, every swing
 * dropped buffers to the garbage collector and allocated new ones, and RSS under 4 x QD32 of
 * 1 MiB writes went to +196 MiB above idle with a 32 MiB bound, against +50 MiB with 64 MiB.
 * Servers with a larger cap raise it ({@link raisePoolLimit}).
 */
const DEFAULT_POOLED_BYTES = 64 * 1024 * 1024;
let maxPooledBytes = DEFAULT_POOLED_BYTES;
/** How often buffers unused since the last look are dropped. */
const TRIM_MS = 2_000;
const MAX_PER_CLASS = 64;
/** Address alignment of pooled buffers: a page, what O_DIRECT needs on 512e and 4Kn disks. */
const IO_ALIGNMENT = 4096;

const classes: Buffer[][] = [];
/** Per size class: the fewest free buffers seen since the last trim (those were not needed). */
const lowWater: number[] = [];
for (let s = 0; s <= MAX_SHIFT; s++) {
  classes.push([]);
  lowWater.push(0);
}
let pooledBytes = 0;
let trimTimer: NodeJS.Timeout | null = null;
/** Buffers handed out by getPayloadBuffer and not given back yet (a leak shows here). */
let lent = 0;

function classOf(size: number): number {
  let shift = MIN_SHIFT;
  while (1 << shift < size) shift++;
  return shift;
}

/**
 * A page-aligned buffer of at least `size` bytes (its `length` is the size class). Its contents
 * are undefined: callers fill every byte they later read. Sizes above 32 MiB are allocated
 * unpooled.
 */
export function getPayloadBuffer(size: number): Buffer {
  lent++;
  if (size > 1 << MAX_SHIFT) return allocIoBuffer(size, IO_ALIGNMENT);
  const shift = classOf(size);
  const free = classes[shift] as Buffer[];
  const buf = free.pop();
  if (buf !== undefined) {
    pooledBytes -= buf.length;
    if (free.length < (lowWater[shift] as number)) lowWater[shift] = free.length;
    return buf;
  }
  return allocIoBuffer(1 << shift, IO_ALIGNMENT);
}

/** Gives back a buffer from {@link getPayloadBuffer}; no reference to it may be kept. */
export function putPayloadBuffer(buf: Buffer): void {
  lent--;
  const size = buf.length;
  if (size < 1 << MIN_SHIFT || size > 1 << MAX_SHIFT || (size & (size - 1)) !== 0) return;
  if (pooledBytes + size > maxPooledBytes) return;
  const free = classes[classOf(size)] as Buffer[];
  if (free.length >= MAX_PER_CLASS) return;
  free.push(buf);
  pooledBytes += size;
  if (trimTimer === null) {
    trimTimer = setInterval(trimPayloadPool, TRIM_MS);
    trimTimer.unref();
  }
}

/**
 * Gives up a buffer from {@link getPayloadBuffer} without pooling it: something outside may
 * still write into it (a socket reading into a dropped WRITE's payload).
 */
export function forgetPayloadBuffer(_buf: Buffer): void {
  lent--;
}

/**
 * Lets the pool hold up to `bytes` (never less than before): a server whose buffer cap is
 * larger than the default bound calls it, so its swings do not churn buffers.
 */
export function raisePoolLimit(bytes: number): void {
  if (bytes > maxPooledBytes) maxPooledBytes = bytes;
}

/** The most bytes the pool holds (for tests). */
export function poolLimit(): number {
  return maxPooledBytes;
}

/** The bytes a request of `size` holds: the size class {@link getPayloadBuffer} hands out. */
export function payloadBufferBytes(size: number): number {
  return size > 1 << MAX_SHIFT ? size : 1 << classOf(size);
}

/**
 * Drops the pooled buffers that were not needed since the last trim (the timer calls it every
 * TRIM_MS; tests call it directly). Returns the bytes dropped.
 */
export function trimPayloadPool(): number {
  let dropped = 0;
  for (let s = MIN_SHIFT; s <= MAX_SHIFT; s++) {
    const free = classes[s] as Buffer[];
    // The oldest (bottom) buffers go; the most recently returned stay on top.
    const n = Math.min(lowWater[s] as number, free.length);
    if (n > 0) {
      free.splice(0, n);
      dropped += n << s;
    }
    lowWater[s] = free.length;
  }
  pooledBytes -= dropped;
  if (pooledBytes === 0 && trimTimer !== null) {
    clearInterval(trimTimer);
    trimTimer = null;
  }
  return dropped;
}

/** Buffers handed out and not given back yet (for tests: a leak or a double put shows here). */
export function lentPayloadBuffers(): number {
  return lent;
}

/** Bytes currently held by the pool (for tests). */
export function pooledPayloadBytes(): number {
  return pooledBytes;
}
