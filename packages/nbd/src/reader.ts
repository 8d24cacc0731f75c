/**
 * The bytes of a connection not parsed yet: one growable buffer per connection, compacted in
 * place, so headers are parsed where they lie and nothing is allocated per message. Parsers
 * read `buf` between `start` and `end` and call {@link ByteReader.consume} for what they used.
 *
 * Connections feed socket chunks straight to their parser when this reader is empty and push
 * only the unparsed tail here, so in the common case a chunk is never copied twice.
 */
export class ByteReader {
  buf: Buffer;
  start = 0;
  end = 0;
  private readonly initialSize: number;

  constructor(initialSize = 64 * 1024) {
    this.initialSize = initialSize;
    // Only the bytes between start and end are ever read, and they are always copied in first.
    this.buf = Buffer.allocUnsafe(initialSize);
  }

  /** Bytes held. */
  get length(): number {
    return this.end - this.start;
  }

  /** Appends `chunk`, compacting or growing (2x) the buffer as needed. */
  push(chunk: Uint8Array): void {
    const n = chunk.length;
    if (n === 0) return;
    if (this.end + n > this.buf.length) {
      const live = this.end - this.start;
      if (live + n <= this.buf.length) {
        // Enough room once the parsed prefix is dropped (Buffer#copy moves overlapping ranges safely).
        this.buf.copy(this.buf, 0, this.start, this.end);
      } else {
        let size = this.buf.length * 2;
        while (size < live + n) size *= 2;
        const next = Buffer.allocUnsafe(size);
        this.buf.copy(next, 0, this.start, this.end);
        this.buf = next;
      }
      this.start = 0;
      this.end = live;
    }
    this.buf.set(chunk, this.end);
    this.end += n;
  }

  /** Marks everything before `pos` as parsed. */
  consumeTo(pos: number): void {
    this.start = pos;
    if (this.start >= this.end) this.clear();
  }

  /** Drops every byte held; a buffer that grew for a large message shrinks back. */
  clear(): void {
    this.start = 0;
    this.end = 0;
    if (this.buf.length > this.initialSize * 4) this.buf = Buffer.allocUnsafe(this.initialSize);
  }
}

/** Reads an unsigned 64-bit big-endian number; exact up to 2^53, larger values are rounded. */
export function readU64(buf: Uint8Array, pos: number): number {
  const b = buf as Buffer;
  return b.readUInt32BE(pos) * 0x100000000 + b.readUInt32BE(pos + 4);
}

/** Writes `value` (0..2^53) as an unsigned 64-bit big-endian number. */
export function writeU64(buf: Buffer, value: number, pos: number): void {
  const hi = Math.floor(value / 0x100000000);
  buf.writeUInt32BE(hi >>> 0, pos);
  buf.writeUInt32BE((value - hi * 0x100000000) >>> 0, pos + 4);
}
