import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Bio, createDiskSync, submitBio, BlkStatus, type Disk } from '@blkfilter/bio';
import { NbdClientBackend } from '@blkfilter/nbd';
import { afterAll, describe, expect, it } from 'vitest';

// A daemon killed with SIGKILL in the middle of writes. What SIGKILL can check: on restart CBT
// resumes the same generation and counts every block that was written (never "nothing
// changed"), and every acknowledged write reached the image file (the daemon acknowledges only
// after the write syscall returned). What it cannot check is
// durability: the kernel's page cache outlives the process, so a write survives SIGKILL with or
// without FUA, fdatasync or FLUSH. Durability is tested with a power cut instead, in
// power-cut.test.ts (FaultBackend with powerCut: true, under an NBD client), and CBT's own
// state across power cuts in @blkfilter/cbt's power-cut.test.ts.

const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-crash-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function startServe(img: string, control: string): Promise<ChildProcess> {
  const p = spawn(process.execPath, [CLI, '--control', control, 'serve', '--state-dir', path.join(dir, 'state'), '--cbt', '--listen', '127.0.0.1:0', img], { stdio: ['ignore', 'ignore', 'pipe'] });
  return new Promise((resolve, reject) => {
    let log = '';
    p.stderr?.on('data', (b: Buffer) => {
      log += b.toString();
      if (log.includes('ready')) resolve(p);
    });
    p.once('exit', (code) => reject(new Error(`serve exited ${code}: ${log}`)));
  });
}

/** Resolves when `p` has exited, also when it already has (an 'exit' listener added late never fires). */
function exited(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((r) => p.once('exit', () => r()));
}

function ctl(control: string, ...args: string[]): unknown {
  const r = spawnSync(process.execPath, [CLI, '--control', control, ...args, '--json'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout);
}

const pattern = (i: number): Buffer => {
  const b = Buffer.alloc(4096);
  for (let o = 0; o < 4096; o += 8) {
    b.writeUInt32BE(i, o);
    b.writeUInt32BE(0xc0ffee, o + 4);
  }
  return b;
};

describe('crash of a serving daemon', () => {
  it('loses no acknowledged write to process death, and CBT resumes its generation with every written block counted', async () => {
    const img = path.join(dir, 'crash.raw');
    fs.writeFileSync(img, '');
    fs.truncateSync(img, 64 << 20);
    const control = path.join(dir, 'ctl.sock');
    let daemon = await startServe(img, control);
    const before = ctl(control, 'cbt', 'info', 'crash') as { generationId: string };
    const port = (ctl(control, 'status') as { nbd: { port: number } }).nbd.port;
    // retryForMs 0: the writers must see the daemon die, not wait for it to come back.
    const client: Disk = createDiskSync({ name: `crash-client-${process.pid}`, backend: await NbdClientBackend.connect({ port, exportName: 'crash', retryForMs: 0 }), scanPartitions: false });
    const acked: number[] = [];
    let submitted = 0;
    let killed = false;
    // 8 writers, each write to its own never-reused block; kill the daemon mid-stream.
    await new Promise<void>((resolve) => {
      let active = 8;
      const next = (): void => {
        if (killed) {
          if (--active === 0) resolve();
          return;
        }
        const i = submitted++;
        const bio = Bio.write(client.part0, i * 8, pattern(i));
        bio.endIo = (b) => {
          if (b.status === BlkStatus.OK) acked.push(i);
          if (!killed && acked.length >= 200) {
            killed = true;
            daemon.kill('SIGKILL');
          }
          setImmediate(next);
        };
        submitBio(bio);
      };
      for (let w = 0; w < 8; w++) next();
    });
    await exited(daemon);
    await client.remove();
    expect(acked.length).toBeGreaterThanOrEqual(200);
    // Every acknowledged write is in the file, exactly (in the page cache at least: see above).
    const raw = fs.readFileSync(img);
    for (const i of acked) expect(raw.subarray(i * 4096, i * 4096 + 4096).equals(pattern(i)), `block ${i}`).toBe(true);
    // The restarted daemon replays CBT's journal: the same generation, no full copy needed, and
    // every block a write was sent for (acknowledged or not) is counted as changed.
    daemon = await startServe(img, control);
    try {
      const after = ctl(control, 'cbt', 'info', 'crash') as { generationId: string; generationReason: string; blockSize: number };
      expect(after.generationReason).toBe('resumed-after-crash');
      expect(after.generationId).toBe(before.generationId);
      const id = (ctl(control, 'snapshot', 'create', 'crash', '--storage', 'memory') as { id: string }).id;
      ctl(control, 'snapshot', 'take', id);
      const map = (ctl(control, 'cbt', 'map', 'crash') as { map: number[] }).map;
      const perBlock = after.blockSize / 4096;
      for (const i of acked) expect(map[Math.floor(i / perBlock)], `block ${i} was written but CBT did not count it`).toBeGreaterThan(0);
    } finally {
      daemon.kill('SIGTERM');
      await exited(daemon);
    }
  });
});
