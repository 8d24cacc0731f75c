// Found by the soak under load: a snapshot destroyed while its directory storage was adding a
// step left that step's file behind for a while (the file was created, and removed, after
// destroy had returned). The file system is made slow here, so the step is still being added
// when destroy runs, every time.
import fs from 'node:fs';
import { blkdevWrite } from '@blkfilter/bio';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { createSnapshot } from './snapshot.js';
import { cleanup, memDisk, tmpDir } from './test-util.js';

const CHUNK = 64 * 1024;

afterEach(async () => {
  vi.restoreAllMocks();
  await cleanup();
});

describe('destroy while the diff storage grows', () => {
  it('returns only once every step file is gone, even one still being created', async () => {
    const dir = await tmpDir();
    const d = memDisk(16 * CHUNK, { async: true });
    const s = await createSnapshot({ storage: { kind: 'directory', path: dir, limitBytes: 8 * CHUNK, stepBytes: CHUNK }, chunkSize: CHUNK });
    await s.addDevice(d.part0);
    await s.take();
    // From now on a step file's open answers only when the test says so.
    const original = fs.open;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let opened!: () => void;
    const openedNow = new Promise<void>((r) => (opened = r));
    vi.spyOn(fs, 'open').mockImplementation(((file: fs.PathLike, flags: fs.OpenMode, mode: fs.Mode, cb: (err: NodeJS.ErrnoException | null, fd: number) => void) => {
      void gate.then(() =>
        original(file, flags, mode, (err, fd) => {
          cb(err, fd);
          opened();
        }),
      );
    }) as typeof fs.open);
    // The first write uses the only slot; low space starts adding a step file.
    await blkdevWrite(d.part0, 0, Buffer.alloc(4096, 1));
    // Let the step's open answer once destroy has returned, or after many turns of the event
    // loop (a destroy that waits for the step needs the open to answer).
    let done = false;
    const destroyed = s.destroy().then(() => {
      done = true;
      release();
    });
    for (let turn = 0; turn < 200 && !done; turn++) await new Promise((r) => setImmediate(r));
    release();
    await destroyed;
    await openedNow;
    expect(fs.readdirSync(dir)).toEqual([]);
    await d.remove();
  });
});
