// The fault matrix: a chain of 1 full + 3 incrementals, damaged one way at a time. Every case:
// restore of the newest point and verify fail with a damage error naming the file, nothing
// is written at the target, and the points before the damage still restore exactly.
import fs from 'node:fs';
import path from 'node:path';
import { blkdevDiscard, blkdevWrite } from '@blkfilter/bio';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RepositoryDamageError } from './errors.js';
import { MANIFEST_FILE } from './manifest.js';
import { list, restore, verify } from './repository.js';
import { cleanup, MiB, scribble, sha256File, snapAndBackup, tmpDir, trackedDisk, type Taken } from './test-util.js';

afterAll(cleanup);

let golden: string;
let files: string[] = [];
const taken: Taken[] = [];

beforeAll(async () => {
  const disk = await trackedDisk(8 * MiB);
  golden = tmpDir();
  const raws = tmpDir();
  await scribble(disk, 50, 1);
  taken.push((await snapAndBackup([disk], golden, raws)).taken[0] as Taken);
  for (let i = 0; i < 3; i++) {
    await scribble(disk, 3, 10 + i);
    await blkdevWrite(disk.part0, (i + 1) * MiB, Buffer.alloc(65536, 0x40 + i));
    if (i === 1) await blkdevDiscard(disk.part0, 6 * MiB, 131072);
    taken.push((await snapAndBackup([disk], golden, raws)).taken[0] as Taken);
  }
  files = (await list(golden)).manifest.points.map((p) => p.images[0]?.file as string);
  expect(files).toHaveLength(4);
  expect((await verify(golden)).ok).toBe(true);
});

/** Where the structures of one of our images are, read straight from its bytes. */
function layout(file: string): { header: Buffer; size: number; l1: number; l2: number; l2Data: number; data: number; reftable: number; refblock: number; backingName: number | null } {
  const buf = fs.readFileSync(file);
  const l1 = Number(buf.readBigUInt64BE(40));
  const mask = 0x00ff_ffff_ffff_fe00n;
  const l2 = Number(buf.readBigUInt64BE(l1) & mask);
  let l2Data = -1;
  for (let i = 0; i < 8192; i++) {
    const e = buf.readBigUInt64BE(l2 + i * 8);
    if ((e & mask) !== 0n) {
      l2Data = l2 + i * 8;
      break;
    }
  }
  const reftable = Number(buf.readBigUInt64BE(48));
  const bfOffset = Number(buf.readBigUInt64BE(8));
  return {
    header: buf.subarray(0, 512),
    size: buf.length,
    l1,
    l2,
    l2Data,
    data: Number(buf.readBigUInt64BE(l2Data) & mask),
    reftable,
    refblock: Number(buf.readBigUInt64BE(reftable)),
    backingName: bfOffset === 0 ? null : bfOffset,
  };
}

function flip(file: string, offset: number, mask: number): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, offset);
    b[0] = (b[0] as number) ^ mask;
    fs.writeSync(fd, b, 0, 1, offset);
  } finally {
    fs.closeSync(fd);
  }
}

interface Case {
  readonly name: string;
  /** Index of the first damaged image (points before it still restore); 0 for the manifest. */
  readonly firstBad: number;
  /** What the messages must name. */
  readonly names: () => string;
  apply(dir: string): void;
}

const cases: Case[] = [];
for (let f = 0; f < 4; f++) {
  const img = (dir: string): string => path.join(dir, files[f] as string);
  const fileCase = (name: string, apply: (file: string) => void): void => {
    cases.push({ name: `file ${f + 1}: ${name}`, firstBad: f, names: () => files[f] as string, apply: (dir) => apply(img(dir)) });
  };
  for (const at of [100, 65536, 'half', 'last-sector'] as const) {
    fileCase(`truncated at ${at}`, (file) => {
      const size = fs.statSync(file).size;
      fs.truncateSync(file, at === 'half' ? Math.floor(size / 2) : at === 'last-sector' ? size - 512 : at);
    });
  }
  fileCase('header: version flipped', (file) => flip(file, 7, 0x04));
  fileCase('header: cluster_bits flipped', (file) => flip(file, 23, 0x01));
  fileCase('header: virtual size flipped', (file) => flip(file, 29, 0x10));
  fileCase('header: L1 offset flipped', (file) => flip(file, 45, 0x01));
  fileCase('header: refcount table offset flipped', (file) => flip(file, 53, 0x01));
  if (f > 0) fileCase('header: backing file name flipped', (file) => flip(file, layout(file).backingName as number, 0x01));
  fileCase('L1 entry: L2 offset flipped', (file) => flip(file, layout(file).l1 + 5, 0x01));
  fileCase('L2 entry: data offset flipped', (file) => flip(file, layout(file).l2Data + 5, 0x01));
  fileCase('L2 entry: compressed bit flipped', (file) => flip(file, layout(file).l2Data, 0x40));
  fileCase('L2 entry: zero bit flipped', (file) => flip(file, layout(file).l2Data + 7, 0x01));
  fileCase('L2 entry: an unallocated cluster made a zero cluster', (file) => {
    // Our restore reads only the recorded extents, so this one is caught by comparing the
    // cluster map with the manifest: qemu would read zeros there instead of the backing file.
    const b = fs.readFileSync(file);
    const { l2 } = layout(file);
    let at = -1;
    for (let i = 0; i < 128 && at < 0; i++) if (b.readBigUInt64BE(l2 + i * 8) === 0n) at = l2 + i * 8;
    if (at < 0) throw new Error(`no unallocated cluster in ${file}`);
    flip(file, at + 7, 0x01);
  });
  fileCase('refcount table entry flipped', (file) => flip(file, layout(file).reftable + 5, 0x01));
  fileCase('refcount block entry flipped', (file) => flip(file, layout(file).refblock + 1, 0x02));
  fileCase('data byte flipped', (file) => flip(file, layout(file).data + 1000, 0xff));
  fileCase('appended garbage', (file) => fs.appendFileSync(file, Buffer.alloc(4096, 0xaa)));
}
cases.push({ name: 'middle file 2 deleted', firstBad: 1, names: () => files[1] as string, apply: (dir) => fs.rmSync(path.join(dir, files[1] as string)) });
cases.push({ name: 'middle file 3 deleted', firstBad: 2, names: () => files[2] as string, apply: (dir) => fs.rmSync(path.join(dir, files[2] as string)) });
cases.push({
  name: 'middle files 2 and 3 swapped',
  firstBad: 1,
  names: () => files[1] as string,
  apply: (dir) => {
    const a = path.join(dir, files[1] as string);
    const b = path.join(dir, files[2] as string);
    fs.renameSync(a, `${a}.x`);
    fs.renameSync(b, a);
    fs.renameSync(`${a}.x`, b);
  },
});
cases.push({ name: 'manifest is garbage', firstBad: 0, names: () => MANIFEST_FILE, apply: (dir) => fs.writeFileSync(path.join(dir, MANIFEST_FILE), '{"format": "blkfilter-backup", garbage') });
cases.push({
  name: 'manifest edited (one digest changed)',
  firstBad: 0,
  names: () => MANIFEST_FILE,
  apply: (dir) => {
    const file = path.join(dir, MANIFEST_FILE);
    const text = fs.readFileSync(file, 'utf8');
    const i = text.indexOf('"sha256"') + 12;
    fs.writeFileSync(file, text.slice(0, i) + (text[i] === '0' ? '1' : '0') + text.slice(i + 1));
  },
});
cases.push({ name: 'manifest deleted', firstBad: 0, names: () => MANIFEST_FILE, apply: (dir) => fs.rmSync(path.join(dir, MANIFEST_FILE)) });
cases.push({
  name: 'manifest stale (the copy from after point 2)',
  firstBad: 2,
  names: () => MANIFEST_FILE,
  apply: (dir) => fs.copyFileSync(path.join(golden, 'manifest-after-2.json'), path.join(dir, MANIFEST_FILE)),
});

describe('the fault matrix', () => {
  beforeAll(async () => {
    // A stale manifest: what the manifest was after point 2 (rebuilt from the current one).
    const m = (await list(golden)).manifest;
    const { manifestText } = await import('./manifest.js');
    fs.writeFileSync(path.join(golden, 'manifest-after-2.json'), manifestText({ ...m, points: m.points.slice(0, 2) }));
  });

  it(`has ${cases.length} cases`, () => {
    expect(cases.length).toBeGreaterThanOrEqual(60);
  });

  it.each(cases.map((c) => [c.name, c] as const))('%s', async (_name, c) => {
    const dir = tmpDir('blkfilter-fault-');
    for (const n of fs.readdirSync(golden)) fs.copyFileSync(path.join(golden, n), path.join(dir, n));
    c.apply(dir);
    const out = tmpDir('blkfilter-fault-out-');
    const target = path.join(out, 'restored.raw');

    const err = await restore(dir, { to: target }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err, 'restore of the newest point must fail').not.toBeNull();
    expect(RepositoryDamageError.isDamage(err), `a damage error, got ${String(err)}`).toBe(true);
    expect((err as Error).message).toContain(c.names());
    expect(fs.readdirSync(out), 'nothing written at the target').toEqual([]);

    const report = await verify(dir);
    expect(report.ok).toBe(false);
    expect(report.problems.map((p) => p.message).join('\n')).toContain(c.names());

    for (let p = 0; p < c.firstBad; p++) {
      const t = path.join(out, `at-${p + 1}.raw`);
      const r = await restore(dir, { at: p + 1, to: t, hash: true });
      expect(r.sha256, `point ${p + 1} still restores`).toBe(taken[p]?.sha);
      expect(sha256File(t)).toBe(taken[p]?.sha);
      expect((await verify(dir, { at: p + 1 })).ok, `verify --at ${p + 1}`).toBe(true);
    }
  });
});
