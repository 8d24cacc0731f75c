import { afterEach, describe, expect, it } from 'vitest';
import type { BlockStatusExtent } from './backend.js';
import { MemoryBackend } from './backends/memory.js';
import { LinearBackend } from './backends/linear.js';
import { createDisk, createDiskSync, type Disk } from './device.js';
import { InvalidArgumentError } from './errors.js';
import { blkdevBlockStatus, blkdevDiscard, blkdevRead, blkdevWrite, blkdevZeroout } from './io.js';
import { PatternBackend, writeMbr } from './testing.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const TiB = 1024 ** 4;
let n = 0;
const disks: Disk[] = [];
function disk(backend: MemoryBackend | LinearBackend | PatternBackend | ByteStatusBackend, logicalBlockSize: 512 | 4096 = 512): Disk {
  const d = createDiskSync({ name: `bs${process.pid}x${n++}`, backend, logicalBlockSize });
  disks.push(d);
  return d;
}
afterEach(async () => {
  // Stacked disks first: a linear device before its target.
  for (const d of disks.splice(0).reverse()) await d.remove();
});

const hole = (length: number): BlockStatusExtent => ({ length, hole: true });
const data = (length: number): BlockStatusExtent => ({ length, hole: false });

/** The reference answer: page by page, merged. */
function expected(allocated: (page: number) => boolean, pageSize: number, offset: number, length: number): BlockStatusExtent[] {
  const out: BlockStatusExtent[] = [];
  let pos = offset;
  const end = offset + length;
  while (pos < end) {
    const page = Math.floor(pos / pageSize);
    const next = Math.min(end, (page + 1) * pageSize);
    const isHole = !allocated(page);
    const last = out[out.length - 1];
    if (last !== undefined && last.hole === isHole) out[out.length - 1] = { length: last.length + next - pos, hole: isHole };
    else out.push({ length: next - pos, hole: isHole });
    pos = next;
  }
  return out;
}

describe('MemoryBackend block status', () => {
  it('answers exactly for a 1 TiB device with a few pages, past 2^32 bytes', async () => {
    const backend = new MemoryBackend({ sizeBytes: TiB });
    const d = disk(backend);
    await blkdevWrite(d.part0, 0, Buffer.alloc(4 * KiB, 1));
    await blkdevWrite(d.part0, 1 * MiB, Buffer.alloc(8 * KiB, 2)); // two pages, merged
    await blkdevWrite(d.part0, 5 * 2 ** 32 + 512, Buffer.alloc(512, 3)); // one page, unaligned write
    await blkdevWrite(d.part0, TiB - 4 * KiB, Buffer.alloc(4 * KiB, 4)); // the last page
    // How fast: npm run bench (bench-memory.ts, "memory blockStatus over a 1 TiB device").
    const all = blkdevBlockStatus(d.part0, 0, TiB);
    expect(all).toEqual([
      data(4 * KiB),
      hole(MiB - 4 * KiB),
      data(8 * KiB),
      hole(5 * 2 ** 32 - MiB - 8 * KiB),
      data(4 * KiB),
      hole(TiB - 5 * 2 ** 32 - 8 * KiB),
      data(4 * KiB),
    ]);
    // Unaligned ranges are clipped to the request, byte for byte.
    expect(blkdevBlockStatus(d.part0, 100, 5000)).toEqual([data(4096 - 100), hole(1004)]);
    expect(blkdevBlockStatus(d.part0, MiB + 10, 3)).toEqual([data(3)]);
    expect(blkdevBlockStatus(d.part0, 2 * MiB, 512)).toEqual([hole(512)]);
    expect(blkdevBlockStatus(d.part0, TiB - 1, 1)).toEqual([data(1)]);
    expect(blkdevBlockStatus(d.part0, 12345, 0)).toEqual([]);
    // A second long query over the same pages does not rebuild anything: still exact.
    expect(blkdevBlockStatus(d.part0, MiB, TiB - MiB)?.slice(0, 2)).toEqual([data(8 * KiB), hole(5 * 2 ** 32 - MiB - 8 * KiB)]);
    // Discarding pages turns them back into holes; a partial discard keeps the page (data).
    await blkdevDiscard(d.part0, MiB, 4 * KiB);
    await blkdevDiscard(d.part0, 0, 512);
    expect(blkdevBlockStatus(d.part0, 0, 2 * MiB)).toEqual([data(4 * KiB), hole(MiB - 4 * KiB + 4 * KiB), data(4 * KiB), hole(MiB - 8 * KiB)]);
    await blkdevDiscard(d.part0, 0, TiB);
    expect(blkdevBlockStatus(d.part0, 0, TiB)).toEqual([hole(TiB)]);
  });

  it('reports the same as a page-by-page reference after random writes, discards and zeroouts', async () => {
    let seed = 12345;
    const rand = (k: number): number => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % k;
    };
    for (const pageSize of [512, 4096, 65536]) {
      // 16384 pages: a whole-device query takes the sorted-page-numbers path, short ones look up.
      const size = 16384 * pageSize;
      const backend = new MemoryBackend({ sizeBytes: size, pageSize });
      const d = disk(backend);
      for (let i = 0; i < 300; i++) {
        const off = rand(size / 512) * 512;
        const len = Math.min(size - off, (1 + rand(64)) * 512);
        const what = rand(4);
        if (what < 2) await blkdevWrite(d.part0, off, Buffer.alloc(len, 7));
        else if (what === 2) await blkdevDiscard(d.part0, off, len);
        else await blkdevZeroout(d.part0, off, len);
        if (i % 50 !== 49) continue;
        // Allocation is observable through reads of zeros only one way: holes read as zeros.
        const pages = new Set<number>();
        for (let p = 0; p < size / pageSize; p++) {
          const st = blkdevBlockStatus(d.part0, p * pageSize, pageSize) as BlockStatusExtent[];
          if (st.length !== 1 || st[0]?.length !== pageSize) throw new Error(`page ${p}: ${JSON.stringify(st)}`);
          if (!st[0].hole) pages.add(p);
        }
        expect(pages.size * pageSize).toBe(backend.allocatedBytes);
        const ranges: Array<[number, number]> = [
          [0, size], // long: the sorted page numbers
          [rand(size), 0],
        ];
        for (let k = 0; k < 20; k++) {
          const o = rand(size);
          ranges.push([o, rand(size - o) + 1]);
        }
        for (const [o, l] of ranges) {
          const l2 = Math.min(l, size - o);
          expect(blkdevBlockStatus(d.part0, o, l2)).toEqual(expected((p) => pages.has(p), pageSize, o, l2));
        }
      }
      // Every hole reads as zeros.
      let pos = 0;
      for (const e of blkdevBlockStatus(d.part0, 0, size) as BlockStatusExtent[]) {
        if (e.hole) {
          const n = Math.min(e.length, 64 * KiB);
          expect((await blkdevRead(d.part0, pos, n)).every((b) => b === 0)).toBe(true);
          expect((await blkdevRead(d.part0, pos + e.length - n, n)).every((b) => b === 0)).toBe(true);
        }
        pos += e.length;
      }
      expect(pos).toBe(size);
    }
  });
});

/**
 * A memory backend whose allocation answer is byte granular, from a list of data ranges (as a
 * file on a filesystem with blocks smaller than the device's would answer).
 */
class ByteStatusBackend extends MemoryBackend {
  readonly asked: Array<[number, number]> = [];
  constructor(
    sizeBytes: number,
    private readonly dataRanges: ReadonlyArray<readonly [number, number]>,
  ) {
    super({ sizeBytes });
  }
  override blockStatus(offset: number, length: number): BlockStatusExtent[] {
    this.asked.push([offset, length]);
    const out: BlockStatusExtent[] = [];
    const push = (len: number, isHole: boolean): void => {
      if (len <= 0) return;
      const last = out[out.length - 1];
      if (last !== undefined && last.hole === isHole) out[out.length - 1] = { length: last.length + len, hole: isHole };
      else out.push({ length: len, hole: isHole });
    };
    let pos = offset;
    const end = offset + length;
    for (const [a, b] of this.dataRanges) {
      const lo = Math.max(a, pos);
      const hi = Math.min(b, end);
      if (hi <= lo) continue;
      push(lo - pos, true);
      push(hi - lo, false);
      pos = hi;
    }
    push(end - pos, true);
    return out;
  }
}

describe('blkdevBlockStatus', () => {
  it('reports a hole only for whole logical blocks: a block the backend holds partly is data', () => {
    // Data at [4096 + 1000, 4096 + 1100) and [3 * 4096 - 1, 3 * 4096 + 1) of a 4096-byte-block disk.
    const backend = new ByteStatusBackend(64 * KiB, [
      [5096, 5196],
      [3 * 4096 - 1, 3 * 4096 + 1],
    ]);
    const d = disk(backend, 4096);
    expect(blkdevBlockStatus(d.part0, 0, 64 * KiB)).toEqual([hole(4096), data(3 * 4096), hole(64 * KiB - 4 * 4096)]);
    // Asked for part of a block, the whole block is asked for and clipped back to the request.
    backend.asked.length = 0;
    expect(blkdevBlockStatus(d.part0, 4096 + 10, 100)).toEqual([data(100)]);
    expect(backend.asked).toEqual([[4096, 4096]]);
    expect(blkdevBlockStatus(d.part0, 100, 4096)).toEqual([hole(3996), data(100)]);
    expect(blkdevBlockStatus(d.part0, 4 * 4096 + 1, 4096)).toEqual([hole(4096)]);
    // The same answers on a 512-byte-block disk keep the holes of whole 512-byte blocks.
    const fine = disk(new ByteStatusBackend(64 * KiB, [[5096, 5196]]));
    expect(blkdevBlockStatus(fine.part0, 0, 8192)).toEqual([hole(4608), data(1024), hole(2560)]);
  });

  it('takes an answer that does not tile the range for no answer (null: all data)', () => {
    const answers: BlockStatusExtent[][] = [
      [hole(60 * KiB)], // short
      [hole(64 * KiB), data(4 * KiB)], // too long
      [hole(32 * KiB), data(0), hole(32 * KiB)], // an empty extent
      [hole(-4 * KiB), hole(68 * KiB)], // a negative one that sums right
      [hole(32 * KiB + 0.5), data(32 * KiB - 0.5)], // not whole bytes
      [hole(Number.NaN), data(64 * KiB)],
    ];
    for (const answer of answers) {
      const backend = new MemoryBackend({ sizeBytes: 64 * KiB });
      backend.blockStatus = (): BlockStatusExtent[] => answer;
      const d = disk(backend, 4096);
      expect(blkdevBlockStatus(d.part0, 0, 64 * KiB), JSON.stringify(answer)).toBeNull();
      expect(blkdevBlockStatus(d.part0, 512, 1024), JSON.stringify(answer)).toBeNull();
    }
  });

  it('remaps a partition to its disk', async () => {
    const backend = new MemoryBackend({ sizeBytes: 8 * MiB });
    const d = await createDisk({ name: `bsp${process.pid}x${n++}`, backend, scanPartitions: false });
    disks.push(d);
    // One partition at sector 2048 of 4096 sectors (1 MiB + 2 MiB).
    await writeMbr(d, [[2048, 4096]]);
    const part = d.partition(1);
    if (part === undefined) throw new Error('no partition');
    await blkdevWrite(part, 64 * KiB, Buffer.alloc(4 * KiB, 9));
    expect(blkdevBlockStatus(part, 0, part.sizeBytes)).toEqual([hole(64 * KiB), data(4 * KiB), hole(2 * MiB - 68 * KiB)]);
    expect(blkdevBlockStatus(d.part0, 0, 8 * MiB)).toEqual([data(4 * KiB), hole(MiB + 60 * KiB), data(4 * KiB), hole(7 * MiB - 68 * KiB)]);
    expect(() => blkdevBlockStatus(part, 2 * MiB - 512, 1024)).toThrow(InvalidArgumentError);
  });

  it('follows a stack of linear devices, any depth, and says null when the bottom cannot tell', async () => {
    const backend = new MemoryBackend({ sizeBytes: 16 * MiB });
    const bottom = disk(backend);
    await blkdevWrite(bottom.part0, 3 * MiB, Buffer.alloc(4 * KiB, 1));
    // Each level skips its first 1 KiB (2 sectors); 2000 levels skip 2000 KiB... keep the page in range.
    let top = bottom;
    const depth = 2000;
    for (let i = 0; i < depth; i++) top = disk(new LinearBackend(top.part0, { startSect: 2 }));
    const shift = depth * 1024;
    expect(top.part0.sizeBytes).toBe(16 * MiB - shift);
    expect(blkdevBlockStatus(top.part0, 0, top.part0.sizeBytes)).toEqual([hole(3 * MiB - shift), data(4 * KiB), hole(13 * MiB - 4 * KiB)]);
    // The backend method itself answers the same.
    expect((top.backend as LinearBackend).blockStatus(3 * MiB - shift - 512, 1024)).toEqual([hole(512), data(512)]);
    // A read of a reported hole returns zeros; of the data, what was written.
    expect((await blkdevRead(top.part0, 3 * MiB - shift, 4096)).every((b) => b === 1)).toBe(true);

    const pattern = disk(new PatternBackend(MiB));
    const linear = disk(new LinearBackend(pattern.part0, { startSect: 8 }));
    expect(blkdevBlockStatus(pattern.part0, 0, MiB)).toBeNull();
    expect(blkdevBlockStatus(linear.part0, 0, 4096)).toBeNull();
  });

  it('refuses bad ranges with a typed error and says null for a removed disk', async () => {
    const d = disk(new MemoryBackend({ sizeBytes: MiB }));
    for (const [o, l] of [
      [-1, 512],
      [0, -512],
      [0.5, 512],
      [0, MiB + 1],
      [MiB, 1],
      [2 ** 53, 0],
      [Number.NaN, 0],
    ] as Array<[number, number]>) {
      expect(() => blkdevBlockStatus(d.part0, o, l), `${o} + ${l}`).toThrow(InvalidArgumentError);
    }
    expect(() => blkdevBlockStatus(d.part0, 0, MiB + 512)).toThrow(/run past its end \(1048576 bytes\)/);
    expect(blkdevBlockStatus(d.part0, MiB, 0)).toEqual([]);
    await d.remove();
    expect(blkdevBlockStatus(d.part0, 0, 4096)).toBeNull();
  });
});
