// Payload buffers by power-of-two size class, shared by every connection of a process. A fresh
// 1 MiB Buffer per request costs several times the copy itself (INTEROP.md), so READ and WRITE
// payloads come from here and go back when the request is done. The pool is bounded in bytes:
// it never holds more than MAX_POOLED_BYTES, whatever the connections do.
//
// Buffers are made by `allocIoBuffer`, page aligned (4096): an O_DIRECT export then reads into
// and writes from them as they are, with no bounce. Every size class is a power of two of at
// least 4096 bytes, so a payload at offset 0 is aligned in address and in length up to the
// size class; the allocation (a native call and a memset) is paid once per pooled buffer.

import { allocIoBuffer } from '@blkfilter/bio';

const MIN_SHIFT = 12; // 4 KiB
const MAX_SHIFT = 25; // 32 MiB
const MAX_POOLED_BYTES = 64 * 1024 * 1024;
const MAX_PER_CLASS = 64;
/** Address alignment of pooled buffers: a page, what O_DIRECT needs on 512e and 4Kn disks. */
const IO_ALIGNMENT = 4096;

const classes: Buffer[][] = [];
for (let s = 0; s <= MAX_SHIFT; s++) classes.push([]);
let pooledBytes = 0;
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
    return buf;
  }
  return allocIoBuffer(1 << shift, IO_ALIGNMENT);
}

/** Gives back a buffer from {@link getPayloadBuffer}; no reference to it may be kept. */
export function putPayloadBuffer(buf: Buffer): void {
  lent--;
  const size = buf.length;
  if (size < 1 << MIN_SHIFT || size > 1 << MAX_SHIFT || (size & (size - 1)) !== 0) return;
  if (pooledBytes + size > MAX_POOLED_BYTES) return;
  const free = classes[classOf(size)] as Buffer[];
  if (free.length >= MAX_PER_CLASS) return;
  free.push(buf);
  pooledBytes += size;
}

/** Buffers handed out and not given back yet (for tests: a leak or a double put shows here). */
export function lentPayloadBuffers(): number {
  return lent;
}

/** Bytes currently held by the pool (for tests). */
export function pooledPayloadBytes(): number {
  return pooledBytes;
}
