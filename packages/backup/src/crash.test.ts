// kill -9 of a backup and of a prune, at every durable step and at random moments: the
// previous chain stays intact (verify holds, every recorded point restores exactly), no point
// is half recorded, and the next backup (and prune) works and clears the leftovers.
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { content, source } from './crash-child.fixture.mjs';
import { list, prune, restore, verify, backupPoint } from './repository.js';
import { cleanup, MiB, tmpDir } from './test-util.js';

afterAll(cleanup);

const CHILD = path.join(path.dirname(fileURLToPath(import.meta.url)), 'crash-child.fixture.mjs');
const SIZE = 4 * MiB;

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

function child(args: string[], killAfterReadyMs?: number): Promise<{ code: number | null; signal: NodeJS.Signals | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [CHILD, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (killAfterReadyMs !== undefined && out.includes('ready')) setTimeout(() => p.kill('SIGKILL'), killAfterReadyMs);
    });
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    p.on('exit', (code, signal) => resolve({ code, signal, out, err }));
  });
}

async function backupInProcess(dir: string, k: number, size = SIZE): Promise<void> {
  const s = source(k, size);
  await s.ready;
  try {
    await backupPoint({ dir, sources: [s.source] });
  } finally {
    await s.disk.remove();
  }
}

/** Every recorded point restores to the content of its take (the seq numbers are the takes). */
async function checkIntact(dir: string, size = SIZE): Promise<number[]> {
  const report = await verify(dir);
  expect(report.problems).toEqual([]);
  const m = (await list(dir)).manifest;
  const seqs = m.points.map((p) => p.images[0]?.snapNumber as number);
  for (const [i, k] of seqs.entries()) {
    const r = await restore(dir, { at: i + 1, to: path.join(dir, '..', `${path.basename(dir)}-r${i}.raw`), hash: true, force: true });
    expect(r.sha256, `point ${i + 1} (take ${k})`).toBe(sha(content(k, size)));
  }
  return seqs;
}

const BACKUP_STEPS = ['copying', 'images-written', 'manifest.json:tmp-synced', 'manifest-replaced', 'images-renamed'];
const PRUNE_STEPS = ['merging', 'bases-written', 'prune-journal.json:tmp-synced', 'journal-written', 'bases-renamed', 'manifest-replaced', 'old-removed'];

describe('kill -9 of a backup', () => {
  it.each(BACKUP_STEPS)('at %s: the chain stays intact and the next backup works', async (step) => {
    const dir = path.join(tmpDir(), 'bk');
    await backupInProcess(dir, 1);
    await backupInProcess(dir, 2);
    const r = await child([dir, 'backup', '3', step, String(SIZE)]);
    expect(r.signal, r.err).toBe('SIGKILL');
    const seqs = await checkIntact(dir);
    // Recorded from the manifest swap on, never half.
    expect(seqs).toEqual(BACKUP_STEPS.indexOf(step) >= BACKUP_STEPS.indexOf('manifest-replaced') ? [1, 2, 3] : [1, 2]);
    const next = (seqs.at(-1) as number) + 1;
    await backupInProcess(dir, next);
    expect(await checkIntact(dir)).toEqual([...seqs, next]);
    expect(fs.readdirSync(dir).filter((n) => n.endsWith('.partial') || n.endsWith('.tmp'))).toEqual([]);
  });

  it.each([0, 1, 2, 3, 4, 5])('at a random moment (round %i): the chain stays intact and the next backup works', async () => {
    const size = 32 * MiB;
    const dir = path.join(tmpDir(), 'bk');
    await backupInProcess(dir, 1, size);
    const r = await child([dir, 'backup', '2', '', String(size)], Math.floor(Math.random() * 120));
    const seqs = await checkIntact(dir, size);
    // Killed before the manifest swap: the old chain; after it (or not killed): both points.
    if (r.signal === null) expect(seqs).toEqual([1, 2]);
    else expect([[1], [1, 2]]).toContainEqual(seqs);
    const next = (seqs.at(-1) as number) + 1;
    await backupInProcess(dir, next, size);
    expect(await checkIntact(dir, size)).toEqual([...seqs, next]);
  });
});

describe('kill -9 of a prune', () => {
  it.each(PRUNE_STEPS)('at %s: old or new chain, never a mix; the next backup and prune work', async (step) => {
    const dir = path.join(tmpDir(), 'bk');
    for (let k = 1; k <= 4; k++) await backupInProcess(dir, k);
    const r = await child([dir, 'prune', '2', step, String(SIZE)]);
    expect(r.signal, r.err).toBe('SIGKILL');
    const seqs = await checkIntact(dir);
    const committed = PRUNE_STEPS.indexOf(step) >= PRUNE_STEPS.indexOf('journal-written');
    expect(seqs).toEqual(committed ? [3, 4] : [1, 2, 3, 4]);
    await backupInProcess(dir, 5);
    expect(await checkIntact(dir)).toEqual([...seqs, 5]);
    expect(fs.readdirSync(dir).filter((n) => /\.(prune|partial|tmp)$/.test(n) || n.startsWith('prune-journal'))).toEqual([]);
    expect(fs.readdirSync(dir).filter((n) => n.endsWith('.qcow2'))).toHaveLength(seqs.length + 1);
    await prune(dir, { keepLast: 1 });
    expect(await checkIntact(dir)).toEqual([5]);
  });

  it.each([0, 1, 2, 3])('at a random moment (round %i)', async () => {
    const size = 32 * MiB;
    const dir = path.join(tmpDir(), 'bk');
    for (let k = 1; k <= 3; k++) await backupInProcess(dir, k, size);
    await child([dir, 'prune', '1', '', String(size)], Math.floor(Math.random() * 150));
    const seqs = await checkIntact(dir, size);
    expect([[1, 2, 3], [3]]).toContainEqual(seqs);
    await backupInProcess(dir, 4, size);
    expect(await checkIntact(dir, size)).toEqual([...seqs, 4]);
  });
});

// Present and allowed to trace (a container may forbid ptrace).
const haveStrace = spawnSync('strace', ['-qq', '-o', '/dev/null', 'true'], { stdio: 'ignore' }).status === 0;

// kill -9 keeps the page cache, so it cannot see a missing fsync; a power cut would. strace
// shows the order of the syscalls themselves: every rename must follow an fsync of the file it
// renames, the manifest must follow the images' fsyncs, and the folder must be fsynced after.
describe.skipIf(!haveStrace)('the order of durable writes, as strace sees it', () => {
  it.each(['backup', 'prune'])('%s: fsync before every rename, the folder fsynced after', async (action) => {
    const dir = path.join(tmpDir(), 'bk');
    for (let k = 1; k <= 3; k++) await backupInProcess(dir, k);
    const log = path.join(dir, '..', 'strace.log');
    const args = action === 'backup' ? [dir, 'backup', '4', '', String(SIZE)] : [dir, 'prune', '1', '', String(SIZE)];
    const r = spawnSync('strace', ['-f', '-y', '-qq', '-o', log, '-e', 'trace=fsync,fdatasync,rename,renameat,renameat2,write,pwrite64,writev,pwritev', '-s', '0', process.execPath, CHILD, ...args], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const events: Array<{ kind: 'fsync' | 'write'; path: string } | { kind: 'rename'; from: string; to: string }> = [];
    for (const line of fs.readFileSync(log, 'utf8').split('\n')) {
      const w = /\bp?writev?(?:64)?\(\d+<([^>]+)>/.exec(line);
      if (w !== null) events.push({ kind: 'write', path: w[1] as string });
      const f = /f(?:data)?sync\(\d+<([^>]+)>\) = 0/.exec(line);
      if (f !== null) events.push({ kind: 'fsync', path: f[1] as string });
      const m = /rename\w*\((?:[^,]+, )?"([^"]+)", (?:[^,]+, )?"([^"]+)"/.exec(line);
      if (m !== null && line.includes('= 0')) events.push({ kind: 'rename', from: m[1] as string, to: m[2] as string });
    }
    const renames = events.flatMap((e, i) => (e.kind === 'rename' ? [{ ...e, i }] : []));
    expect(renames.length).toBeGreaterThan(0);
    const real = fs.realpathSync(dir);
    for (const rn of renames) {
      // The last write to the file, then an fsync of it, then the rename.
      const lastWrite = events.slice(0, rn.i).findLastIndex((e) => e.kind === 'write' && e.path === rn.from);
      const synced = events.slice(lastWrite + 1, rn.i).some((e) => e.kind === 'fsync' && e.path === rn.from);
      expect(lastWrite, `writes to ${rn.from} seen`).toBeGreaterThanOrEqual(0);
      expect(synced, `fsync of ${rn.from} after its last write and before its rename`).toBe(true);
      const dirSynced = events.slice(rn.i + 1).some((e) => e.kind === 'fsync' && e.path === real);
      expect(dirSynced, `fsync of the folder after renaming ${rn.from}`).toBe(true);
    }
    const manifest = renames.find((e) => e.to.endsWith('/manifest.json')) as { i: number };
    expect(manifest).toBeDefined();
    if (action === 'backup') {
      // The images are durable before the manifest names them, and renamed only after.
      const imageSync = events.findIndex((e) => e.kind === 'fsync' && e.path.endsWith('.partial'));
      expect(imageSync).toBeGreaterThanOrEqual(0);
      expect(imageSync).toBeLessThan(manifest.i);
      for (const rn of renames.filter((e) => e.from.endsWith('.partial'))) expect(rn.i).toBeGreaterThan(manifest.i);
    } else {
      // The journal commits before any base replaces an old file; the manifest comes after.
      const journal = renames.find((e) => e.to.endsWith('/prune-journal.json')) as { i: number };
      for (const rn of renames.filter((e) => e.from.endsWith('.prune'))) {
        expect(rn.i).toBeGreaterThan(journal.i);
        expect(rn.i).toBeLessThan(manifest.i);
      }
    }
    expect(await checkIntact(dir)).toEqual(action === 'backup' ? [1, 2, 3, 4] : [3]);
  });
});
