// Payload buffers by power-of-two size class, shared by every connection of a process. A fresh
// 1 MiB Buffer per request costs several times the copy itself (INTEROP.md), so READ and WRITE
// payloads come from here and go back when the request is done. The pool is bounded in bytes:
// it never holds more than MAX_POOLED_BYTES, whatever the connections do.

const MIN_SHIFT = 12; // 4 KiB
const MAX_SHIFT = 25; // 32 MiB
const MAX_POOLED_BYTES = 64 * 1024 * 1024;
const MAX_PER_CLASS = 64;

const classes: Buffer[][] = [];
for (let s = 0; s <= MAX_SHIFT; s++) classes.push([]);
let pooledBytes = 0;

function classOf(size: number): number {
  let shift = MIN_SHIFT;
  while (1 << shift < size) shift++;
  return shift;
}

/**
 * A buffer of at least `size` bytes (its `length` is the size class). Its contents are
 * undefined: callers fill every byte they later read. Sizes above 32 MiB are allocated unpooled.
 */
export function getPayloadBuffer(size: number): Buffer {
  if (size > 1 << MAX_SHIFT) return Buffer.allocUnsafeSlow(size);
  const shift = classOf(size);
  const free = classes[shift] as Buffer[];
  const buf = free.pop();
  if (buf !== undefined) {
    pooledBytes -= buf.length;
    return buf;
  }
  return Buffer.allocUnsafeSlow(1 << shift);
}

/** Gives back a buffer from {@link getPayloadBuffer}; no reference to it may be kept. */
export function putPayloadBuffer(buf: Buffer): void {
  const size = buf.length;
  if (size < 1 << MIN_SHIFT || size > 1 << MAX_SHIFT || (size & (size - 1)) !== 0) return;
  if (pooledBytes + size > MAX_POOLED_BYTES) return;
  const free = classes[classOf(size)] as Buffer[];
  if (free.length >= MAX_PER_CLASS) return;
  free.push(buf);
  pooledBytes += size;
}

/** Bytes currently held by the pool (for tests). */
export function pooledPayloadBytes(): number {
  return pooledBytes;
}
