import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ImageFormatError } from './errors.js';
import { ClusterState, openImage, Qcow2Reader } from './reader.js';
import { cleanup, tmpDir } from './test-util.js';
import { Qcow2Writer } from './writer.js';

afterAll(cleanup);

const CS = 65536;

async function image(dir: string, name: string, options: { backingFile?: string; clusters?: number[]; compress?: boolean } = {}): Promise<string> {
  const file = path.join(dir, name);
  const w = await Qcow2Writer.create(file, { virtualSize: 16 * CS, ...(options.backingFile !== undefined ? { backingFile: options.backingFile } : {}), compress: options.compress === true });
  for (const c of options.clusters ?? [1, 2, 5]) await w.writeCluster(c, Buffer.alloc(CS, c + 1));
  await w.close();
  return file;
}

function setName(file: string, name: Buffer): void {
  const b = fs.readFileSync(file);
  const off = Number(b.readBigUInt64BE(8));
  b.fill(0, off, off + 64);
  name.copy(b, off);
  b.writeUInt32BE(name.length, 16);
  fs.writeFileSync(file, b);
}

describe('the qcow2 reader never turns damage into data', () => {
  it('refuses a short read as truncation, even when the file shrinks after it was opened', async () => {
    const dir = tmpDir();
    const file = await image(dir, 'a.qcow2');
    const r = await Qcow2Reader.open(file);
    try {
      const info = await r.clusterAt(5);
      expect(info.state).toBe(ClusterState.DATA);
      fs.truncateSync(file, info.hostOffset + 100);
      const err = await r.read(5 * CS, CS, Buffer.alloc(CS)).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ImageFormatError);
      expect((err as ImageFormatError).file).toBe(file);
      expect((err as ImageFormatError).message).toMatch(/expected 65536 bytes, the file ends after 100 \(truncated\?\)/);
    } finally {
      await r.close();
    }
  });

  it('says what is wrong with a file cut to 100 bytes (not a Node error about a path)', async () => {
    const dir = tmpDir();
    const file = await image(dir, 'a.qcow2');
    fs.truncateSync(file, 100);
    await expect(Qcow2Reader.open(file)).rejects.toMatchObject({ code: 'EBADIMG', file, offset: 0, message: expect.stringMatching(/version 3 header of at least 104 bytes/) });
    fs.truncateSync(file, 10);
    await expect(Qcow2Reader.open(file)).rejects.toMatchObject({ code: 'EBADIMG', message: expect.stringMatching(/at least 72 bytes/) });
  });

  it('refuses backing names that escape the folder or hold NUL bytes', async () => {
    const dir = tmpDir();
    await image(dir, 'base.qcow2');
    const inc = await image(dir, 'inc.qcow2', { backingFile: 'base.qcow2', clusters: [3] });
    expect((await Qcow2Reader.open(inc, { confined: true }).then((r) => r.close().then(() => 'ok')))).toBe('ok');
    setName(inc, Buffer.from('../base.qcow2'));
    await expect(Qcow2Reader.open(inc, { confined: true })).rejects.toMatchObject({ code: 'EBADIMG', message: expect.stringMatching(/leaves the backup folder/) });
    setName(inc, Buffer.from('base\0.qcow2'));
    await expect(Qcow2Reader.open(inc)).rejects.toMatchObject({ code: 'EBADIMG', message: expect.stringMatching(/NUL byte/) });
    setName(inc, Buffer.from([0xff, 0xfe, 0x41]));
    await expect(Qcow2Reader.open(inc)).rejects.toMatchObject({ code: 'EBADIMG', message: expect.stringMatching(/not valid UTF-8/) });
  });

  it('checks L1 and L2 entries: unaligned, out of the file, reserved bits, overlapping', async () => {
    const dir = tmpDir();
    const file = await image(dir, 'a.qcow2');
    const orig = fs.readFileSync(file);
    const l1 = Number(orig.readBigUInt64BE(40));
    const l2 = Number(orig.readBigUInt64BE(l1) & 0x00ff_ffff_ffff_fe00n);
    const cases: Array<[string, (b: Buffer) => void, RegExp, 'open' | 'read' | 'check']> = [
      ['L1 unaligned', (b) => b.writeBigUInt64BE(b.readBigUInt64BE(l1) + 512n, l1), /not aligned/, 'open'],
      ['L1 past the end', (b) => b.writeBigUInt64BE(BigInt(b.length) | (1n << 63n), l1), /outside the file/, 'open'],
      ['L1 reserved bit', (b) => b.writeBigUInt64BE(b.readBigUInt64BE(l1) | 2n, l1), /reserved bits/, 'open'],
      ['L2 data unaligned', (b) => b.writeBigUInt64BE(b.readBigUInt64BE(l2 + 8) + 4096n, l2 + 8), /not aligned/, 'read'],
      ['L2 data past the end', (b) => b.writeBigUInt64BE((1n << 63n) | BigInt(b.length + CS), l2 + 8), /outside the file/, 'read'],
      ['L2 data on the header', (b) => b.writeBigUInt64BE(1n << 63n, l2 + 8), /flags without a host offset|header cluster/, 'read'],
      ['L2 data on the L1 table', (b) => b.writeBigUInt64BE((1n << 63n) | BigInt(l1), l2 + 8), /overlaps/, 'check'],
      ['two L2 entries, one cluster', (b) => b.writeBigUInt64BE(b.readBigUInt64BE(l2 + 8), l2 + 16), /overlaps/, 'check'],
      ['compressed garbage', (b) => b.writeBigUInt64BE((1n << 62n) | BigInt(l1), l2 + 8), /does not inflate|inflates to/, 'read'],
    ];
    for (const [name, damage, message, where] of cases) {
      const b = Buffer.from(orig);
      damage(b);
      fs.writeFileSync(file, b);
      const run = async (): Promise<void> => {
        const r = await Qcow2Reader.open(file);
        try {
          if (where === 'check') await r.check();
          else await r.read(0, 16 * CS, Buffer.alloc(16 * CS));
        } finally {
          await r.close();
        }
      };
      const err = await run().catch((e: unknown) => e);
      expect(err, name).toBeInstanceOf(ImageFormatError);
      expect((err as Error).message, name).toMatch(message);
      expect((err as ImageFormatError).file, name).toBe(file);
    }
  });

  it('reads what it writes, compressed or not, and sniffs raw images', async () => {
    const dir = tmpDir();
    for (const compress of [false, true]) {
      const file = await image(dir, `c-${compress}.qcow2`, { compress });
      const r = await Qcow2Reader.open(file);
      const all = Buffer.alloc(16 * CS);
      await r.read(0, all.length, all);
      for (let c = 0; c < 16; c++) expect(all[c * CS + 7], `cluster ${c}`).toBe([1, 2, 5].includes(c) ? c + 1 : 0);
      const checked = await r.check();
      expect(compress ? checked.compressedClusters : checked.dataClusters).toBe(3);
      await r.close();
    }
    const raw = path.join(dir, 'r.raw');
    fs.writeFileSync(raw, Buffer.alloc(3));
    const rr = await openImage(raw);
    expect(rr.virtualSize).toBe(3);
    await rr.close();
  });
});
