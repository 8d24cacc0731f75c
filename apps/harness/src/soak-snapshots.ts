// Scenario "snapshots": writers keep writing two disks while snapshots of both are created,
// taken, read, written and destroyed. Writers pause only around the take, so the model copied
// then is the devices at the instant of take; every image read must equal that copy until
// the snapshot is reported corrupted, and the originals must always equal their models.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Bio, BioVec, BlkStatus, blkdevWrite, findBlockDevice, ReqOp, SECTOR_SIZE, type Disk } from '@blkfilter/bio';
import { createSnapshot, listSnapshots, SnapshotState, type Snapshot, type SnapshotEvent } from '@blkfilter/snapshot';
import type { StepContext } from './soak-context.js';
import { randomIo, verifyRange, type IoPolicy, type Region } from './soak-io.js';
import { Gate, Model, sleep, statusName, type Rng } from './soak-util.js';

const MiB = 1 << 20;
const KiB = 1024;
/** The snapshots' `maxConcurrentCopies`, one after the other. */
const MAX_COPIES = [1, 32, 2, 4];

interface Original {
  readonly disk: Disk;
  readonly model: Model;
}

/**
 * One step of the `snapshots` scenario: disks A (8 MiB) and B (4 MiB), five writers, and a
 * controller taking snapshots of both at one instant; about one take in three uses a diff
 * storage too small for the writes that follow, which must end in a reported corruption.
 */
export async function snapshotsStep(ctx: StepContext): Promise<void> {
  const rng = ctx.rng;
  const a: Original = { disk: ctx.memoryDisk('a', 8 * MiB), model: new Model(8 * MiB) };
  const b: Original = { disk: ctx.memoryDisk('b', 4 * MiB), model: new Model(4 * MiB) };
  const gate = new Gate();
  // Sector 0 stays zero: random bytes there could read as a partition table when the image is
  // scanned. A's last 2 MiB belong to the controller (overflow writes).
  const regions: Array<[Original, Region]> = [
    [a, { dev: a.disk.part0, modelBase: 0, start: 4 * KiB, bytes: 2 * MiB - 4 * KiB }],
    [a, { dev: a.disk.part0, modelBase: 0, start: 2 * MiB, bytes: 2 * MiB }],
    [a, { dev: a.disk.part0, modelBase: 0, start: 4 * MiB, bytes: 2 * MiB }],
    [b, { dev: b.disk.part0, modelBase: 0, start: 4 * KiB, bytes: 2 * MiB - 4 * KiB }],
    [b, { dev: b.disk.part0, modelBase: 0, start: 2 * MiB, bytes: 2 * MiB }],
  ];
  const policy: IoPolicy = { maxBytes: 64 * KiB, flags: true, onError: 'fail' };
  const writers = regions.map(([orig, region], i) => {
    const wr = rng.fork(`writer${i}`);
    return async (): Promise<void> => {
      await gate.enter();
      try {
        await randomIo(ctx, wr, region, orig.model, policy);
      } finally {
        gate.leave();
      }
      // Leave room for the controller's reads between bursts of writes.
      if (wr.chance(0.05)) await sleep(1);
    };
  });
  const controlRng = rng.fork('control');
  let take = 0;
  const controller = async (): Promise<void> => {
    await snapshotCycle(ctx, controlRng, gate, a, b, take++);
  };
  ctx.phase = 'writers with snapshot cycles';
  await ctx.runWorkers([...writers, controller], Math.max(ctx.limits.opsPerWorker, 1));
  if (take === 0) await snapshotCycle(ctx, controlRng, gate, a, b, take++);

  ctx.phase = 'originals after the step';
  ctx.check(listSnapshots().length === 0, () => `${listSnapshots().length} snapshot(s) still live after destroy`);
  await verifyRange(ctx, a.disk.part0, 0, a.model.sizeBytes, a.model, 0, 'original A');
  await verifyRange(ctx, b.disk.part0, 0, b.model.sizeBytes, b.model, 0, 'original B');
}

/** One snapshot: create, add both disks, take at a quiet instant, check, destroy. */
async function snapshotCycle(ctx: StepContext, rng: Rng, gate: Gate, a: Original, b: Original, n: number): Promise<void> {
  const chunkSize = rng.pick([4 * KiB, 16 * KiB, 64 * KiB]);
  const overflow = rng.chance(0.35);
  const dir = rng.chance(0.3) ? fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-soak-')) : null;
  const limitBytes = overflow ? chunkSize * rng.range(2, 6) : 16 * MiB;
  const stepBytes = overflow ? chunkSize : chunkSize * 16;
  // Small caps make first writes queue behind copies in flight; taken from the take number, not
  // the generator, so that seeds replay the same writes as before the cap existed.
  const maxConcurrentCopies = MAX_COPIES[n % MAX_COPIES.length] as number;
  ctx.phase = `take ${n}: create (chunk ${chunkSize}, limit ${limitBytes}, ${dir === null ? 'memory' : 'directory'} storage, ${maxConcurrentCopies} copies at most)`;
  const snap = await createSnapshot({
    chunkSize,
    maxConcurrentCopies,
    storage: dir === null ? { kind: 'memory', limitBytes, stepBytes } : { kind: 'directory', path: dir, limitBytes, stepBytes },
  });
  let destroyed = false;
  const destroy = async (): Promise<void> => {
    if (destroyed) return;
    destroyed = true;
    await snap.destroy();
    if (dir !== null) {
      const left = fs.readdirSync(dir);
      fs.rmSync(dir, { recursive: true, force: true });
      ctx.check(left.length === 0, () => `snapshot destroy left ${left.length} file(s) in its diff storage directory: ${left.join(', ')}`);
    }
  };
  ctx.onCleanup(destroy);
  await snap.addDevice(a.disk.part0);
  await snap.addDevice(b.disk.part0);

  ctx.phase = `take ${n}: take with writers paused`;
  await gate.pause();
  const atTake = { a: a.model.copy(), b: b.model.copy() };
  try {
    await snap.take();
  } finally {
    gate.resume();
  }
  ctx.count('takes');
  ctx.check(snap.state === SnapshotState.TAKEN || snap.state === SnapshotState.CORRUPTED, () => `snapshot state after take is ${snap.state}`);
  const imgA = snap.image(a.disk.part0);
  const imgB = snap.image(b.disk.part0);

  ctx.phase = `take ${n}: image reads and writes while writers run`;
  const images: Array<[typeof imgA, Model]> = [
    [imgA, atTake.a],
    [imgB, atTake.b],
  ];
  let corrupted = false;
  if (overflow) {
    // The controller's own region of A: writes to more chunks than the storage can hold.
    const chunks = Math.ceil(snap.info().storage.limitBytes / chunkSize) + rng.range(1, 4);
    for (let i = 0; i < chunks; i++) {
      const off = 6 * MiB + ((i * 7) % (2 * MiB / chunkSize)) * chunkSize;
      const data = rng.bytes(SECTOR_SIZE * rng.range(1, 8));
      await blkdevWrite(a.disk.part0, off, data); // must not fail: writes to the original never do
      a.model.write(off, data);
      ctx.stats.ops++;
    }
    corrupted = await waitCorrupted(ctx, snap);
    ctx.check(corrupted, () => `snapshot with ${snap.info().storage.limitBytes} bytes of diff storage took ${chunks} first writes to distinct chunks and was never reported corrupted (state ${snap.state}, storage ${JSON.stringify(snap.info().storage)})`);
  }
  for (let pass = 0; pass < 2; pass++) {
    for (const [img, model] of images) await checkImage(ctx, rng, snap, img, model, corrupted);
    if (corrupted) break;
    // Image writes land in the diff storage and change only the image.
    for (let i = rng.range(0, 4); i > 0; i--) {
      const [img, model] = rng.pick(images);
      const off = rng.range(1, model.sizeBytes / SECTOR_SIZE - 64) * SECTOR_SIZE;
      const data = rng.bytes(SECTOR_SIZE * rng.range(1, 32));
      const bio = await ctx.bio(Bio.write(img, off / SECTOR_SIZE, data));
      if (bio.status === BlkStatus.OK) model.write(off, data);
      else {
        corrupted = snap.state === SnapshotState.CORRUPTED;
        ctx.check(corrupted, () => `image write at byte ${off} of "${img.name}" failed with ${statusName(bio)} on a snapshot that is ${snap.state}`);
      }
      ctx.count('image-writes');
    }
  }
  if (!overflow) {
    ctx.check(snap.state === SnapshotState.TAKEN, () => `snapshot with ample diff storage is ${snap.state}: ${snap.info().error?.message ?? ''}`);
  }

  ctx.phase = `take ${n}: destroy while writers run`;
  const names = [imgA.name, imgB.name];
  await destroy();
  ctx.check(snap.state === SnapshotState.DESTROYED, () => `snapshot state after destroy is ${snap.state}`);
  ctx.check(names.every((nm) => findBlockDevice(nm) === undefined), () => `image devices ${names.join(', ')} still registered after destroy`);
}

/** Waits (up to 5 s) for the `corrupted` event, passing over low-space and storage-extended. */
async function waitCorrupted(ctx: StepContext, snap: Snapshot): Promise<boolean> {
  const until = Date.now() + 5000;
  while (Date.now() < until) {
    const ev: SnapshotEvent = await snap.waitEvent({ timeoutMs: 100 });
    ctx.count(`event:${ev.type}`);
    if (ev.type === 'corrupted') {
      ctx.check(snap.info().state === SnapshotState.CORRUPTED, () => `corrupted event came but info().state is ${snap.info().state}`);
      ctx.check(snap.info().error !== null, 'corrupted snapshot has no error in info()');
      return true;
    }
    if (ev.type === 'destroyed') return false;
  }
  return false;
}

/**
 * Reads the whole image in random pieces (bios of its own, so a failure names the piece): before corruption each must equal the model of the
 * instant of take; once corrupted, image reads must fail with IOERR.
 */
async function checkImage(ctx: StepContext, rng: Rng, snap: Snapshot, img: ReturnType<Snapshot['image']>, model: Model, corrupted: boolean): Promise<void> {
  const size = model.sizeBytes;
  const piece = rng.pick([64 * KiB, 256 * KiB, MiB]);
  const order = Array.from({ length: size / piece }, (_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [order[i], order[j]] = [order[j] as number, order[i] as number];
  }
  for (const p of corrupted ? order.slice(0, 2) : order) {
    const buf = Buffer.alloc(piece);
    const bio = await ctx.bio(new Bio(ReqOp.READ, img, (p * piece) / SECTOR_SIZE, piece, [new BioVec(buf)]));
    if (bio.status === BlkStatus.OK) {
      // An image read that succeeds must show the instant of take, corrupted or not.
      const diff = model.diff(p * piece, buf);
      ctx.check(diff === null, () => `image "${img.name}" (snapshot ${snap.state}) at byte ${p * piece}: ${diff}`);
    } else {
      ctx.check(
        snap.state === SnapshotState.CORRUPTED && bio.status === BlkStatus.IOERR,
        () => `image read at byte ${p * piece} of "${img.name}" failed with ${statusName(bio)} on a snapshot that is ${snap.state}`,
      );
    }
    if (corrupted) ctx.check(bio.status === BlkStatus.IOERR, () => `read of corrupted image "${img.name}" completed with ${statusName(bio)}, expected IOERR`);
    ctx.count('image-reads');
  }
}
