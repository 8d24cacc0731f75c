import type { BackendCapabilities, BlockBackend, BlockStatusExtent } from '../backend.js';
import { SECTOR_SIZE, type Bio, type BioVec, type CompletionSink } from '../bio.js';
import { InvalidArgumentError } from '../errors.js';
import { ReqFlag, ReqOp } from '../op.js';
import { BlkStatus } from '../status.js';

/** Options of {@link MemoryBackend}. */
export interface MemoryBackendOptions {
  /** Size in bytes (a multiple of 512). A 1 TiB device costs nothing until written. */
  readonly sizeBytes: number;
  /** Allocation unit in bytes: a power of two from 512 to 1 MiB (default 4096). */
  readonly pageSize?: number;
  /** Most bytes of pages to allocate; past it writes complete with NOSPC (default: no limit). */
  readonly limitBytes?: number;
  /** Refuse writes. */
  readonly readOnly?: boolean;
}

/**
 * A block status query over at most this many pages looks each one up; a longer one walks the
 * sorted allocated page numbers instead, so a query over a 1 TiB device costs what was written.
 */
const STATUS_DIRECT_PAGES = 4096;

const CAPABILITIES: BackendCapabilities = Object.freeze({ writeCache: false, discard: true, writeZeroes: true });

/**
 * A sparse in-memory backend: data lives in pages allocated on first write, so memory grows
 * with what was written, not with the device size. Unwritten, discarded and zeroed ranges read
 * as zeros and hold no memory. Completes every bio synchronously, before `queueBio` returns.
 */
export class MemoryBackend implements BlockBackend {
  readonly description: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly minIoSize = SECTOR_SIZE;
  readonly capabilities = CAPABILITIES;
  readonly pageSize: number;
  private readonly limitBytes: number;
  private readonly pages = new Map<number, Buffer>();
  /**
   * The allocated page numbers, sorted, for block status over long ranges; null when a page was
   * allocated or freed since. Rebuilt lazily so the write path only pays a store on allocation.
   */
  private sortedPages: Float64Array | null = null;

  constructor(options: MemoryBackendOptions) {
    const { sizeBytes } = options;
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % SECTOR_SIZE !== 0) {
      throw new InvalidArgumentError(`memory backend size ${sizeBytes} must be a positive multiple of 512 bytes`);
    }
    const pageSize = options.pageSize ?? 4096;
    if (!Number.isInteger(pageSize) || pageSize < 512 || pageSize > 1 << 20 || (pageSize & (pageSize - 1)) !== 0) {
      throw new InvalidArgumentError(`memory backend pageSize ${pageSize} must be a power of two from 512 to 1048576`);
    }
    this.sizeBytes = sizeBytes;
    this.pageSize = pageSize;
    this.limitBytes = options.limitBytes ?? Infinity;
    this.readOnly = options.readOnly === true;
    this.description = `memory (${sizeBytes} bytes)`;
  }

  /** Bytes of pages currently allocated. */
  get allocatedBytes(): number {
    return this.pages.size * this.pageSize;
  }

  queueBio(bio: Bio, sink: CompletionSink): void {
    let status: BlkStatus = BlkStatus.OK;
    const offset = bio.sector * SECTOR_SIZE;
    switch (bio.op) {
      case ReqOp.READ:
        this.read(offset, bio.vecs);
        break;
      case ReqOp.WRITE:
        status = this.write(offset, bio.vecs);
        break;
      case ReqOp.DISCARD:
        this.zero(offset, bio.size);
        break;
      case ReqOp.WRITE_ZEROES:
        // NOUNMAP asks for allocated zeros (NBD's NO_HOLE): block status must then report data,
        // so the pages are kept (allocated if need be) and zero-filled, not freed.
        if ((bio.flags & ReqFlag.NOUNMAP) !== 0) status = this.zeroAllocated(offset, bio.size);
        else this.zero(offset, bio.size);
        break;
      case ReqOp.FLUSH:
        break;
      default:
        status = BlkStatus.NOTSUPP;
    }
    sink.complete(bio, status);
  }

  private read(offset: number, vecs: BioVec[]): void {
    const pageSize = this.pageSize;
    let pos = offset;
    for (let i = 0; i < vecs.length; i++) {
      const v = vecs[i] as BioVec;
      let vo = v.offset;
      let left = v.length;
      while (left > 0) {
        const inPage = pos % pageSize;
        const n = Math.min(left, pageSize - inPage);
        const page = this.pages.get(Math.floor(pos / pageSize));
        if (page === undefined) v.buffer.fill(0, vo, vo + n);
        else v.buffer.set(page.subarray(inPage, inPage + n), vo);
        pos += n;
        vo += n;
        left -= n;
      }
    }
  }

  private write(offset: number, vecs: BioVec[]): BlkStatus {
    const pageSize = this.pageSize;
    let pos = offset;
    for (let i = 0; i < vecs.length; i++) {
      const v = vecs[i] as BioVec;
      let vo = v.offset;
      let left = v.length;
      while (left > 0) {
        const inPage = pos % pageSize;
        const n = Math.min(left, pageSize - inPage);
        const index = Math.floor(pos / pageSize);
        let page = this.pages.get(index);
        if (page === undefined) {
          if ((this.pages.size + 1) * pageSize > this.limitBytes) return BlkStatus.NOSPC;
          // A page written whole is fully overwritten: no need to zero it first.
          page = n === pageSize ? Buffer.allocUnsafeSlow(pageSize) : Buffer.alloc(pageSize);
          this.pages.set(index, page);
          this.sortedPages = null;
        }
        page.set(v.buffer.subarray(vo, vo + n), inPage);
        pos += n;
        vo += n;
        left -= n;
      }
    }
    return BlkStatus.OK;
  }

  private zeroAllocated(offset: number, length: number): BlkStatus {
    const pageSize = this.pageSize;
    let pos = offset;
    let left = length;
    while (left > 0) {
      const inPage = pos % pageSize;
      const n = Math.min(left, pageSize - inPage);
      const index = Math.floor(pos / pageSize);
      const page = this.pages.get(index);
      if (page !== undefined) page.fill(0, inPage, inPage + n);
      else {
        if ((this.pages.size + 1) * pageSize > this.limitBytes) return BlkStatus.NOSPC;
        this.pages.set(index, Buffer.alloc(pageSize));
        this.sortedPages = null;
      }
      pos += n;
      left -= n;
    }
    return BlkStatus.OK;
  }

  private zero(offset: number, length: number): void {
    const pageSize = this.pageSize;
    const end = offset + length;
    const firstFull = Math.ceil(offset / pageSize);
    const endFull = Math.floor(end / pageSize);
    if (firstFull >= endFull) {
      // No whole page inside: at most the tail of one page and the head of the next.
      const boundary = (Math.floor(offset / pageSize) + 1) * pageSize;
      this.zeroPartial(offset, Math.min(end, boundary));
      this.zeroPartial(boundary, end);
      return;
    }
    this.zeroPartial(offset, firstFull * pageSize);
    this.zeroPartial(endFull * pageSize, end);
    // A discard of a whole 1 TiB device must not walk 2^28 page numbers: walk whichever is
    // smaller, the range or the allocated pages.
    const before = this.pages.size;
    if (endFull - firstFull <= before) {
      for (let i = firstFull; i < endFull; i++) this.pages.delete(i);
    } else {
      for (const i of this.pages.keys()) if (i >= firstFull && i < endFull) this.pages.delete(i);
    }
    if (this.pages.size !== before) this.sortedPages = null;
  }

  private zeroPartial(from: number, to: number): void {
    if (from >= to) return;
    const pageSize = this.pageSize;
    const page = this.pages.get(Math.floor(from / pageSize));
    if (page !== undefined) page.fill(0, from % pageSize, from % pageSize + (to - from));
  }

  /**
   * Holes and data of `[offset, offset + length)` from the page map: a page never written (or
   * wholly discarded or zeroed) is a hole and reads as zeros; an allocated page is data, even if
   * zeros were written into it. Costs O(pages in the range) for short ranges and
   * O(log allocated + allocated pages in the range) for long ones (after a sort of the allocated
   * page numbers when pages came or went since the last long query). See
   * {@link BlockBackend.blockStatus}.
   */
  blockStatus(offset: number, length: number): BlockStatusExtent[] {
    const out: BlockStatusExtent[] = [];
    if (length <= 0) return out;
    const pageSize = this.pageSize;
    const end = offset + length;
    const first = Math.floor(offset / pageSize);
    const last = Math.ceil(end / pageSize); // exclusive
    // Runs are accumulated as (start, hole) and emitted when the kind changes.
    let runStart = offset;
    let runHole = true;
    let pos = offset; // bytes before pos are accounted for
    const addData = (from: number, to: number): void => {
      if (from > pos) {
        // a hole [pos, from)
        if (!runHole) {
          if (pos > runStart) out.push({ length: pos - runStart, hole: false });
          runStart = pos;
          runHole = true;
        }
      }
      if (runHole) {
        if (from > runStart) out.push({ length: from - runStart, hole: true });
        runStart = from;
        runHole = false;
      }
      pos = to;
    };
    const pages = this.pages;
    if (last - first <= STATUS_DIRECT_PAGES || last - first <= pages.size) {
      for (let i = first; i < last; i++) {
        if (pages.has(i)) addData(Math.max(offset, i * pageSize), Math.min(end, (i + 1) * pageSize));
      }
    } else {
      const sorted = this.sortedPageNumbers();
      for (let k = lowerBound(sorted, first); k < sorted.length; k++) {
        const i = sorted[k] as number;
        if (i >= last) break;
        addData(Math.max(offset, i * pageSize), Math.min(end, (i + 1) * pageSize));
      }
    }
    if (end > pos && !runHole) {
      out.push({ length: pos - runStart, hole: false });
      runStart = pos;
      runHole = true;
    }
    if (end > runStart) out.push({ length: end - runStart, hole: runHole });
    return out;
  }

  private sortedPageNumbers(): Float64Array {
    let sorted = this.sortedPages;
    if (sorted === null) {
      sorted = Float64Array.from(this.pages.keys()).sort();
      this.sortedPages = sorted;
    }
    return sorted;
  }

  async close(): Promise<void> {
    this.pages.clear();
    this.sortedPages = null;
  }
}

/** Index of the first element of sorted `a` that is >= `x` (a.length if none). */
function lowerBound(a: Float64Array, x: number): number {
  let lo = 0;
  let hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if ((a[mid] as number) < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
