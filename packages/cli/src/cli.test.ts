import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

// The real command, as a user runs it: `node dist/cli.js` (built before tests run).
const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');
const tools = ['qemu-io', 'qemu-img', 'sfdisk', 'nbdinfo'].every((t) => spawnSync(t, ['--version'], { stdio: 'ignore' }).status === 0);

let dir: string;
let control: string;
let daemon: ChildProcess;
let port: number;

function blk(...args: string[]): { code: number; out: string; err: string } {
  const r = spawnSync(process.execPath, [CLI, '--control', control, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { code: r.status ?? -1, out: r.stdout, err: r.stderr };
}
function ok(...args: string[]): string {
  const r = blk(...args);
  if (r.code !== 0) throw new Error(`blkfilter ${args.join(' ')} exited ${r.code}: ${r.err}`);
  return r.out;
}

describe.skipIf(!tools)('the blkfilter command', () => {
  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-cli-'));
    control = path.join(dir, 'ctl.sock');
    const img = path.join(dir, 'vm.raw');
    fs.writeFileSync(img, '');
    fs.truncateSync(img, 32 << 20);
    execFileSync('sfdisk', ['-q', img], { input: 'label: gpt\n,8M\n,\n' });
    daemon = spawn(process.execPath, [CLI, '--control', control, 'serve', '--state-dir', path.join(dir, 'state'), '--cbt', '--listen', '127.0.0.1:0', img], { stdio: ['ignore', 'ignore', 'pipe'] });
    let log = '';
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`daemon did not start: ${log}`)), 20_000);
      daemon.stderr?.on('data', (d: Buffer) => {
        log += d.toString();
        if (log.includes('ready')) {
          clearTimeout(t);
          resolve();
        }
      });
      daemon.on('exit', (code) => reject(new Error(`daemon exited ${code}: ${log}`)));
    });
    port = (JSON.parse(ok('status', '--json')) as { nbd: { port: number } }).nbd.port;
  });
  afterAll(async () => {
    if (daemon.exitCode === null && daemon.signalCode === null) {
      daemon.kill('SIGTERM');
      await new Promise((r) => daemon.once('exit', r));
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('serves the image and its partitions over NBD with CBT attached', () => {
    const status = JSON.parse(ok('status', '--json')) as { devices: Array<{ name: string; partitions: unknown[]; filters: Array<{ name: string }> }> };
    expect(status.devices[0]?.name).toBe('vm');
    expect(status.devices[0]?.partitions).toHaveLength(2);
    expect(status.devices[0]?.filters.map((f) => f.name)).toEqual(['cbt']);
    const table = JSON.parse(execFileSync('sfdisk', ['--json', path.join(dir, 'vm.raw')], { encoding: 'utf8' })) as { partitiontable: { partitions: Array<{ size: number }> } };
    const p2 = table.partitiontable.partitions[1]?.size ?? 0;
    expect(execFileSync('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/vm2`], { encoding: 'utf8' }).trim()).toBe(String(p2 * 512));
  });

  it('backs up full then incremental, restores each point exactly, and exits 4 when verify differs', () => {
    const io = (cmd: string, exportName = 'vm'): void => void execFileSync('qemu-io', ['-f', 'raw', `nbd://127.0.0.1:${port}/${exportName}`, '-c', cmd], { stdio: 'ignore' });
    io('write -P 0x11 4M 3M');
    const s1 = (JSON.parse(ok('snapshot', 'create', 'vm', '--storage', 'memory', '--json')) as { id: string }).id;
    const taken = JSON.parse(ok('snapshot', 'take', s1, '--json')) as { images: string[] };
    const image = taken.images[0] as string;
    io('write -P 0x22 5M 64k'); // after take: the image must not see it
    execFileSync('qemu-io', ['-f', 'raw', '-r', `nbd://127.0.0.1:${port}/${image}`, '-c', 'read -P 0x11 5M 64k'], { stdio: 'ignore' });
    const bk = path.join(dir, 'bk');
    const full = JSON.parse(ok('backup', s1, '--to', bk, '--json')) as { entry: { kind: string } };
    expect(full.entry.kind).toBe('full');
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', `nbd://127.0.0.1:${port}/${image}`, path.join(dir, 'at1.raw')]);
    ok('snapshot', 'destroy', s1);

    io('write -P 0x33 20M 128k');
    const s2 = (JSON.parse(ok('snapshot', 'create', 'vm', '--storage', path.join(dir, 'diff'), '--limit', '64M', '--json')) as { id: string }).id;
    const image2 = (JSON.parse(ok('snapshot', 'take', s2, '--json')) as { images: string[] }).images[0] as string;
    // The snapshot image carries CBT as qemu's dirty bitmap: what changed since take 1.
    const map = execFileSync('nbdinfo', [`--map=qemu:dirty-bitmap:cbt`, `nbd://127.0.0.1:${port}/${image2}`], { encoding: 'utf8' });
    expect(map).toMatch(/5242880\s+65536\s+1\s+dirty/);
    expect(map).toMatch(/20971520\s+131072\s+1\s+dirty/);
    const inc = JSON.parse(ok('backup', s2, '--to', bk, '--json')) as { entry: { kind: string; bytesRead: number } };
    expect(inc.entry.kind).toBe('incremental');
    expect(inc.entry.bytesRead).toBe(65536 + 131072);
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', `nbd://127.0.0.1:${port}/${image2}`, path.join(dir, 'at2.raw')]);

    ok('restore', bk, '--at', '1', '--to', path.join(dir, 'r1.raw'));
    ok('restore', bk, '--to', path.join(dir, 'r2.raw'));
    expect(fs.readFileSync(path.join(dir, 'r1.raw')).equals(fs.readFileSync(path.join(dir, 'at1.raw')))).toBe(true);
    expect(fs.readFileSync(path.join(dir, 'r2.raw')).equals(fs.readFileSync(path.join(dir, 'at2.raw')))).toBe(true);
    execFileSync('qemu-img', ['compare', '-q', '-F', 'raw', path.join(bk, '0002-vm.qcow2'), path.join(dir, 'at2.raw')]);
    expect(blk('verify', bk, '--against', path.join(dir, 'at2.raw')).code).toBe(0);
    expect(blk('verify', bk, '--at', '1', '--against', path.join(dir, 'at2.raw')).code).toBe(4);

    // Offline verify, the same take twice, an existing target, a missing folder.
    expect(ok('verify', bk)).toMatch(/^ok: 2 image\(s\)/);
    const again = blk('backup', s2, '--to', bk);
    expect(again.code).toBe(1);
    expect(again.err).toMatch(/already point 2 .*take a new snapshot/);
    expect(JSON.parse(ok('backups', bk, '--json')).points).toHaveLength(2);
    const exists = blk('restore', bk, '--to', path.join(dir, 'r1.raw'));
    expect(exists.code).toBe(1);
    expect(exists.err).toMatch(/exists \(EEXIST\).*--force/);
    ok('restore', bk, '--at', '1', '--to', path.join(dir, 'r1.raw'), '--force');
    const missing = blk('backups', path.join(dir, 'nonexistent'));
    expect(missing.code).toBe(1);
    expect(missing.err).toMatch(/does not exist/);

    // A damaged copy: exit 5 naming the file, nothing written, the intact point still restores.
    const bad = path.join(dir, 'bk-bad');
    fs.cpSync(bk, bad, { recursive: true });
    const incFile = path.join(bad, '0002-vm.qcow2');
    fs.truncateSync(incFile, Math.floor(fs.statSync(incFile).size / 2));
    const v = blk('verify', bad);
    expect(v.code).toBe(5);
    expect(v.out).toMatch(/DAMAGED .*0002-vm\.qcow2/);
    const r = blk('restore', bad, '--to', path.join(dir, 'bad.raw'));
    expect(r.code).toBe(5);
    expect(r.err).toMatch(/0002-vm\.qcow2/);
    expect(fs.existsSync(path.join(dir, 'bad.raw'))).toBe(false);
    expect(fs.readdirSync(dir).filter((n) => n.includes('.restoring'))).toEqual([]);
    ok('restore', bad, '--at', '1', '--to', path.join(dir, 'bad-at-1.raw'));
    expect(fs.readFileSync(path.join(dir, 'bad-at-1.raw')).equals(fs.readFileSync(path.join(dir, 'at1.raw')))).toBe(true);

    // Retention: keep the newest point only; it reads back the same.
    ok('prune', bk, '--keep-last', '1');
    expect(JSON.parse(ok('backups', bk, '--json')).points).toHaveLength(1);
    expect(ok('verify', bk)).toMatch(/^ok: 1 image/);
    execFileSync('qemu-img', ['compare', '-q', '-F', 'raw', path.join(bk, '0002-vm.qcow2'), path.join(dir, 'at2.raw')]);
  });

  it('answers bad usage with exit 2, a missing daemon with exit 3, daemon errors with exit 1', () => {
    expect(blk('frobnicate').code).toBe(2);
    expect(blk('backup').code).toBe(2);
    const none = spawnSync(process.execPath, [CLI, '--control', path.join(dir, 'none.sock'), 'status'], { encoding: 'utf8' });
    expect(none.status).toBe(3);
    expect(none.stderr).toMatch(/no blkfilter daemon/);
    const bad = blk('cbt', 'info', 'nosuchdisk');
    expect(bad.code).toBe(1);
    expect(bad.err).toMatch(/no block device named "nosuchdisk"/);
    expect(ok('--help')).toMatch(/Exit codes:/);
    for (const cmd of ['serve', 'status', 'filter list', 'filter attach', 'filter detach', 'cbt info', 'cbt map', 'cbt mark-dirty', 'snapshot create', 'snapshot take', 'snapshot info', 'snapshot list', 'snapshot destroy', 'snapshot wait-event', 'backup', 'restore', 'verify', 'prune', 'backups']) {
      expect(ok(...cmd.split(' '), '--help'), cmd).toMatch(/Example:\n {2}.*blkfilter /);
    }
  });

  it('says what was wrong with the usage line, answers --json with JSON errors, prints its version, survives a closed pipe, and explains topics', () => {
    const range = blk('cbt', 'mark-dirty', 'vm', '0:abc');
    expect(range.code).toBe(2);
    expect(range.err).toMatch(/"0:abc" is not SECTOR:COUNT[^]*usage: blkfilter cbt mark-dirty \[options\] <device> <range\.\.\.>/);
    const opts = blk('filter', 'attach', 'vm', 'cbt', '--options', '{bad json', '--json');
    expect(opts.code).toBe(2);
    expect(JSON.parse(opts.out)).toMatchObject({ error: { code: 'EUSAGE', message: expect.stringMatching(/--options \{bad json is not JSON/), exitCode: 2 } });
    const missing = blk('cbt', 'info', 'nosuchdisk', '--json');
    expect(missing.code).toBe(1);
    expect(JSON.parse(missing.out)).toMatchObject({ error: { code: 'ENOENT', message: expect.stringMatching(/no block device named "nosuchdisk"/), exitCode: 1 } });
    const pkg = JSON.parse(fs.readFileSync(path.join(path.dirname(CLI), '..', 'package.json'), 'utf8')) as { version: string };
    expect(ok('--version').trim()).toBe(pkg.version);
    // `blkfilter --help | head -1`: the reader goes away; no EPIPE crash, exit 0.
    const piped = spawnSync('sh', ['-c', `"${process.execPath}" "${CLI}" --help | head -1`], { encoding: 'utf8' });
    expect(piped.stderr).not.toMatch(/EPIPE|Unhandled/);
    expect(piped.stdout).toMatch(/^Usage: blkfilter/);
    for (const topic of ['devices', 'cbt', 'snapshots', 'backups', 'exit-codes']) expect(ok('help', topic).length, topic).toBeGreaterThan(200);
    expect(ok('help', 'snapshot', 'take')).toMatch(/Usage: blkfilter snapshot take/);
    expect(blk('help', 'nothing').code).toBe(2);
  });

  it('waits for a snapshot event, and exits 6 with a sentence (JSON only when asked) when none comes in time', () => {
    for (const s of JSON.parse(ok('snapshot', 'list', '--json')) as Array<{ id: string }>) ok('snapshot', 'destroy', s.id);
    const id = (JSON.parse(ok('snapshot', 'create', 'vm', '--storage', 'memory', '--json')) as { id: string }).id;
    const waited = blk('snapshot', 'wait-event', id, '--timeout', '1');
    expect(waited.code).toBe(6);
    expect(waited.out.trim()).toMatch(/^timeout/);
    expect(() => JSON.parse(waited.out)).toThrow();
    expect(JSON.parse(blk('snapshot', 'wait-event', id, '--timeout', '1', '--json').out)).toMatchObject({ type: 'timeout' });
    expect(JSON.parse(ok('snapshot', 'destroy', id, '--json'))).toEqual({ destroyed: id });
  });

  it('saves CBT on SIGTERM so that a restart resumes the generation', async () => {
    const before = JSON.parse(ok('cbt', 'info', 'vm', '--json')) as { generationId: string };
    daemon.kill('SIGTERM');
    const code = await new Promise((r) => daemon.once('exit', r));
    expect(code).toBe(0);
    const img = path.join(dir, 'vm.raw');
    daemon = spawn(process.execPath, [CLI, '--control', control, 'serve', '--state-dir', path.join(dir, 'state'), '--cbt', '--listen', '127.0.0.1:0', img], { stdio: ['ignore', 'ignore', 'pipe'] });
    await new Promise<void>((resolve) => daemon.stderr?.on('data', (d: Buffer) => d.toString().includes('ready') && resolve()));
    const after = JSON.parse(ok('cbt', 'info', 'vm', '--json')) as { generationId: string; generationReason: string };
    expect(after.generationId).toBe(before.generationId);
    expect(after.generationReason).toBe('resumed');
  });
});

const nbdkit = spawnSync('nbdkit', ['--version'], { stdio: 'ignore' }).status === 0;

describe.skipIf(!tools || !nbdkit)('blkfilter serve in front of another NBD server', () => {
  it('adds CBT and snapshots to an nbdkit export without touching its setup', async () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-proxy-'));
    const upstream = path.join(d, 'up.sock');
    const ctl = path.join(d, 'ctl.sock');
    const kit = spawn('nbdkit', ['-f', '-U', upstream, 'memory', '64M'], { stdio: 'ignore' });
    let proxy: ChildProcess | null = null;
    try {
      for (let i = 0; i < 100 && !fs.existsSync(upstream); i++) await new Promise((r) => setTimeout(r, 50));
      proxy = spawn(process.execPath, [CLI, '--control', ctl, 'serve', '--state-dir', path.join(d, 'state'), '--cbt', '--listen', '127.0.0.1:0', '--name', 'up', `nbd+unix:///?socket=${upstream}`], { stdio: ['ignore', 'ignore', 'pipe'] });
      await new Promise<void>((resolve, reject) => {
        let log = '';
        proxy?.stderr?.on('data', (b: Buffer) => {
          log += b.toString();
          if (log.includes('ready')) resolve();
        });
        proxy?.on('exit', (code) => reject(new Error(`proxy exited ${code}: ${log}`)));
      });
      const run = (...args: string[]): string => execFileSync(process.execPath, [CLI, '--control', ctl, ...args], { encoding: 'utf8' });
      const st = JSON.parse(run('status', '--json')) as { nbd: { port: number }; devices: Array<{ name: string; backend: string; filters: Array<{ name: string }> }> };
      expect(st.devices[0]?.backend).toMatch(/nbd/);
      expect(st.devices[0]?.filters.map((f) => f.name)).toEqual(['cbt']);
      // Written through the proxy, visible at the source; tracked by CBT.
      execFileSync('qemu-io', ['-f', 'raw', `nbd://127.0.0.1:${st.nbd.port}/up`, '-c', 'write -P 0x5c 1M 64k'], { stdio: 'ignore' });
      execFileSync('qemu-io', ['-f', 'raw', '-r', `nbd+unix:///?socket=${upstream}`, '-c', 'read -P 0x5c 1M 64k'], { stdio: 'ignore' });
      const id = (JSON.parse(run('snapshot', 'create', 'up', '--storage', 'memory', '--json')) as { id: string }).id;
      run('snapshot', 'take', id);
      const info = JSON.parse(run('cbt', 'info', 'up', '--json')) as { snapNumber: number };
      expect(info.snapNumber).toBe(1);
      const map = JSON.parse(run('cbt', 'map', 'up', '--offset', '0', '--length', '32', '--json')) as { map: number[] };
      expect(map.map[16]).toBe(1); // block 16 (1 MiB / 64 KiB) changed in generation 1
    } finally {
      proxy?.kill('SIGTERM');
      if (proxy !== null) await new Promise((r) => proxy?.once('exit', r));
      kit.kill('SIGTERM');
      fs.rmSync(d, { recursive: true, force: true });
    }
  });
});
