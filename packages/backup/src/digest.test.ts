import { createHash } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { blkdevRead, createDisk } from '@blkfilter/bio';
import { afterAll, describe, expect, it } from 'vitest';
import { ChainBackend } from './chain-backend.js';
import { ReadBatch } from './chain.js';
import { createExtentHasher, extentDigest } from './digest.js';
import { readExactv } from './fsutil.js';
import { MANIFEST_FILE, parseManifest, type Manifest } from './manifest.js';
import { Qcow2Reader } from './reader.js';
import { list, restore, verify } from './repository.js';
import { cleanup, MiB, scribble, sha256File, snapAndBackup, tmpDir, trackedDisk, type Taken } from './test-util.js';

afterAll(cleanup);

const sha256 = (b: Uint8Array | string): string => createHash('sha256').update(b).digest('hex');

describe('extent digests', () => {
  it('XXH64 is the reference XXH64 (seed 0) in its canonical 16-digit form, streamed or not', () => {
    // Reference values (xxhsum -H1): the empty input, "abc", and one whose digest starts with a 0.
    expect(extentDigest('xxh64', Buffer.alloc(0))).toBe('ef46db3751d8e999');
    expect(extentDigest('xxh64', Buffer.from('abc'))).toBe('44bc2cf5ad770999');
    expect(extentDigest('xxh64', Buffer.from('blkfilter 2'))).toBe('05245173bd61cd84');
    expect(extentDigest('sha256', Buffer.from('abc'))).toBe(sha256('abc'));
    const data = Buffer.alloc(3 * 65536 + 123);
    for (let i = 0; i < data.length; i++) data[i] = (i * 31 + (i >> 8)) & 0xff;
    for (const alg of ['xxh64', 'sha256'] as const) {
      const h = createExtentHasher(alg);
      for (let off = 0; off < data.length; off += 65536) h.update(data.subarray(off, off + 65536));
      expect(h.digest(), alg).toBe(extentDigest(alg, data));
    }
  });

  it('a scatter read fills its pieces in order, and a file that ends first is an error', async () => {
    const file = path.join(tmpDir(), 'f');
    const bytes = Buffer.from(Array.from({ length: 100 }, (_, i) => i));
    fs.writeFileSync(file, bytes);
    const fh = await fsp.open(file, 'r');
    try {
      const a = Buffer.alloc(30);
      const b = Buffer.alloc(40);
      await readExactv(fh, file, [a, b], 20, 'test');
      expect([...a]).toEqual([...bytes.subarray(20, 50)]);
      expect([...b]).toEqual([...bytes.subarray(50, 90)]);
      // A batch reads host-contiguous pieces with one call, and never merges pieces that are not.
      const calls: Array<[number, number[]]> = [];
      const reader = {
        readHostv: async (parts: Uint8Array[], host: number, what: string) => {
          calls.push([host, parts.map((p) => p.length)]);
          await readExactv(fh, file, parts, host, what);
        },
      } as unknown as Qcow2Reader;
      const into = Buffer.alloc(40);
      const other = Buffer.alloc(10);
      const batch = new ReadBatch(reader);
      batch.add(0, into.subarray(0, 10), 'x'); // host 0..10 -> into[0..10]
      batch.add(10, into.subarray(10, 20), 'x'); // contiguous in both: one piece
      batch.add(20, other, 'x'); // contiguous on the host only: a second piece
      batch.add(60, into.subarray(20, 40), 'x'); // not contiguous on the host: a second read
      await batch.flush();
      expect(calls).toEqual([
        [0, [20, 10]],
        [60, [20]],
      ]);
      expect([...into]).toEqual([...bytes.subarray(0, 20), ...bytes.subarray(60, 80)]);
      expect([...other]).toEqual([...bytes.subarray(20, 30)]);
      await expect(readExactv(fh, file, [Buffer.alloc(60), Buffer.alloc(60)], 0, 'test')).rejects.toMatchObject({ code: 'EBADIMG', message: expect.stringMatching(/expected 120 bytes, the file ends after 100/) });
    } finally {
      await fh.close();
    }
  });
});

/** A 1 full + 2 incremental chain of an 8 MiB disk. */
async function chainOf3(): Promise<{ dir: string; taken: Taken[]; raws: string; disk: Awaited<ReturnType<typeof trackedDisk>> }> {
  const disk = await trackedDisk(8 * MiB);
  const dir = tmpDir();
  const raws = tmpDir();
  const taken: Taken[] = [];
  for (let p = 0; p < 3; p++) {
    await scribble(disk, p === 0 ? 30 : 5, p + 11);
    taken.push(...(await snapAndBackup([disk], dir, raws)).taken);
  }
  return { dir, taken, raws, disk };
}

/**
 * Rewrites a folder as the previous release wrote it: a version 2 manifest (no `extentDigest`)
 * with SHA-256 extent digests, its own digest computed as that release did.
 */
async function makeVersion2(dir: string): Promise<void> {
  const m = (await list(dir)).manifest;
  const points = [];
  for (const p of m.points) {
    const images = [];
    for (const img of p.images) {
      const r = await Qcow2Reader.open(path.join(dir, img.file), { backing: false });
      const extents = [];
      for (const [s, l] of img.extents) {
        const buf = Buffer.alloc(l);
        await r.read(s, l, buf);
        extents.push([s, l, sha256(buf)]);
      }
      await r.close();
      images.push({ ...img, extents });
    }
    points.push({ ...p, images });
  }
  const plain = { format: m.format, version: 2, clusterSize: m.clusterSize, digestSpan: m.digestSpan, devices: m.devices, points };
  fs.writeFileSync(path.join(dir, MANIFEST_FILE), `${JSON.stringify({ ...plain, digest: sha256(JSON.stringify(plain)) }, null, 1)}\n`);
}

/** Flips one byte of the data cluster of guest offset `guest` in `file`; returns that cluster's host offset. */
async function flipInExtent(file: string, guest: number): Promise<number> {
  const r = await Qcow2Reader.open(file, { backing: false });
  const host = (await r.clusterAt(Math.floor(guest / r.clusterSize))).hostOffset;
  await r.close();
  const fd = fs.openSync(file, 'r+');
  const one = Buffer.alloc(1);
  fs.readSync(fd, one, 0, 1, host + 100);
  fs.writeSync(fd, Buffer.from([(one[0] as number) ^ 0x01]), 0, 1, host + 100);
  fs.closeSync(fd);
  return host;
}

describe('manifest v3 (XXH64 extents) and v2 folders (SHA-256 extents)', () => {
  it('a new folder is version 3 with XXH64 extent digests; a flipped byte is found, with its file and offset', async () => {
    const { dir, taken, raws } = await chainOf3();
    const text = fs.readFileSync(path.join(dir, MANIFEST_FILE), 'utf8');
    const m = JSON.parse(text) as Manifest;
    expect(m.version).toBe(3);
    expect(m.extentDigest).toBe('xxh64');
    const top = m.points[2]?.images[0];
    expect(top?.extents.length).toBeGreaterThan(0);
    for (const p of m.points) for (const [, , d] of p.images[0]?.extents ?? []) expect(d).toMatch(/^[0-9a-f]{16}$/);
    const out = path.join(raws, 'ok.raw');
    await restore(dir, { to: out });
    expect(sha256File(out)).toBe(taken[2]?.sha);

    const file = path.join(dir, top?.file as string);
    const host = await flipInExtent(file, top?.extents[0]?.[0] as number);
    const err = await restore(dir, { to: path.join(raws, 'bad.raw') }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'EBADSUM', file, offset: host, message: expect.stringMatching(/has XXH64 [0-9a-f]{16}; the manifest recorded [0-9a-f]{16}/) });
    expect(fs.existsSync(path.join(raws, 'bad.raw'))).toBe(false);
    // Points before the damaged image still restore.
    await restore(dir, { at: 2, to: path.join(raws, 'two.raw') });
    expect(sha256File(path.join(raws, 'two.raw'))).toBe(taken[1]?.sha);
    const report = await verify(dir);
    expect(report.ok).toBe(false);
    expect(report.problems.some((p) => p.file === file && p.offset === host && p.code === 'EBADSUM')).toBe(true);
  });

  it('a v2 folder (SHA-256 extents) still restores, verifies and serves every point, takes more backups as v2, and a flipped byte is still found', async () => {
    const { dir, taken, raws, disk } = await chainOf3();
    await makeVersion2(dir);
    const m = (await list(dir)).manifest;
    expect(m.version).toBe(2);
    expect(m.extentDigest).toBe('sha256');
    for (let at = 1; at <= 3; at++) {
      const out = path.join(raws, `v2-${at}.raw`);
      await restore(dir, { at, to: out });
      expect(sha256File(out), `point ${at}`).toBe(taken[at - 1]?.sha);
    }
    expect((await verify(dir)).ok).toBe(true);
    const b = await ChainBackend.open(dir, { at: 3 });
    const served = await createDisk({ name: `v2serve${process.pid}`, backend: b, scanPartitions: false });
    try {
      expect(sha256(await blkdevRead(served.part0, 0, 8 * MiB))).toBe(taken[2]?.sha);
    } finally {
      await served.remove();
    }

    // A backup added to a v2 folder keeps it version 2 (SHA-256 extents): the release that wrote it still reads it.
    await scribble(disk, 4, 29);
    taken.push(...(await snapAndBackup([disk], dir, raws)).taken);
    const text = fs.readFileSync(path.join(dir, MANIFEST_FILE), 'utf8');
    expect(text).not.toContain('extentDigest');
    const after = parseManifest(text, MANIFEST_FILE);
    expect(after.version).toBe(2);
    for (const [, , d] of after.points[3]?.images[0]?.extents ?? []) expect(d).toMatch(/^[0-9a-f]{64}$/);
    await restore(dir, { to: path.join(raws, 'v2-4.raw') });
    expect(sha256File(path.join(raws, 'v2-4.raw'))).toBe(taken[3]?.sha);

    const top = after.points[3]?.images[0];
    const file = path.join(dir, top?.file as string);
    const host = await flipInExtent(file, top?.extents[0]?.[0] as number);
    const err = await restore(dir, { to: path.join(raws, 'bad.raw') }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'EBADSUM', file, offset: host, message: expect.stringMatching(/has SHA-256 [0-9a-f]{64}; the manifest recorded [0-9a-f]{64}/) });
  });

  it('refuses a v3 manifest with an unknown extent digest, and digests that do not fit the algorithm', () => {
    const plain = { format: 'blkfilter-backup', version: 3, clusterSize: 65536, digestSpan: 4 * MiB, extentDigest: 'md5', devices: [{ name: 'd', virtualSize: MiB }], points: [] };
    const text = (o: object): string => JSON.stringify({ ...o, digest: sha256(JSON.stringify(o)) });
    expect(() => parseManifest(text(plain), 'm')).toThrow(/extentDigest "md5" is not a known extent digest/);
    const img = { device: 'd', file: '0001-d.qcow2', kind: 'full', backing: null, size: 1, sha256: '0'.repeat(64), compressed: false, generationId: null, snapNumber: null, bytesRead: 0, bytesWritten: 0, changedBytes: 0, durationMs: 0, zeros: [] };
    const point = (d: string): object => ({ seq: 1, createdAt: '', snapshotId: null, images: [{ ...img, extents: [[0, 65536, d]] }] });
    expect(parseManifest(text({ ...plain, extentDigest: 'xxh64', points: [point('0123456789abcdef')] }), 'm').extentDigest).toBe('xxh64');
    expect(() => parseManifest(text({ ...plain, extentDigest: 'xxh64', points: [point(sha256('x'))] }), 'm')).toThrow(/extent .* is malformed/);
    const { extentDigest: _, ...v2 } = { ...plain, version: 2 };
    expect(() => parseManifest(text({ ...v2, points: [point('0123456789abcdef')] }), 'm')).toThrow(/extent .* is malformed/);
  });
});
