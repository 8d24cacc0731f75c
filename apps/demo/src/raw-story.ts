// The raw-image story (`npm run demo` where the machine cannot mount a kernel filesystem, or
// `npm run demo -- --raw`): the job blkfilter is for, on raw blocks. A 1 GiB sparse image with
// a GPT table is served over NBD with CBT; a workload writes to it through NBD; snapshot 1 is taken and backed up in full; more writes run while snapshot 2 is
// taken and backed up incrementally; both points are restored into new images and checked
// against what the snapshots showed at their instants (sha256, and qemu-img compare when
// qemu-img is installed). Exits non-zero if any check fails.
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Bio, blkdevRead, blkdevWrite, createDiskSync, ReqOp, submitBioWait, type Disk } from '@blkfilter/bio';
import { buildMbr } from '@blkfilter/bio/testing';
import { callControl, startDaemon, type Daemon } from '@blkfilter/cli';
import { NbdClientBackend } from '@blkfilter/nbd';
import { check, GiB, MiB, mib, say, withCleanup } from './story.js';

const SIZE = GiB;

const have = (tool: string): boolean => spawnSync(tool, ['--version'], { stdio: 'ignore' }).status === 0;

/** Writes a GPT with two partitions: sfdisk when present, else our own minimal table. */
function makeImage(file: string): string {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, SIZE);
  if (have('sfdisk')) {
    execFileSync('sfdisk', ['-q', file], { input: 'label: gpt\nname=data, size=640M\nname=logs\n' });
    return 'GPT (sfdisk): data 640 MiB, logs the rest';
  }
  // Without sfdisk: an MBR with two partitions keeps the story going.
  const mbr = buildMbr([
    [2048, 640 * 2048],
    [2048 + 640 * 2048, (SIZE >> 9) - 2048 - 640 * 2048],
  ]);
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, mbr, 0, 512, 0);
  fs.closeSync(fd);
  return 'MBR (sfdisk not installed): two partitions';
}

async function sha256Of(disk: Disk): Promise<string> {
  const h = createHash('sha256');
  const step = 8 * MiB;
  for (let off = 0; off < disk.capacity * 512; off += step) h.update(await blkdevRead(disk.part0, off, step));
  return h.digest('hex');
}

/** Runs the raw-image story; failed checks are counted in story.ts. */
export async function rawStory(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-demo-'));
  const image = path.join(dir, 'vm.raw');
  const control = path.join(dir, 'control.sock');
  const backups = path.join(dir, 'backups');
  const clients: Disk[] = [];
  say(`working in ${dir}`);
  let daemon: Daemon | null = null;
  await withCleanup(
    async () => {
      const table = makeImage(image);
      say(`created a 1 GiB sparse image with ${table}`);

      daemon = await startDaemon({ sources: [image], cbt: true, listen: '127.0.0.1:0', control, stateDir: path.join(dir, 'state') });
      const addr = daemon.nbdAddress;
      const port = addr.kind === 'tcp' ? addr.port : 0;
      const ctl = (method: string, params: Record<string, unknown> = {}): Promise<unknown> => callControl(control, method, params);
      const status = (await ctl('status')) as { devices: Array<{ name: string; partitions: Array<{ name: string }> }> };
      const dev = status.devices[0];
      say(`serving nbd://127.0.0.1:${port}/${dev?.name} with CBT; partitions exported as ${dev?.partitions.map((p) => p.name).join(', ')}`);

      // The workload reaches the device the way a VM would: over NBD, through our client.
      const connect = async (name: string): Promise<Disk> => {
        const d = createDiskSync({ name: `demo-client-${name}-${clients.length}`, backend: await NbdClientBackend.connect({ port, exportName: name }), scanPartitions: false });
        clients.push(d);
        return d;
      };
      const data = await connect('vm1');
      const logs = await connect('vm2');
      const write = async (d: Disk, bytes: number, seed: number): Promise<number> => {
        let written = 0;
        for (let i = 0; written < bytes; i++) {
          const len = [4096, 65536, MiB][(i + seed) % 3] as number;
          const off = (((i * 7919 + seed * 104729) % Math.floor((d.capacity * 512 - len) / 4096)) * 4096);
          await blkdevWrite(d.part0, off, randomBytes(len));
          written += len;
        }
        return written;
      };
      let t = performance.now();
      const w1 = (await write(data, 48 * MiB, 1)) + (await write(logs, 16 * MiB, 2));
      await submitBioWait(new Bio(ReqOp.FLUSH, data.part0, 0, 0));
      say(`workload: wrote ${mib(w1)} through NBD in ${((performance.now() - t) / 1000).toFixed(1)} s`);

      // Snapshot 1, quiet device: its image must equal the device right now.
      const s1 = (await ctl('snapshot.create', { devices: ['vm'], storage: 'memory', limitBytes: 512 * MiB })) as { id: string };
      const taken1 = (await ctl('snapshot.take', { id: s1.id })) as { images: string[] };
      const img1 = await connect(taken1.images[0] as string);
      const h1 = await sha256Of(img1);
      const vmView = await connect('vm');
      check('snapshot 1 image equals the device at its instant', h1 === (await sha256Of(vmView)), `sha256 ${h1.slice(0, 16)}...`);
      t = performance.now();
      const b1 = (await ctl('backup', { snapshot: s1.id, to: backups })) as { entry: { kind: string; bytesRead: number; bytesWritten: number; file: string } };
      say(`backup 1: ${b1.entry.kind}, read ${mib(b1.entry.bytesRead)}, stored ${mib(b1.entry.bytesWritten)} in ${b1.entry.file} (${((performance.now() - t) / 1000).toFixed(1)} s)`);
      await ctl('snapshot.destroy', { id: s1.id });
      await clients.splice(clients.indexOf(img1), 1)[0]?.remove();

      // More writes, with snapshot 2 taken while they run.
      const s2 = (await ctl('snapshot.create', { devices: ['vm'], storage: path.join(dir, 'diff'), limitBytes: 512 * MiB })) as { id: string };
      // The writer keeps going across the take: some writes land before it, some after.
      let during = 0;
      let taken = false;
      let afterTake = 0;
      const one = async (d: Disk, i: number): Promise<number> => {
        const len = [4096, 65536, MiB][i % 3] as number;
        const off = ((i * 7919 + 31337) % Math.floor((d.capacity * 512 - len) / 4096)) * 4096;
        await blkdevWrite(d.part0, off, randomBytes(len));
        return len;
      };
      const writer = (async () => {
        for (let i = 0; !(taken && afterTake >= 4 * MiB); i++) {
          const startedAfterTake = taken;
          const n = await one(i % 2 === 0 ? data : logs, i);
          during += n;
          if (startedAfterTake) afterTake += n;
        }
      })();
      while (during < 8 * MiB) await new Promise((r) => setTimeout(r, 5));
      const taken2 = (await ctl('snapshot.take', { id: s2.id })) as { images: string[] };
      taken = true;
      await writer;
      const img2 = await connect(taken2.images[0] as string);
      const h2 = await sha256Of(img2);
      say(`snapshot 2 taken while a writer ran (${mib(during)} written in all, ${mib(afterTake)} after the take); image sha256 ${h2.slice(0, 16)}...`);
      check('the device moved on after snapshot 2 (writes kept going)', (await sha256Of(vmView)) !== h2);
      t = performance.now();
      const b2 = (await ctl('backup', { snapshot: s2.id, to: backups })) as { entry: { kind: string; bytesRead: number; bytesWritten: number; changedBytes: number; file: string } };
      say(`backup 2: ${b2.entry.kind}, CBT changed ${mib(b2.entry.changedBytes)}, read ${mib(b2.entry.bytesRead)}, stored ${mib(b2.entry.bytesWritten)} in ${b2.entry.file} (${((performance.now() - t) / 1000).toFixed(1)} s)`);
      check('backup 2 is incremental', b2.entry.kind === 'incremental');
      check('backup 2 read at most 1.05x what CBT reported changed', b2.entry.bytesRead <= b2.entry.changedBytes * 1.05, `${mib(b2.entry.bytesRead)} read for ${mib(b2.entry.changedBytes)} changed`);

      // Restore both points into new images and check them.
      const { restore } = await import('@blkfilter/backup');
      for (const [at, expected] of [[1, h1], [2, h2]] as const) {
        t = performance.now();
        const out = path.join(dir, `restored-${at}.raw`);
        const r = await restore(backups, { to: out, at, hash: true });
        check(`restore of point ${at} equals snapshot ${at} at its instant`, r.sha256 === expected, `sha256 ${r.sha256?.slice(0, 16)}... in ${((performance.now() - t) / 1000).toFixed(1)} s`);
        if (have('qemu-img')) {
          const top = path.join(backups, at === 1 ? b1.entry.file : b2.entry.file);
          const cmp = spawnSync('qemu-img', ['compare', '-q', '-F', 'raw', top, out]);
          check(`qemu-img compare ${path.basename(top)} (with its backing chain) vs restored-${at}.raw`, cmp.status === 0);
          const chk = spawnSync('qemu-img', ['check', top]);
          check(`qemu-img check ${path.basename(top)}`, chk.status === 0);
        }
      }
      if (!have('qemu-img')) say('qemu-img is not installed: skipped the qemu-img checks (apt-get install qemu-utils)');
      await ctl('snapshot.destroy', { id: s2.id });
    },
    async () => {
      for (const c of clients) await c.remove().catch(() => {});
      await daemon?.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  );
}
