// base:allocation from the backend's allocation map, and READ replies with OFFSET_HOLE chunks,
// judged by nbdinfo, qemu-img, qemu-io, nbdcopy and libnbd against qemu-nbd on the same layout.
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  FileBackend,
  LinearBackend,
  MemoryBackend,
  blkdevRead,
  blkdevWrite,
  createDisk,
  createDiskSync,
  type BlockStatusExtent,
  type Disk,
} from '@blkfilter/bio';
import { statusToExtents } from './block-status.js';
import { NbdCmd, NbdCmdFlag, NbdReplyFlag, NbdReplyType } from './protocol.js';
import { readU64 } from './reader.js';
import { createNbdServer, type NbdServer } from './server.js';
import { RawNbd, missingTools, run, runOk, tmpDir, waitForListener } from './test-helpers.js';

const K = 1024;
const M = 1024 * K;
const SIZE = 64 * M;
const missing = missingTools('nbdinfo', 'nbdcopy', 'qemu-img', 'qemu-io', 'qemu-nbd');
const has = (...tools: string[]): boolean => tools.every((t) => !missing.includes(t));
const SYSTEM_PYTHON = '/usr/bin/python3';

// Islands of data in a 64 MiB export; everything else was never written. The 512-byte write
// allocates a whole 4 KiB page here and a whole 4 KiB block in qemu-nbd's file (ext4, tmpfs).
const ISLANDS: Array<[number, number, number]> = [
  [0, 4 * K, 0x11],
  [200 * K, 100 * K, 0x22],
  [M, 64 * K, 0x33],
  [10 * M, 512, 0x44],
  [SIZE - 4 * K, 4 * K, 0x55],
];
const WRITES = ISLANDS.map(([o, l, p]) => `write -P ${p} ${o} ${l}`);
// [offset, length, type] as nbdinfo --map prints them: 3 "hole,zero", 0 "data".
const EXPECTED_MAP: Array<[number, number, number]> = [
  [0, 4 * K, 0],
  [4 * K, 196 * K, 3],
  [200 * K, 100 * K, 0],
  [300 * K, M - 300 * K, 3],
  [M, 64 * K, 0],
  [M + 64 * K, 9 * M - 64 * K, 3],
  [10 * M, 4 * K, 0],
  [10 * M + 4 * K, SIZE - 10 * M - 8 * K, 3],
  [SIZE - 4 * K, 4 * K, 0],
];

function parseMap(stdout: string): Array<[number, number, number]> {
  return stdout
    .trim()
    .split('\n')
    .map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number) as [number, number, number]);
}

/** Merges neighbours of one type (qemu may split a run where its file's extents split). */
function merged(map: ReadonlyArray<[number, number, number]>): Array<[number, number, number]> {
  const out: Array<[number, number, number]> = [];
  for (const [o, l, t] of map) {
    const last = out[out.length - 1];
    if (last !== undefined && last[2] === t && last[0] + last[1] === o) last[1] += l;
    else out.push([o, l, t]);
  }
  return out;
}

/** The device's bytes as the islands define them. */
function expectedImage(): Buffer {
  const img = Buffer.alloc(SIZE);
  for (const [o, l, p] of ISLANDS) img.fill(p, o, o + l);
  return img;
}

const hole = (length: number): BlockStatusExtent => ({ length, hole: true });
const data = (length: number): BlockStatusExtent => ({ length, hole: false });

describe('statusToExtents', () => {
  it('maps holes to 3 and data to 0, merges, caps, clips and fills what a backend left out', () => {
    expect(statusToExtents([data(10), hole(20), data(5)], 35, 100)).toEqual([10, 0, 20, 3, 5, 0]);
    // REQ_ONE: one extent, no longer than the request.
    expect(statusToExtents([hole(4096), data(10)], 4106, 1)).toEqual([4096, 3]);
    expect(statusToExtents([hole(4096)], 4096, 1)).toEqual([4096, 3]);
    // Capped: the answer ends early, the client asks again.
    expect(statusToExtents([data(1), hole(1), data(1), hole(1)], 4, 2)).toEqual([1, 0, 1, 3]);
    // A backend's sloppy answer still makes a valid reply.
    expect(statusToExtents([hole(5), hole(5), data(0), data(100)], 50, 10)).toEqual([10, 3, 40, 0]);
    expect(statusToExtents([hole(5)], 50, 10)).toEqual([5, 3, 45, 0]);
    expect(statusToExtents([], 50, 1)).toEqual([50, 0]);
  });
});

describe('base:allocation and sparse READ replies', () => {
  let server: NbdServer;
  let port: number;
  let mem: Disk;
  let dir: string;
  let uri: string;
  const children: ChildProcess[] = [];

  beforeAll(async () => {
    dir = tmpDir('alloc');
    mem = createDiskSync({ name: `alloc${process.pid}`, backend: new MemoryBackend({ sizeBytes: SIZE }) });
    server = createNbdServer({ exports: { disk: { device: mem.part0, writable: true } } });
    const addr = await server.listen(0);
    port = addr.kind === 'tcp' ? addr.port : 0;
    uri = `nbd://127.0.0.1:${port}/disk`;
    // Written through the server by qemu-io, as the reference gets them.
    if (has('qemu-io')) await runOk('qemu-io', ['-f', 'raw', uri, ...WRITES.flatMap((w) => ['-c', w])]);
    else for (const [o, l, p] of ISLANDS) await blkdevWrite(mem.part0, o, Buffer.alloc(l, p));
  });

  afterAll(async () => {
    for (const c of children) c.kill('SIGKILL');
    await server.close();
    await mem.remove();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** qemu-nbd over a sparse raw file with the same islands, on a unix socket. */
  async function reference(): Promise<string> {
    const raw = path.join(dir, 'ref.raw');
    // Made by truncation, not `qemu-img create` (which allocates the first block).
    fs.closeSync(fs.openSync(raw, 'w'));
    fs.truncateSync(raw, SIZE);
    const sock = path.join(dir, 'ref.sock');
    const child = spawn('qemu-nbd', ['-f', 'raw', '-x', 'disk', '-t', '-e', '4', '-k', sock, raw], { stdio: 'ignore' });
    children.push(child);
    await waitForListener(sock); // the file exists before qemu-nbd listens
    const refUri = `nbd+unix:///disk?socket=${sock}`;
    await runOk('qemu-io', ['-f', 'raw', refUri, ...WRITES.flatMap((w) => ['-c', w])]);
    return refUri;
  }

  it('answers BLOCK_STATUS from the allocation map, with REQ_ONE, at least one extent per request', async () => {
    const c = await RawNbd.connect(port);
    await c.handshake({ exportName: 'disk', contexts: ['base:allocation'] });
    const ask = async (flags: number, offset: number, length: number): Promise<number[]> => {
      c.request(NbdCmd.BLOCK_STATUS, flags, 1, offset, length);
      const r = await c.reply();
      expect(r.errno).toBe(0);
      expect(r.chunks).toHaveLength(1);
      const p = r.chunks[0]?.payload as Buffer;
      expect(p.readUInt32BE(0)).toBe(0); // the context id SET_META_CONTEXT gave
      const out: number[] = [];
      for (let i = 4; i < p.length; i += 4) out.push(p.readUInt32BE(i));
      return out;
    };
    expect(await ask(0, 0, M)).toEqual([4 * K, 0, 196 * K, 3, 100 * K, 0, M - 300 * K, 3]);
    expect(await ask(NbdCmdFlag.REQ_ONE, 0, M)).toEqual([4 * K, 0]);
    expect(await ask(NbdCmdFlag.REQ_ONE, 8 * K, 4 * K)).toEqual([4 * K, 3]);
    expect(await ask(NbdCmdFlag.REQ_ONE, 8 * K, M)).toEqual([192 * K, 3]);
    // Unaligned: byte granular, like qemu-nbd.
    expect(await ask(0, 4 * K - 1, 2)).toEqual([1, 0, 1, 3]);
    expect(await ask(0, SIZE - 1, 1)).toEqual([1, 0]);
    c.close();
  });

  it('sends OFFSET_HOLE for holes in large structured READs; small, DF and simple READs carry the data', async () => {
    const img = expectedImage();
    const c = await RawNbd.connect(port);
    await c.handshake({ exportName: 'disk' });
    // [0, 2 MiB): data 4K, hole, data 100K, hole, data 64K, hole.
    c.request(NbdCmd.READ, 0, 1, 0, 2 * M);
    const r = await c.reply();
    expect(r.errno).toBe(0);
    const chunks = r.chunks.map((ch) => [
      ch.type,
      readU64(ch.payload, 0),
      ch.type === NbdReplyType.OFFSET_HOLE ? ch.payload.readUInt32BE(8) : ch.payload.length - 8,
    ]);
    expect(chunks).toEqual([
      [NbdReplyType.OFFSET_DATA, 0, 4 * K],
      [NbdReplyType.OFFSET_HOLE, 4 * K, 196 * K],
      [NbdReplyType.OFFSET_DATA, 200 * K, 100 * K],
      [NbdReplyType.OFFSET_HOLE, 300 * K, M - 300 * K],
      [NbdReplyType.OFFSET_DATA, M, 64 * K],
      [NbdReplyType.OFFSET_HOLE, M + 64 * K, M - 64 * K],
    ]);
    expect(r.chunks.map((ch) => ch.flags & NbdReplyFlag.DONE)).toEqual([0, 0, 0, 0, 0, NbdReplyFlag.DONE]);
    for (const ch of r.chunks) {
      if (ch.type !== NbdReplyType.OFFSET_DATA) continue;
      const o = readU64(ch.payload, 0);
      expect(ch.payload.subarray(8).equals(img.subarray(o, o + ch.payload.length - 8))).toBe(true);
    }
    // All data: one chunk, as before.
    c.request(NbdCmd.READ, 0, 2, 200 * K, 100 * K);
    expect((await c.reply()).chunks.map((ch) => ch.type)).toEqual([NbdReplyType.OFFSET_DATA]);
    // DF: one content chunk with the zeros in it.
    c.request(NbdCmd.READ, NbdCmdFlag.DF, 3, 0, 2 * M);
    const df = await c.reply();
    expect(df.chunks).toHaveLength(1);
    expect(df.data?.equals(img.subarray(0, 2 * M))).toBe(true);
    // Under the threshold: no block status asked, the zeros are sent.
    c.request(NbdCmd.READ, 0, 4, 8 * K, 4 * K);
    const small = await c.reply();
    expect(small.chunks.map((ch) => ch.type)).toEqual([NbdReplyType.OFFSET_DATA]);
    expect(small.data?.equals(Buffer.alloc(4 * K))).toBe(true);
    c.close();
    // Simple replies have no holes: the data, byte for byte.
    const s = await RawNbd.connect(port);
    await s.handshake({ exportName: 'disk', structured: false });
    s.request(NbdCmd.READ, 0, 5, 0, 2 * M);
    expect((await s.reply(2 * M)).data?.equals(img.subarray(0, 2 * M))).toBe(true);
    s.close();
  });

  it.skipIf(!has('nbdinfo', 'qemu-nbd', 'qemu-io', 'qemu-img'))(
    'nbdinfo --map and qemu-img map agree with qemu-nbd serving the same layout from a sparse raw file',
    async () => {
      const ours = parseMap((await runOk('nbdinfo', ['--map', uri])).stdout);
      expect(ours).toEqual(EXPECTED_MAP);
      const refUri = await reference();
      const theirs = parseMap((await runOk('nbdinfo', ['--map', refUri])).stdout);
      // qemu answers from SEEK_DATA/SEEK_HOLE on its file: same map at 4 KiB granularity.
      expect(merged(theirs)).toEqual(EXPECTED_MAP);
      expect(merged(ours)).toEqual(merged(theirs));
      // nbdinfo's own words for the types.
      expect((await runOk('nbdinfo', ['--map', uri])).stdout).toMatch(/3\s+hole,zero\n/);
      type QMap = Array<{ start: number; length: number; data: boolean; zero: boolean }>;
      const qOurs = JSON.parse((await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', uri])).stdout) as QMap;
      const qTheirs = JSON.parse((await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', refUri])).stdout) as QMap;
      const norm = (m: QMap): Array<[number, number, number]> => merged(m.map((e) => [e.start, e.length, e.data ? 0 : e.zero ? 3 : 1]));
      expect(norm(qOurs)).toEqual(EXPECTED_MAP);
      expect(norm(qOurs)).toEqual(norm(qTheirs));
      // And the bytes behind both maps are the same.
      await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, refUri], { timeoutMs: 30_000 });
    },
  );

  it.skipIf(!has('qemu-io'))('qemu-io reads zeros from holes and the patterns from data through sparse replies', async () => {
    const reads = [
      'read -P 0 8k 128k', // a hole
      'read -P 0 2M 8M', // a long hole
      'read -P 0x22 200k 100k', // data
      'read -P 0x33 1M 64k',
      'read -P 0x44 10M 512',
      `read -P 0 ${10 * M + 512} 3584`, // the rest of the allocated page: zeros, sent as data
      `read -P 0x55 ${SIZE - 4 * K} 4k`,
    ];
    const ok = await run('qemu-io', ['-f', 'raw', uri, ...reads.flatMap((c) => ['-c', c])]);
    expect(ok.code, ok.stderr + ok.stdout).toBe(0);
    expect(ok.stdout).not.toMatch(/Pattern verification failed|error/i);
    // A wrong pattern over a hole is caught: the hole really reads as zeros.
    expect((await run('qemu-io', ['-f', 'raw', uri, '-c', 'read -P 0x11 8k 128k'])).code).toBe(1);
  });

  it.skipIf(!fs.existsSync(SYSTEM_PYTHON))('libnbd pread across holes and data returns the device bytes', async () => {
    const script = [
      'import nbd, hashlib, sys',
      'h = nbd.NBD()',
      `h.connect_uri('${uri}')`,
      'assert h.get_structured_replies_negotiated()',
      'm = hashlib.sha256()',
      'for off in range(0, h.get_size(), 4 << 20):',
      '    m.update(h.pread(4 << 20, off))',
      'print(m.hexdigest())',
      'h.shutdown()',
    ].join('\n');
    const r = await run(SYSTEM_PYTHON, ['-c', script], { timeoutMs: 30_000 });
    if (r.stderr.includes("No module named 'nbd'")) {
      console.warn('[nbd tests] python3-libnbd missing: sparse pread not checked');
      return;
    }
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(crypto.createHash('sha256').update(expectedImage()).digest('hex'));
  });

  it.skipIf(!has('nbdcopy'))('nbdcopy of the sparse export to a file is byte-exact (and the copy is sparse)', async () => {
    const out = path.join(dir, 'copy.raw');
    await runOk('nbdcopy', ['--request-size=1048576', uri, out], { timeoutMs: 30_000 });
    expect(fs.readFileSync(out).equals(await blkdevRead(mem.part0, 0, SIZE))).toBe(true);
    expect(fs.readFileSync(out).equals(expectedImage())).toBe(true);
    // nbdcopy skipped the holes it was told about: far fewer blocks than 64 MiB.
    expect(fs.statSync(out).blocks * 512).toBeLessThan(8 * M);
  });

  it.skipIf(!has('nbdinfo'))('a file-backed export (holes from lseek) and a linear device over memory answer as their backends can', async () => {
    const filePath = path.join(dir, 'f.raw');
    const file = await createDisk({ name: `allocf${process.pid}`, backend: await FileBackend.open(filePath, { create: { sizeBytes: 4 * M } }), scanPartitions: false });
    server.addExport('file', { device: file.part0 });
    const lin = createDiskSync({ name: `allocl${process.pid}`, backend: new LinearBackend(mem.part0, { startSect: (M - 64 * K) / 512, nrSects: M / 512 }) });
    server.addExport('lin', { device: lin.part0 });
    try {
      // The file's holes where @blkfilter/native loaded (as qemu-nbd reports a sparse raw file),
      // else all data.
      await blkdevWrite(file.part0, M, Buffer.alloc(64 * K, 5));
      const holes = file.backend.blockStatus !== undefined;
      expect(parseMap((await runOk('nbdinfo', ['--map', `nbd://127.0.0.1:${port}/file`])).stdout)).toEqual(
        holes ? [[0, M, 3], [M, 64 * K, 0], [M + 64 * K, 3 * M - 64 * K, 3]] : [[0, 4 * M, 0]],
      );
      expect(parseMap((await runOk('nbdinfo', ['--map', `nbd://127.0.0.1:${port}/lin`])).stdout)).toEqual([
        [0, 64 * K, 3],
        [64 * K, 64 * K, 0],
        [128 * K, M - 128 * K, 3],
      ]);
    } finally {
      server.removeExport('file');
      server.removeExport('lin');
      await lin.remove();
      await file.remove();
    }
  });
});
