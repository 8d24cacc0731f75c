import { fc, test } from '@fast-check/vitest';
import { afterAll, beforeAll, describe, expect } from 'vitest';
import { Bio, bioChain, bioClone, bioEndio, BioVec, bioSplit, disableBioDebug, enableBioDebug, SECTOR_SIZE } from './bio.js';
import { MemoryBackend } from './backends/memory.js';
import { createDisk, type BlockDev, type Disk } from './device.js';
import { blkdevWrite } from './io.js';
import { opIsWrite, ReqFlag, ReqOp } from './op.js';
import { bioPoll } from './queue.js';
import { BlkStatus } from './status.js';
import { bioSplitToLimits, submitBio } from './submit.js';
import { buildMbr, FaultBackend } from './testing.js';

// A plain byte array is the model; the device must read back exactly what it holds after any
// sequence of bios, whatever the ops, flags, splits, chains, clones and partitions.

const DISK_BYTES = 256 * 1024;
const PARTS = [
  { start: 64, size: 128 }, // sectors
  { start: 256, size: 192 },
];

const mbr = (): Buffer => buildMbr(PARTS.map((p) => [p.start, p.size] as const), { diskSignature: 0xfeedbeef });

const opArb = fc.constantFrom(ReqOp.READ, ReqOp.WRITE, ReqOp.WRITE, ReqOp.DISCARD, ReqOp.WRITE_ZEROES, ReqOp.FLUSH);
const flagArb = fc.subarray([ReqFlag.FUA, ReqFlag.PREFLUSH, ReqFlag.SYNC, ReqFlag.POLLED, ReqFlag.NOUNMAP]).map((fs) => fs.reduce((a, f) => a | f, 0));
const modeArb = fc.constantFrom('plain', 'split', 'chain', 'clone');
const stepArb = fc.record({
  op: opArb,
  target: fc.nat({ max: 2 }), // 0: whole disk, 1..2: partitions
  startFrac: fc.double({ min: 0, max: 1, noNaN: true }),
  sectors: fc.integer({ min: 1, max: 40 }),
  segments: fc.integer({ min: 1, max: 6 }),
  flags: flagArb,
  mode: modeArb,
  seed: fc.nat(),
});

describe('random bios against a byte-array model', () => {
  let disk: Disk;
  let fault: FaultBackend;
  let bdevs: BlockDev[];
  let counter = 0;

  beforeAll(async () => {
    fault = new FaultBackend(new MemoryBackend({ sizeBytes: DISK_BYTES, pageSize: 1024 }), { seed: 7 });
    disk = await createDisk({ name: 'model0', backend: fault, limits: { maxSectors: 16, maxSegments: 3 }, queues: { interrupt: 2, poll: 2 } });
    await blkdevWrite(disk.part0, 0, mbr());
    await disk.rescanPartitions();
    bdevs = [disk.part0, ...disk.partitions];
    expect(bdevs.map((b) => [b.startSect, b.nrSects])).toEqual([[0, DISK_BYTES / 512], ...PARTS.map((p) => [p.start, p.size])]);
  });
  afterAll(async () => {
    disableBioDebug();
    await disk.remove();
  });

  test.prop([fc.array(stepArb, { minLength: 1, maxLength: 30 }), fc.boolean()], { numRuns: 150 })(
    'reads back the model and completes every bio exactly once',
    async (steps, asyncBackend) => {
      const tracker = enableBioDebug({ captureStacks: false });
      fault.clearRules();
      if (asyncBackend) fault.addRule({ delayMs: 0, probability: 0.5 });
      const model = Buffer.alloc(DISK_BYTES);
      // Start each run from the disk's current content (including the MBR).
      {
        const cur = Buffer.alloc(DISK_BYTES);
        await runBio(new Bio(ReqOp.READ, disk.part0, 0, DISK_BYTES, [new BioVec(cur)]), 'split');
        cur.copy(model);
      }
      for (const s of steps) {
        const bdev = bdevs[s.target] as BlockDev;
        const sectors = Math.min(s.sectors, bdev.nrSects);
        const sector = Math.floor(s.startFrac * (bdev.nrSects - sectors));
        const abs = (bdev.startSect + sector) * SECTOR_SIZE;
        const size = sectors * SECTOR_SIZE;
        const flags = s.flags & (s.op === ReqOp.WRITE_ZEROES ? ~0 : ~ReqFlag.NOUNMAP);
        let bio: Bio;
        let data: Buffer | null = null;
        if (s.op === ReqOp.FLUSH) {
          bio = new Bio(ReqOp.FLUSH, bdev, 0, 0);
        } else if (s.op === ReqOp.READ || s.op === ReqOp.WRITE) {
          data = Buffer.alloc(size);
          if (s.op === ReqOp.WRITE) for (let i = 0; i < size; i++) data[i] = (s.seed + i * 31 + counter) & 0xff;
          counter++;
          bio = new Bio(s.op, bdev, sector, size, segmentsOf(data, s.segments, s.seed));
        } else {
          bio = new Bio(s.op, bdev, sector, size);
        }
        bio.flags = flags;
        const status = await runBio(bio, s.mode);
        expect(status).toBe(BlkStatus.OK);
        if (s.op === ReqOp.WRITE) (data as Buffer).copy(model, abs);
        else if (opIsWrite(s.op)) model.fill(0, abs, abs + size);
        else if (s.op === ReqOp.READ) expect(Buffer.compare(data as Buffer, model.subarray(abs, abs + size))).toBe(0);
      }
      const all = Buffer.alloc(DISK_BYTES);
      expect(await runBio(new Bio(ReqOp.READ, disk.part0, 0, DISK_BYTES, [new BioVec(all)]), 'split')).toBe(BlkStatus.OK);
      expect(Buffer.compare(all, model)).toBe(0);
      expect(tracker.inFlight).toBe(0);
      expect(tracker.submitted).toBeGreaterThan(0);
      tracker.assertAllCompleted();
      for (const q of disk.queues) expect(q.pending).toBe(0);
      expect(disk.inflight).toBe(0);
    },
  );
});

/**
 * Cuts `data` into up to `n` segments: of any byte length when they fit the disk's 3-segment
 * limit, else on sector boundaries, so that bioSplitToLimits can always split between them.
 */
function segmentsOf(data: Buffer, n: number, seed: number): BioVec[] {
  const unit = n > 3 ? SECTOR_SIZE : 1;
  const vecs: BioVec[] = [];
  let off = 0;
  for (let i = 0; i < n - 1; i++) {
    const room = (data.length - off) / unit - 1;
    if (room < 1) break;
    const len = (1 + ((seed >> i) % room)) * unit;
    vecs.push(new BioVec(data, off, len));
    off += len;
  }
  vecs.push(new BioVec(data, off, data.length - off));
  return vecs;
}

/** Submits `bio` in the given way and resolves with its status once it (and only it) completed. */
function runBio(bio: Bio, mode: string): Promise<BlkStatus> {
  return new Promise<BlkStatus>((resolve, reject) => {
    let calls = 0;
    bio.endIo = (b) => {
      calls++;
      if (calls > 1) reject(new Error('end-io ran twice'));
      // Let any stray second completion show up before resolving.
      setImmediate(() => resolve(b.status));
    };
    const polled = (bio.flags & ReqFlag.POLLED) !== 0;
    if (mode === 'clone' && bio.op !== ReqOp.FLUSH) {
      const clone = bioClone(bio);
      // The original is never submitted: its owner completes it from the clone (as dm does).
      clone.endIo = (c) => bioEndio(bio, c.status);
      submitSplit(clone);
    } else if (mode === 'chain' && bio.size >= 2 * SECTOR_SIZE && bio.op !== ReqOp.FLUSH) {
      const first = bioSplit(bio, 1);
      bioChain(first, bio);
      submitSplit(first);
      submitSplit(bio);
    } else {
      submitSplit(bio);
    }
    if (polled) {
      const spin = (): void => {
        if (bio.completed) return;
        bioPoll(bio);
        for (const q of bio.bdev.disk.queues) q.poll();
        if (!bio.completed) setImmediate(spin);
      };
      spin();
    }
  });
}

function submitSplit(bio: Bio): void {
  for (let s = bioSplitToLimits(bio); s !== null; s = bioSplitToLimits(bio)) submitBio(s);
  submitBio(bio);
}
