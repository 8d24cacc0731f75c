import fs from 'node:fs';
import path from 'node:path';
import { blkdevDiscard, blkdevRead, blkdevWrite, createDiskSync, MemoryBackend } from '@blkfilter/bio';
import { resetCbt } from '@blkfilter/cbt';
import { createSnapshot } from '@blkfilter/snapshot';
import { afterAll, describe, expect, it } from 'vitest';
import { DamageCode } from './errors.js';
import { MANIFEST_FILE } from './manifest.js';
import { Qcow2Reader } from './reader.js';
import { backupPoint, clusterRanges, list, prune, restore, verify, verifyAgainst, type CbtTake } from './repository.js';
import { backupSnapshot } from './snapshot-source.js';
import { cleanup, haveQemu, MiB, qemuImg, scribble, sha256File, snapAndBackup, tmpDir, trackedDisk } from './test-util.js';

afterAll(cleanup);

const SIZE = 16 * MiB;

function qemuCheck(file: string): void {
  const check = JSON.parse(qemuImg('check', '--output=json', file)) as Record<string, unknown>;
  expect(check['check-errors'], file).toBe(0);
  expect(check['corruptions'] ?? 0, file).toBe(0);
  expect(check['leaks'] ?? 0, file).toBe(0);
}

describe('backups of real snapshots, driven by CBT', () => {
  it('makes a full backup then incrementals, restores every point exactly, and qemu-img accepts the chain', async () => {
    const disk = await trackedDisk(SIZE);
    const dir = tmpDir();
    const raws = tmpDir();
    await scribble(disk, 40, 1);
    const p1 = await snapAndBackup([disk], dir, raws);
    expect(p1.result.images[0]?.entry.kind).toBe('full');
    expect(p1.result.images[0]?.fullBecause).toMatch(/no earlier backup/);
    expect(p1.result.images[0]?.verifiedExtents).toBeGreaterThan(0);
    expect(p1.result.images[0]?.entry.device).toBe(disk.name);

    await blkdevWrite(disk.part0, 5 * MiB, Buffer.alloc(256 * 1024, 0x5a));
    await blkdevWrite(disk.part0, 12 * MiB + 65536, Buffer.alloc(4096, 0x33));
    await blkdevDiscard(disk.part0, 0, 2 * 65536);
    const p2 = await snapAndBackup([disk], dir, raws);
    const e2 = p2.result.images[0]?.entry;
    expect(e2?.kind).toBe('incremental');
    expect(e2?.changedBytes).toBe(256 * 1024 + 65536 + 2 * 65536);
    expect(e2?.bytesRead).toBeLessThanOrEqual(e2?.changedBytes ?? 0);
    expect(e2?.zeros).toEqual([[0, 2 * 65536]]);

    await scribble(disk, 5, 2);
    const p3 = await snapAndBackup([disk], dir, raws);
    const taken = [p1.taken[0], p2.taken[0], p3.taken[0]];

    for (const [i, t] of taken.entries()) {
      const out = path.join(raws, `restored-${i + 1}.raw`);
      const r = await restore(dir, { at: i + 1, to: out, hash: true });
      expect(r.sha256, `point ${i + 1}`).toBe(t?.sha);
      expect(sha256File(out)).toBe(t?.sha);
      expect((await verifyAgainst(dir, out, { at: i + 1 })).equal).toBe(true);
    }
    const report = await verify(dir);
    expect(report.problems).toEqual([]);
    expect(report.ok).toBe(true);
    expect(report.images).toBe(3);

    // The folder holds only the chain and the manifest: nothing temporary is left.
    expect(fs.readdirSync(dir).sort()).toEqual(['.lock', `0001-${disk.name}.qcow2`, `0002-${disk.name}.qcow2`, `0003-${disk.name}.qcow2`, MANIFEST_FILE]);

    if (haveQemu) {
      const files = (await list(dir)).manifest.points.map((p) => path.join(dir, p.images[0]?.file ?? ''));
      for (const f of files) qemuCheck(f);
      const chain = JSON.parse(qemuImg('info', '--backing-chain', '--output=json', files[2] as string)) as unknown[];
      expect(chain).toHaveLength(3);
      for (const [i, f] of files.entries()) qemuImg('compare', '-q', '-F', 'raw', f, taken[i]?.raw as string);
      const converted = path.join(raws, 'converted.raw');
      qemuImg('convert', '-O', 'raw', files[2] as string, converted);
      expect(sha256File(converted)).toBe(taken[2]?.sha);
    }
  });

  it('refuses to back up the same snapshot twice, and says so', async () => {
    const disk = await trackedDisk(4 * MiB);
    const dir = tmpDir();
    await scribble(disk, 4, 3);
    const s = await createSnapshot({ storage: { kind: 'memory', limitBytes: 16 * MiB } });
    try {
      await s.addDevice(disk.part0);
      await s.take();
      const first = await backupSnapshot({ dir, image: s.image(disk.part0) });
      expect(first.position).toBe(1);
      await expect(backupSnapshot({ dir, image: s.image(disk.part0) })).rejects.toMatchObject({ code: 'EEXIST', message: expect.stringMatching(/already point 1 .*take a new snapshot/) });
      expect((await list(dir)).manifest.points).toHaveLength(1);
    } finally {
      await s.destroy();
    }
  });

  it('refuses a take already in the chain when only CBT knows it (no snapshot id)', async () => {
    const disk = await trackedDisk(4 * MiB);
    const dir = tmpDir();
    await scribble(disk, 4, 6);
    const cbt: CbtTake = {
      generationId: 'g1',
      snapNumber: 7,
      changedSince: async ({ since }) => ({ kind: 'extents', generationId: 'g1', since, snapNumber: 7, snapshotId: null, blockSize: 65536, extents: [] }),
    };
    await backupPoint({ dir, sources: [{ name: 'd', image: disk.part0, cbt }] });
    await expect(backupPoint({ dir, sources: [{ name: 'd', image: disk.part0, cbt }] })).rejects.toMatchObject({ code: 'EEXIST', message: expect.stringMatching(/take 7 of CBT generation g1 of "d" is already point 1/) });
    await backupPoint({ dir, sources: [{ name: 'd', image: disk.part0, cbt: { ...cbt, snapNumber: 8 } }] });
    expect((await list(dir)).manifest.points).toHaveLength(2);
  });

  it('cancels a backup on its signal: nothing recorded, no partial file, the chain as it was and the next backup works', async () => {
    const disk = await trackedDisk(8 * MiB);
    const dir = tmpDir();
    await scribble(disk, 4, 6);
    await backupPoint({ dir, sources: [{ name: 'd', image: disk.part0 }] });
    const abort = new AbortController();
    let seen = 0;
    const cancelled = backupPoint({
      dir,
      sources: [{ name: 'd', image: disk.part0 }],
      readSize: 1 << 20,
      signal: abort.signal,
      onProgress: (done) => {
        if (done > 0 && ++seen === 2) abort.abort();
      },
    });
    await expect(cancelled).rejects.toMatchObject({ code: 'ECANCELED', message: expect.stringMatching(/cancelled after \d+ of \d+ bytes; nothing was recorded/) });
    expect((await list(dir)).manifest.points).toHaveLength(1);
    expect(fs.readdirSync(dir).filter((f) => f.endsWith('.partial'))).toEqual([]);
    await backupPoint({ dir, sources: [{ name: 'd', image: disk.part0 }] });
    expect((await list(dir)).manifest.points).toHaveLength(2);
  });

  it('falls back to a full backup, and says why, when the CBT generation changed', async () => {
    const disk = await trackedDisk(4 * MiB);
    const dir = tmpDir();
    const raws = tmpDir();
    await scribble(disk, 4, 4);
    await snapAndBackup([disk], dir, raws);
    await resetCbt(disk.part0);
    await blkdevWrite(disk.part0, 0, Buffer.alloc(4096, 1));
    const notices: string[] = [];
    const p = await snapAndBackup([disk], dir, raws, { mode: 'incremental', onNotice: (m) => notices.push(m) });
    expect(p.result.images[0]?.entry.kind).toBe('full');
    expect(notices[0]).toMatch(/incremental backup not possible: CBT cannot tell what changed/);
    const out = path.join(raws, 'r.raw');
    expect((await restore(dir, { to: out, hash: true })).sha256).toBe(p.taken[0]?.sha);
  });

  it('refuses a folder that holds another device', async () => {
    const a = await trackedDisk(4 * MiB);
    const b = await trackedDisk(2 * MiB);
    const dir = tmpDir();
    const raws = tmpDir();
    await snapAndBackup([a], dir, raws);
    await expect(snapAndBackup([b], dir, raws)).rejects.toThrow(/holds backups of .*use another folder/);
  });

  it('widens extents to whole clusters and merges neighbours', () => {
    expect(clusterRanges([{ sector: 130, sectors: 8 }, { sector: 0, sectors: 1 }, { sector: 127, sectors: 2 }], 65536, 1 << 20)).toEqual([{ start: 0, end: 131072 }]);
    expect(clusterRanges([{ sector: 2040, sectors: 100 }], 65536, 1 << 20)).toEqual([{ start: 983040, end: 1048576 }]);
  });
});

describe('restore targets', () => {
  it('refuses an existing file unless forced (and says how), leaves nothing behind on error, and restores to a device', async () => {
    const disk = await trackedDisk(4 * MiB);
    const dir = tmpDir();
    const raws = tmpDir();
    await scribble(disk, 6, 5);
    const p = await snapAndBackup([disk], dir, raws);
    const out = path.join(raws, 'out.raw');
    fs.writeFileSync(out, 'precious');
    await expect(restore(dir, { to: out })).rejects.toMatchObject({ code: 'EEXIST', message: expect.stringMatching(/--force/) });
    expect(fs.readFileSync(out, 'utf8')).toBe('precious');
    await restore(dir, { to: out, force: true });
    expect(sha256File(out)).toBe(p.taken[0]?.sha);
    await expect(restore(dir, { to: path.join(raws, 'x.raw'), at: 9 })).rejects.toThrow(/choose 1 to 1/);

    // A device: written whole (zeros too), read-only refused with EROFS.
    const target = createDiskSync({ name: `bk-target-${process.pid}`, backend: new MemoryBackend({ sizeBytes: 4 * MiB }), scanPartitions: false });
    try {
      await blkdevWrite(target.part0, 0, Buffer.alloc(4 * MiB, 0xff));
      const r = await restore(dir, { to: target.part0, hash: true });
      expect(r.sha256).toBe(p.taken[0]?.sha);
      const back = await blkdevRead(target.part0, 0, 4 * MiB);
      expect(back.equals(fs.readFileSync(p.taken[0]?.raw as string))).toBe(true);
      target.part0.readOnly = true;
      await expect(restore(dir, { to: target.part0 })).rejects.toMatchObject({ code: 'EROFS' });
    } finally {
      await target.remove();
    }
    // A folder we cannot create in: the error says which, with the errno (no ENOENT guesswork).
    await expect(restore(dir, { to: path.join(raws, 'no', 'such', 'dir.raw') })).rejects.toMatchObject({ code: 'ENOENT', message: expect.stringMatching(/cannot create the restore target in/) });
    expect(fs.readdirSync(raws).filter((n) => n.includes('.restoring'))).toEqual([]);
  });

  it('says a missing folder and an empty folder hold no backups', async () => {
    await expect(list('/nonexistent-blkfilter')).rejects.toMatchObject({ code: 'ENOENT', message: expect.stringMatching(/does not exist/) });
    await expect(restore('/nonexistent-blkfilter', { to: '/tmp/x.raw' })).rejects.toMatchObject({ code: 'ENOENT' });
    await expect(list(tmpDir())).rejects.toMatchObject({ code: 'ENOENT', message: expect.stringMatching(/holds no backups/) });
    // The manifest gone but images there: that is damage, not an empty folder.
    const dir = tmpDir();
    fs.writeFileSync(path.join(dir, '0001-disk.qcow2'), 'x');
    await expect(list(dir)).rejects.toMatchObject({ code: DamageCode.CHAIN, message: expect.stringMatching(/manifest was lost/) });
  });
});

describe('retention', () => {
  it('prunes to the newest N points: every kept point reads back byte-identical, qemu-img agrees', async () => {
    const disk = await trackedDisk(SIZE);
    const dir = tmpDir();
    const raws = tmpDir();
    const taken = [];
    for (let i = 0; i < 5; i++) {
      await scribble(disk, i === 0 ? 60 : 6, 10 + i);
      if (i === 3) await blkdevDiscard(disk.part0, 0, 4 * MiB);
      taken.push((await snapAndBackup([disk], dir, raws)).taken[0]);
    }
    const before = (await list(dir)).manifest;
    const r = await prune(dir, { keepLast: 2 });
    expect(r.removedPoints).toBe(3);
    expect(r.rebased).toEqual([before.points[3]?.images[0]?.file]);
    const after = (await list(dir)).manifest;
    expect(after.points.map((p) => p.seq)).toEqual([4, 5]);
    expect(after.points[0]?.images[0]?.kind).toBe('full');
    expect(fs.readdirSync(dir).filter((n) => n.endsWith('.qcow2'))).toHaveLength(2);
    expect((await verify(dir)).ok).toBe(true);
    for (const [i, t] of [taken[3], taken[4]].entries()) {
      const out = path.join(raws, `pruned-${i}.raw`);
      expect((await restore(dir, { at: i + 1, to: out, hash: true })).sha256).toBe(t?.sha);
      if (haveQemu) {
        const f = path.join(dir, after.points[i]?.images[0]?.file ?? '');
        qemuCheck(f);
        qemuImg('compare', '-q', '-F', 'raw', f, t?.raw as string);
      }
    }
    // Nothing to do is not an error; the next backup goes on from the pruned chain.
    expect((await prune(dir, { keepLast: 2 })).removedPoints).toBe(0);
    await scribble(disk, 3, 20);
    const next = await snapAndBackup([disk], dir, raws);
    expect(next.result.images[0]?.entry.kind).toBe('incremental');
    expect((await restore(dir, { to: path.join(raws, 'next.raw'), hash: true })).sha256).toBe(next.taken[0]?.sha);
  });
});

describe('compression', () => {
  it('writes deflate clusters that qemu-img reads, and reads what qemu-img convert -c writes', async () => {
    const disk = await trackedDisk(SIZE);
    const dir = tmpDir();
    const raws = tmpDir();
    // Compressible data: text-like runs.
    for (let i = 0; i < 20; i++) await blkdevWrite(disk.part0, i * 512 * 1024, Buffer.alloc(65536, `block ${i} `));
    await scribble(disk, 4, 30); // and some that is not
    const p1 = await snapAndBackup([disk], dir, raws, { compress: true });
    const e1 = p1.result.images[0]?.entry;
    expect(e1?.compressed).toBe(true);
    await blkdevWrite(disk.part0, 3 * MiB, Buffer.alloc(131072, 'changed '));
    const p2 = await snapAndBackup([disk], dir, raws, { compress: true });
    expect(p2.result.images[0]?.entry.kind).toBe('incremental');
    for (const [i, p] of [p1, p2].entries()) {
      expect((await restore(dir, { at: i + 1, to: path.join(raws, `c${i}.raw`), hash: true })).sha256).toBe(p.taken[0]?.sha);
    }
    expect((await verify(dir)).ok).toBe(true);
    const files = (await list(dir)).manifest.points.map((p) => path.join(dir, p.images[0]?.file ?? ''));
    if (haveQemu) {
      const plain = path.join(raws, 'plain.qcow2');
      qemuImg('convert', '-O', 'qcow2', p1.taken[0]?.raw as string, plain);
      expect(fs.statSync(files[0] as string).size).toBeLessThan(fs.statSync(plain).size);
      for (const [i, f] of files.entries()) {
        qemuCheck(f);
        qemuImg('compare', '-q', '-F', 'raw', f, [p1, p2][i]?.taken[0]?.raw as string);
      }
      // qemu's own compressed images, read by our reader.
      const qc = path.join(raws, 'qemu-c.qcow2');
      qemuImg('convert', '-c', '-O', 'qcow2', p2.taken[0]?.raw as string, qc);
      const r = await Qcow2Reader.open(qc);
      try {
        const all = Buffer.alloc(SIZE);
        await r.read(0, SIZE, all);
        expect(all.equals(fs.readFileSync(p2.taken[0]?.raw as string))).toBe(true);
        expect((await r.check()).compressedClusters).toBeGreaterThan(0);
      } finally {
        await r.close();
      }
    }
  });
});

describe('several devices of one snapshot', () => {
  it('backs them up as one point in one manifest and restores each', async () => {
    const a = await trackedDisk(4 * MiB);
    const b = await trackedDisk(2 * MiB);
    const dir = tmpDir();
    const raws = tmpDir();
    await scribble(a, 4, 40);
    await scribble(b, 4, 41);
    const p1 = await snapAndBackup([a, b], dir, raws);
    expect(p1.result.point.images.map((i) => i.device)).toEqual([a.name, b.name]);
    await scribble(b, 2, 42);
    const p2 = await snapAndBackup([a, b], dir, raws);
    expect(p2.result.point.images.map((i) => i.kind)).toEqual(['incremental', 'incremental']);
    expect(p2.result.point.images[0]?.extents).toEqual([]);
    await expect(restore(dir, { to: path.join(raws, 'x.raw') })).rejects.toThrow(/choose one device/);
    for (const [i, d] of [a, b].entries()) {
      for (const [j, p] of [p1, p2].entries()) {
        expect((await restore(dir, { at: j + 1, device: d.name, to: path.join(raws, `${i}-${j}.raw`), hash: true })).sha256).toBe(p.taken[i]?.sha);
      }
    }
    expect((await verify(dir)).ok).toBe(true);
    expect((await list(dir)).manifest.devices.map((d) => d.name)).toEqual([a.name, b.name]);
  });
});
