// Scenario "file": random mixed bios from several workers on a disk over a FileBackend (a
// sparse temp file), with the engine's paths drawn at random per step: writes batched or one
// fs.write each, NOWAIT inline writes tried or not, inline reads or not. Each worker owns
// disjoint sectors, so the byte model is exact; the disk is checked against the model through
// the device, then the file itself once the backend has closed (what a restart would find).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FileBackend } from '@blkfilter/bio';
import type { StepContext } from './soak-context.js';
import { randomIo, verifyRange, type Region } from './soak-io.js';
import { Model, SoakFailure } from './soak-util.js';

const MiB = 1 << 20;
const DISK_BYTES = 8 * MiB;
const WORKERS = 8;

/** One step of the `file` scenario. */
export async function fileStep(ctx: StepContext): Promise<void> {
  const rng = ctx.rng;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-soak-file-'));
  ctx.onCleanup(async () => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'disk.raw');
  const writeBatching = rng.int(3) !== 0;
  const inlineWrites = rng.int(2) === 0;
  const inlineReads = rng.int(3) !== 0;
  ctx.count(writeBatching ? 'steps with batched writes' : 'steps with one fs.write per write');
  const backend = await FileBackend.open(file, { create: { sizeBytes: DISK_BYTES }, writeBatching, inlineWrites, inlineReads });
  const disk = ctx.disk('file', backend);
  const model = new Model(DISK_BYTES);

  ctx.phase = 'random bios on a file';
  const share = DISK_BYTES / WORKERS;
  const regions: Region[] = Array.from({ length: WORKERS }, (_, i) => ({ dev: disk.part0, modelBase: 0, start: i * share, bytes: share }));
  const workers = regions.map((region, i) => {
    const wr = rng.fork(`worker${i}`);
    return () => randomIo(ctx, wr, region, model, { maxBytes: 256 * 1024, flags: true, onError: 'fail' });
  });
  await ctx.runWorkers(workers);
  ctx.checkViolations();
  const stats = backend.stats;
  ctx.count('batched writes', stats.batchedWrites);
  ctx.count('inline reads', stats.inlineReads);
  ctx.count('inline writes', stats.inlineWrites);

  ctx.phase = 'verify the disk against the model';
  await verifyRange(ctx, disk.part0, 0, DISK_BYTES, model, 0, 'file disk after the step');

  ctx.phase = 'verify the file against the model once closed';
  await backend.close();
  const bytes = fs.readFileSync(file);
  ctx.stats.checks++;
  if (bytes.length !== DISK_BYTES || Buffer.compare(bytes, model.bytes) !== 0) {
    let at = 0;
    while (at < DISK_BYTES && bytes[at] === model.bytes[at]) at++;
    throw new SoakFailure(`the file differs from the model at byte ${at} after close (writeBatching ${writeBatching}, inlineWrites ${inlineWrites}, inlineReads ${inlineReads})`);
  }
}
