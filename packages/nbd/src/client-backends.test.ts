import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { blkdevFlush, blkdevRead, blkdevWrite, createDisk } from '@blkfilter/bio';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClientBackend } from './client.js';
import { missingTools, tmpDir, waitForListener } from './test-helpers.js';
import { isNbdUri, parseNbdUri } from './uri.js';

// The NBD servers users put their disks on, each through a URI as they would write it.

const missing = missingTools('nbdkit', 'qemu-nbd');
let seq = 0;
const name = (p: string): string => `${p}${process.pid}x${seq++}`;

describe('parseNbdUri', () => {
  it('reads nbd, nbds, nbd+unix and nbds+unix URIs, and derives a device name', () => {
    expect(parseNbdUri('nbd://127.0.0.1:10810/')).toEqual({ host: '127.0.0.1', port: 10810, exportName: '', defaultName: '127.0.0.1' });
    expect(parseNbdUri('nbd://storage.example/vm-disk')).toEqual({ host: 'storage.example', port: 10809, exportName: 'vm-disk', defaultName: 'vm-disk' });
    expect(parseNbdUri('nbd://[::1]:7000/a%20b')).toMatchObject({ host: '::1', port: 7000, exportName: 'a b' });
    expect(parseNbdUri('nbd+unix:///disk?socket=/run/rbd.sock')).toEqual({ path: '/run/rbd.sock', exportName: 'disk', defaultName: 'disk' });
    expect(parseNbdUri('nbd+unix:///?socket=/run/ceph-rbd0.sock')).toMatchObject({ exportName: '', defaultName: 'ceph-rbd0' });
    expect(parseNbdUri('nbds://h/e')).toMatchObject({ host: 'h', tls: {} });
    expect(isNbdUri('nbds+unix:///x?socket=/s')).toBe(true);
    expect(isNbdUri('disk.raw')).toBe(false);
    expect(() => parseNbdUri('nbd+unix:///disk')).toThrow(/needs \?socket=PATH/);
    expect(() => parseNbdUri('nbds://h/e?tls-certificates=/nonexistent')).toThrow(/ca-cert\.pem is missing/);
    expect(() => parseNbdUri('http://h/e')).toThrow(/not an NBD URI/);
  });
});

describe.skipIf(missing.length > 0)('NbdClientBackend on the common servers', () => {
  let dir: string;
  const children: ChildProcess[] = [];

  beforeAll(() => {
    dir = tmpDir('backends');
  });
  afterAll(() => {
    for (const c of children) c.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function serve(cmd: string, args: string[], sock: string): Promise<void> {
    const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'inherit'] });
    children.push(child);
    await waitForListener(sock);
  }

  async function readWrite(uri: string, connections: number): Promise<NbdClientBackend> {
    const backend = await NbdClientBackend.connect({ ...parseNbdUri(uri), connections });
    const disk = await createDisk({ name: name('srv'), backend, scanPartitions: false });
    const data = crypto.randomBytes(256 * 1024);
    await blkdevWrite(disk.part0, 1 << 20, data);
    await blkdevFlush(disk.part0);
    expect((await blkdevRead(disk.part0, 1 << 20, data.length)).equals(data)).toBe(true);
    await disk.remove();
    return backend;
  }

  it('nbdkit file', async () => {
    const img = path.join(dir, 'file.raw');
    fs.writeFileSync(img, Buffer.alloc(8 << 20));
    const sock = path.join(dir, 'file.sock');
    await serve('nbdkit', ['-f', '--exit-with-parent', '-U', sock, 'file', img], sock);
    const b = await readWrite(`nbd+unix:///?socket=${sock}`, 4);
    expect(b.status.connections).toBe(4); // the file plugin allows multi-conn
    expect(b.status.requestsPerConnection.filter((n) => n > 0).length).toBe(4);
  });

  it('nbdkit memory', async () => {
    const sock = path.join(dir, 'mem.sock');
    await serve('nbdkit', ['-f', '--exit-with-parent', '-U', sock, 'memory', '16M'], sock);
    await readWrite(`nbd+unix:///?socket=${sock}`, 4);
  });

  it('a server that caps connections (nbdkit limit filter): the client keeps the ones it got', async () => {
    const sock = path.join(dir, 'limit.sock');
    await serve('nbdkit', ['-f', '--exit-with-parent', '-U', sock, '--filter=limit', 'memory', '16M', 'limit=2'], sock);
    const b = await readWrite(`nbd+unix:///?socket=${sock}`, 4);
    // 2, or 1 while nbdkit still counts the probe that checked it listens.
    expect(b.status.connections).toBeGreaterThanOrEqual(1);
    expect(b.status.connections).toBeLessThanOrEqual(2);
  });

  it('nbdkit sparse-random', async () => {
    const sock = path.join(dir, 'sr.sock');
    await serve('nbdkit', ['-f', '--exit-with-parent', '-U', sock, 'sparse-random', '64M', 'seed=42', 'percent=50'], sock);
    const backend = await NbdClientBackend.connect(parseNbdUri(`nbd+unix:///?socket=${sock}`));
    const disk = await createDisk({ name: name('sr'), backend, scanPartitions: false });
    // The same seed gives the same data to every connection; reads agree with a second read.
    const a = await blkdevRead(disk.part0, 0, 64 << 20);
    expect(a.equals(Buffer.alloc(64 << 20))).toBe(false);
    expect((await blkdevRead(disk.part0, 0, 64 << 20)).equals(a)).toBe(true);
    // The plugin accepts only writes of the data it holds (it exists to test copying tools).
    await blkdevWrite(disk.part0, 0, a.subarray(0, 8 << 20));
    await disk.remove();
  });

  it('nbdkit curl, read-only, on a local HTTP file', async () => {
    const content = crypto.randomBytes(4 << 20);
    // A minimal HTTP server with Range support, as the curl plugin needs.
    const web = http.createServer((req, res) => {
      const m = /bytes=(\d+)-(\d*)/.exec(req.headers.range ?? '');
      if (req.method === 'HEAD' || m === null) {
        res.writeHead(200, { 'content-length': content.length, 'accept-ranges': 'bytes' });
        res.end(req.method === 'HEAD' ? undefined : content);
        return;
      }
      const start = Number(m[1]);
      const end = Math.min(content.length - 1, m[2] === '' ? Infinity : Number(m[2]));
      res.writeHead(206, { 'content-length': end - start + 1, 'content-range': `bytes ${start}-${end}/${content.length}`, 'accept-ranges': 'bytes' });
      res.end(content.subarray(start, end + 1));
    });
    await new Promise<void>((r) => web.listen(0, '127.0.0.1', r));
    const port = (web.address() as { port: number }).port;
    const sock = path.join(dir, 'curl.sock');
    await serve('nbdkit', ['-f', '--exit-with-parent', '-r', '-U', sock, 'curl', `http://127.0.0.1:${port}/disk.raw`], sock);
    const backend = await NbdClientBackend.connect({ ...parseNbdUri(`nbd+unix:///?socket=${sock}`), connections: 2 });
    expect(backend.readOnly).toBe(true);
    const disk = await createDisk({ name: name('curl'), backend, scanPartitions: false });
    expect(disk.part0.readOnly).toBe(true);
    expect((await blkdevRead(disk.part0, 0, content.length)).equals(content)).toBe(true);
    await expect(blkdevWrite(disk.part0, 0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'EROFS' });
    await disk.remove();
    await new Promise<void>((r) => web.close(() => r()));
  });

  it('qemu-nbd (multi-conn with -e 4)', async () => {
    const img = path.join(dir, 'q.raw');
    fs.writeFileSync(img, Buffer.alloc(8 << 20));
    const sock = path.join(dir, 'q.sock');
    await serve('qemu-nbd', ['-f', 'raw', '-x', 'disk', '-k', sock, '-t', '-e', '4', img], sock);
    const b = await readWrite(`nbd+unix:///disk?socket=${sock}`, 4);
    expect(b.status.connections).toBe(b.multiConn ? 4 : 1);
  });
});
