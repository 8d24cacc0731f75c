// blksnap's "stretch" test: the diff storage grows in steps while the snapshot lives, then runs
// out; the snapshot is then corrupted, and the original stays intact and writable.
import fs from 'node:fs/promises';
import path from 'node:path';
import { Bio, blkdevRead, blkdevWrite, BlkStatus, disableBioDebug, enableBioDebug, submitBioWait } from '@blkfilter/bio';
import { afterEach, describe, expect, it } from 'vitest';
import { DiffStorageIoError, DiffStorageOverflowError, SnapshotCorruptedError } from './errors.js';
import { createSnapshot } from './snapshot.js';
import { cleanup, fillDevice, memDisk, stamp, tmpDir, track } from './test-util.js';
import type { DiffStorageOptions, SnapshotEvent } from './types.js';

const KiB = 1024;
const CHUNK = 64 * KiB;

afterEach(async () => {
  disableBioDebug();
  await cleanup();
});

async function drain(s: { waitEvent(o: { timeoutMs: number }): Promise<SnapshotEvent> }): Promise<SnapshotEvent[]> {
  const out: SnapshotEvent[] = [];
  for (;;) {
    const e = await s.waitEvent({ timeoutMs: 0 });
    if (e.type === 'timeout') return out;
    out.push(e);
  }
}

async function stretch(storage: DiffStorageOptions, dir: string | null): Promise<void> {
  const tracker = enableBioDebug({ captureStacks: false });
  const size = 32 * CHUNK;
  const d = memDisk(size, { async: true });
  const before = await fillDevice(d);
  const s = track(await createSnapshot({ storage, chunkSize: CHUNK }));
  expect(s.info().storage).toMatchObject({ usedBytes: 0, allocatedBytes: 256 * KiB, limitBytes: 1024 * KiB, stepBytes: 256 * KiB });
  await s.addDevice(d.name);
  await s.take();
  const img = s.image(d.name);
  const model = Buffer.from(before);
  const seen: Array<[string, number]> = [];
  // One 4 KiB write per chunk: each saves one chunk. 16 fit in the 1 MiB limit.
  for (let c = 0; c < 16; c++) {
    const data = stamp(Buffer.alloc(4096), c * CHUNK, c + 1, 1);
    await blkdevWrite(d.part0, c * CHUNK, data);
    data.copy(model, c * CHUNK);
    for (const e of await drain(s)) seen.push([e.type, 'allocatedBytes' in e ? e.allocatedBytes : -1]);
  }
  // Free space fell under half a step (128 KiB) after the 3rd, 7th and 11th chunk; each time a
  // step was added. After the 15th nothing more can be added, so no low-space then.
  expect(seen).toEqual([
    ['low-space', 256 * KiB],
    ['storage-extended', 512 * KiB],
    ['low-space', 512 * KiB],
    ['storage-extended', 768 * KiB],
    ['low-space', 768 * KiB],
    ['storage-extended', 1024 * KiB],
  ]);
  expect(s.info()).toMatchObject({ state: 'taken', storage: { usedBytes: 1024 * KiB, allocatedBytes: 1024 * KiB } });
  if (dir !== null) expect((await fs.readdir(dir)).filter((f) => f.endsWith('.diff'))).toHaveLength(4);
  expect(Buffer.compare(await blkdevRead(img, 0, size), before)).toBe(0);

  // The 17th chunk does not fit: the snapshot is corrupted, the write still succeeds.
  const data = stamp(Buffer.alloc(4096), 16 * CHUNK, 99, 1);
  await blkdevWrite(d.part0, 16 * CHUNK, data);
  data.copy(model, 16 * CHUNK);
  const ev = await s.waitEvent({ timeoutMs: 1000 });
  expect(ev).toMatchObject({ type: 'corrupted', device: d.name });
  if (ev.type !== 'corrupted') throw new Error(`expected a corrupted event, got ${ev.type}`);
  expect(ev.error).toBeInstanceOf(DiffStorageOverflowError);
  expect(ev.error.code).toBe('ENOSPC');
  expect(ev.error.message).toMatch(/diff storage is full: 1048576 of its 1048576-byte limit used.*larger limitBytes/);
  const info = s.info();
  expect(info.state).toBe('corrupted');
  expect(info.error).toBe(ev.error);

  // Image reads fail cleanly with IOERR and say why.
  const r = Bio.read(img, 0, Buffer.alloc(4096));
  await expect(submitBioWait(r)).rejects.toBeInstanceOf(SnapshotCorruptedError);
  expect(r.status).toBe(BlkStatus.IOERR);
  expect(r.error?.message).toMatch(/is corrupted \(diff storage is full/);
  expect((r.error as SnapshotCorruptedError).cause).toBe(ev.error);
  const w = Bio.write(img, 0, Buffer.alloc(4096));
  await submitBioWait(w).catch(() => {});
  expect(w.status).toBe(BlkStatus.IOERR);

  // The original is intact and still writable everywhere (CoW has stopped).
  for (let c = 17; c < 32; c++) {
    const more = stamp(Buffer.alloc(8192), c * CHUNK - 4096, 200 + c, 2);
    await blkdevWrite(d.part0, c * CHUNK - 4096, more);
    more.copy(model, c * CHUNK - 4096);
  }
  expect(Buffer.compare(await blkdevRead(d.part0, 0, size), model)).toBe(0);
  expect(s.info().storage.usedBytes).toBe(1024 * KiB);
  expect((await s.waitEvent({ timeoutMs: 0 })).type).toBe('timeout');

  await s.destroy();
  if (dir !== null) expect((await fs.readdir(dir)).filter((f) => f.endsWith('.diff'))).toEqual([]);
  tracker.assertAllCompleted();
}

describe('stretch', () => {
  it('grows memory diff storage in steps, then overflows into a corrupted snapshot', async () => {
    await stretch({ kind: 'memory', limitBytes: 1024 * KiB, stepBytes: 256 * KiB }, null);
  });

  it('grows directory diff storage in step files, then overflows into a corrupted snapshot', async () => {
    const dir = path.join(await tmpDir(), 'diff');
    await stretch({ kind: 'directory', path: dir, limitBytes: 1024 * KiB, stepBytes: 256 * KiB }, dir);
  });

  it('reports an unusable directory at create', async () => {
    const base = await tmpDir();
    const file = path.join(base, 'a-file');
    await fs.writeFile(file, 'x');
    await expect(createSnapshot({ storage: { kind: 'directory', path: path.join(file, 'sub'), limitBytes: 1 << 20 } })).rejects.toBeInstanceOf(DiffStorageIoError);
  });
});
