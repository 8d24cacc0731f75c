import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { BlkStatus, blkdevRead, createDisk, disableBioDebug, enableBioDebug, type Disk } from '@blkfilter/bio';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClientBackend, type NbdClientState } from './client.js';
import { createNbdServer, type NbdServer } from './server.js';
import { missingTools, run, tmpDir, waitForListener } from './test-helpers.js';

// The remote storage goes away under load and comes back: nbdkit is killed (SIGKILL) while fio
// writes and verifies through our server and the NBD client backend, and restarted on the same
// socket 1 s later. fio must see no error and every block must verify; every bio completes
// once. BLKFILTER_NBD_RESTARTS sets the number of restarts (default 5; run 20 for the issue).

const RESTARTS = Number(process.env.BLKFILTER_NBD_RESTARTS ?? 5);
const missing = missingTools('nbdkit', 'fio', 'nbdinfo');
let seq = 0;
const name = (p: string): string => `${p}${process.pid}x${seq++}`;

function until(cond: () => boolean, what: string, timeoutMs = 30_000): Promise<void> {
  const t0 = Date.now();
  return new Promise((resolve, reject) => {
    const tick = (): void => {
      if (cond()) resolve();
      else if (Date.now() - t0 > timeoutMs) reject(new Error(`timed out waiting for ${what}`));
      else setTimeout(tick, 10);
    };
    tick();
  });
}

describe.skipIf(missing.length > 0)('NbdClientBackend when nbdkit is killed and restarted', () => {
  let dir: string;
  let sock: string;
  let img: string;
  let nbdkit: ChildProcess | null = null;

  const startNbdkit = async (): Promise<void> => {
    fs.rmSync(sock, { force: true });
    const child = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', sock, 'file', img], { stdio: ['ignore', 'ignore', 'inherit'] });
    nbdkit = child;
    await waitForListener(sock);
  };
  const killNbdkit = async (): Promise<void> => {
    const child = nbdkit as ChildProcess;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await exited;
    nbdkit = null;
  };

  beforeAll(() => {
    dir = tmpDir('restart');
    sock = path.join(dir, 'nbdkit.sock');
    img = path.join(dir, 'disk.raw');
    fs.writeFileSync(img, Buffer.alloc(0));
    fs.truncateSync(img, 64 << 20);
  });
  afterAll(() => {
    nbdkit?.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it(`fio (verify=crc32c, QD16) sees no error across ${RESTARTS} restarts of nbdkit`, async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    let server: NbdServer | null = null;
    let disk: Disk | null = null;
    try {
      await startNbdkit();
      const backend = await NbdClientBackend.connect({ path: sock, connections: 4, retryForMs: 30_000 });
      expect(backend.status.connections).toBe(4);
      const states: NbdClientState[] = [];
      backend.onStateChange((s) => states.push(s));
      disk = await createDisk({ name: name('remote'), backend, scanPartitions: false });
      server = createNbdServer({ exports: { d: { device: disk.part0, writable: true } } });
      const addr = await server.listen(0);
      const port = addr.kind === 'tcp' ? addr.port : 0;
      const sent = (): number => backend.status.requestsPerConnection.reduce((a, b) => a + b, 0);
      // Long enough never to end before the restarts do (a loaded machine is slow); stopped
      // with SIGINT once they are done, after which fio still verifies and reports.
      const runtime = RESTARTS * 60 + 60;
      const stopFio = new AbortController();
      const fio = run(
        'fio',
        [
          '--name=restart', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${port}/d`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
          '--size=32M', '--verify=crc32c', '--verify_backlog=256', '--verify_fatal=1', '--verify_state_save=0',
          '--time_based', `--runtime=${runtime}`, '--output-format=json',
        ],
        { timeoutMs: (runtime + 60) * 1000, cwd: dir, stop: stopFio.signal },
      );
      let restarts = 0;
      for (let i = 0; i < RESTARTS; i++) {
        // Kill it while I/O flows (some requests sent since the last reconnect), restart 1 s later.
        const mark = sent();
        await until(() => sent() > mark + 500, 'I/O to flow');
        await killNbdkit();
        await new Promise((r) => setTimeout(r, 1000));
        await startNbdkit();
        await until(() => backend.state === 'connected', 'the backend to reconnect');
        restarts++;
      }
      // Some I/O after the last reconnect, then stop.
      const mark = sent();
      await until(() => sent() > mark + 500, 'I/O to flow after the last restart');
      stopFio.abort();
      const r = await fio;
      const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: Array<{ error: number; write: { io_bytes: number }; read: { io_bytes: number } }> };
      const job = json.jobs[0] as (typeof json.jobs)[number];
      // 0, or 128 when our SIGINT ended the time-based run (its results are complete).
      expect([0, 128], r.stderr).toContain(r.code);
      expect(job.error).toBe(0);
      expect(r.stderr).not.toMatch(/verify|bad|error/i);
      expect(job.write.io_bytes).toBeGreaterThan(0);
      // verify_backlog: the blocks written were read back and checked along the way.
      expect(job.read.io_bytes).toBeGreaterThan(job.write.io_bytes / 2);
      expect(restarts).toBe(RESTARTS);
      expect(backend.status.reconnects).toBeGreaterThanOrEqual(RESTARTS * 4);
      expect(states.filter((s) => s === 'degraded').length).toBe(RESTARTS);
      console.log(`[restart] ${restarts} restarts of nbdkit under fio: ${(job.write.io_bytes / 1048576).toFixed(0)} MiB written, ${(job.read.io_bytes / 1048576).toFixed(0)} MiB verified, ${backend.status.reconnects} reconnects`);
    } finally {
      await server?.close();
      await disk?.remove();
      disableBioDebug();
    }
    tracker.assertAllCompleted();
    expect(tracker.completed).toBe(tracker.submitted);
  }, 600_000);

  it('after the retry window: bios fail with IOERR naming the server, no hang, and the server stays up', async () => {
    if (nbdkit === null) await startNbdkit();
    const backend = await NbdClientBackend.connect({ path: sock, retryForMs: 500 });
    const disk = await createDisk({ name: name('gone'), backend, scanPartitions: false });
    const server = createNbdServer({ exports: { d: { device: disk.part0, writable: true } } });
    const addr = await server.listen(0);
    const port = addr.kind === 'tcp' ? addr.port : 0;
    await killNbdkit();
    const failed = new Promise<void>((resolve) => backend.onStateChange((s) => s === 'failed' && resolve()));
    const read = blkdevRead(disk.part0, 0, 4096).then(
      () => null,
      (err: Error) => err,
    );
    await failed;
    const err = await read;
    expect(err?.message).toMatch(/NBD server nbd\+unix:\/\/\/\?socket=.*nbdkit\.sock unreachable for 0\.5 s, giving up/);
    // nbdkit comes back after the window: the device stays failed (clean IOERR), the server answers.
    await startNbdkit();
    const qio = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4096', `nbd://127.0.0.1:${port}/d`]);
    expect(qio.stdout + qio.stderr).toMatch(/Input\/output error/);
    const info = await run('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/d`]);
    expect(info.stdout.trim()).toBe(String(64 << 20));
    expect(backend.status.state).toBe('failed');
    expect(BlkStatus.IOERR).toBeDefined();
    await server.close();
    await disk.remove();
  });
});
