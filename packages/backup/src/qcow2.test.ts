import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ClusterState, Qcow2Reader } from './reader.js';
import { Qcow2Writer } from './writer.js';

const dirs: string[] = [];
function tmp(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2-'));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8' });
}
const haveQemu = (() => {
  try {
    qemuImg('--version');
    return true;
  } catch {
    return false;
  }
})();

function clusterData(index: number, size = 65536, fill?: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 8) {
    b.writeUInt32BE(index, i);
    b.writeUInt32BE(i, i + 4);
  }
  if (fill !== undefined) b.fill(fill);
  return b;
}

describe.skipIf(!haveQemu)('qcow2 writer, judged by qemu-img', () => {
  it('writes a sparse image that qemu-img checks clean and reads back as the raw it stands for', async () => {
    const dir = tmp();
    const size = 3 * 512 * 1024 * 1024 + 12345 * 512; // over several L2 tables, odd tail
    const w = await Qcow2Writer.create(path.join(dir, 'a.qcow2'), { virtualSize: size });
    const raw = fs.openSync(path.join(dir, 'a.raw'), 'w');
    fs.ftruncateSync(raw, size);
    const clusters = [0, 1, 7, 8191, 8192, 8193, 20000, w.guestClusters - 1];
    for (const c of clusters) {
      const len = Math.min(65536, size - c * 65536);
      const data = clusterData(c).subarray(0, len);
      await w.writeCluster(c, data);
      fs.writeSync(raw, data, 0, len, c * 65536);
    }
    await w.close();
    fs.closeSync(raw);
    const check = JSON.parse(qemuImg('check', '--output=json', path.join(dir, 'a.qcow2'))) as Record<string, unknown>;
    expect(check['check-errors']).toBe(0);
    expect(check['corruptions'] ?? 0).toBe(0);
    expect(check['leaks'] ?? 0).toBe(0);
    const info = JSON.parse(qemuImg('info', '--output=json', path.join(dir, 'a.qcow2'))) as Record<string, unknown>;
    expect(info['virtual-size']).toBe(size);
    qemuImg('compare', '-q', '-f', 'qcow2', '-F', 'raw', path.join(dir, 'a.qcow2'), path.join(dir, 'a.raw'));
  });

  it('chains an incremental over its backing file, zero clusters hiding old data', async () => {
    const dir = tmp();
    const size = 64 * 65536;
    const full = await Qcow2Writer.create(path.join(dir, 'full.qcow2'), { virtualSize: size });
    for (let c = 0; c < 64; c++) await full.writeCluster(c, clusterData(c));
    await full.close();
    const inc = await Qcow2Writer.create(path.join(dir, 'inc.qcow2'), { virtualSize: size, backingFile: 'full.qcow2' });
    await inc.writeCluster(3, clusterData(3, 65536, 0xee));
    await inc.zeroCluster(10);
    await inc.writeCluster(63, clusterData(63, 65536, 0x11));
    await inc.close();
    const expected = Buffer.concat(Array.from({ length: 64 }, (_, c) => (c === 3 ? clusterData(3, 65536, 0xee) : c === 10 ? Buffer.alloc(65536) : c === 63 ? clusterData(63, 65536, 0x11) : clusterData(c))));
    fs.writeFileSync(path.join(dir, 'expected.raw'), expected);
    const check = JSON.parse(qemuImg('check', '--output=json', path.join(dir, 'inc.qcow2'))) as Record<string, unknown>;
    expect(check['check-errors']).toBe(0);
    const chain = JSON.parse(qemuImg('info', '--backing-chain', '--output=json', path.join(dir, 'inc.qcow2'))) as Array<Record<string, unknown>>;
    expect(chain.map((i) => path.basename(String(i['filename'])))).toEqual(['inc.qcow2', 'full.qcow2']);
    qemuImg('compare', '-q', '-F', 'raw', path.join(dir, 'inc.qcow2'), path.join(dir, 'expected.raw'));
    // Our reader agrees with qemu, cluster states included.
    const r = await Qcow2Reader.open(path.join(dir, 'inc.qcow2'));
    const all = Buffer.alloc(size);
    await r.read(0, size, all);
    expect(Buffer.compare(all, expected)).toBe(0);
    expect((await r.clusterAt(10)).state).toBe(ClusterState.ZERO);
    expect((await r.clusterAt(11)).state).toBe(ClusterState.UNALLOCATED);
    expect((await r.clusterAt(3)).state).toBe(ClusterState.DATA);
    await r.close();
  });

  it('reads images written by qemu-img, and refuses misuse', async () => {
    const dir = tmp();
    const src = path.join(dir, 'src.raw');
    fs.writeFileSync(src, Buffer.concat([clusterData(0), Buffer.alloc(65536), clusterData(2, 65536, 0x42)]));
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', src, path.join(dir, 'q.qcow2'));
    const r = await Qcow2Reader.open(path.join(dir, 'q.qcow2'));
    const back = Buffer.alloc(3 * 65536);
    await r.read(0, back.length, back);
    expect(Buffer.compare(back, fs.readFileSync(src))).toBe(0);
    await r.close();
    const w = await Qcow2Writer.create(path.join(dir, 'o.qcow2'), { virtualSize: 4 * 65536 });
    await w.writeCluster(2, clusterData(2));
    await expect(w.writeCluster(1, clusterData(1))).rejects.toThrow(/ascending/);
    await w.close();
    await expect(Qcow2Writer.create(path.join(dir, 'o.qcow2'), { virtualSize: 65536 })).rejects.toMatchObject({ code: 'EEXIST' });
    await expect(Qcow2Reader.open(src)).rejects.toThrow(/not a qcow2 image/);
  });
});
