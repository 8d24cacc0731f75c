// The ext4 story (`npm run demo` where the machine allows it: root, /dev/fuse, loop devices,
// nbdfuse, e2fsprogs). A 1 GiB sparse image is served with CBT by a daemon in this process and
// connected as a kernel block device (nbdfuse + loop, or nbd-client); the kernel's ext4 is made
// on it and mounted, a tree of real files is copied in, and each point is taken with the
// filesystem frozen and backed up (full, then incremental after adds, edits, deletes and an
// fstrim). Both points are restored into new images, served again, connected read-only,
// checked with e2fsck -fn, mounted -o ro,norecovery, and their files compared (sha256) with
// the files as they were at each freeze. Whatever happens, nothing is left behind: no mount,
// no loop device, no FUSE file, no nbdfuse.
//
// Everything that touches the device or the mounted filesystem runs as a child process (see
// `exec`): the daemon serving the device shares this process's event loop and thread pool.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { restore } from '@blkfilter/backup';
import { callControl, connectPrerequisites, disconnectDevice, heldUnder, listConnections, startDaemon, withFrozenFilesystems, type Daemon } from '@blkfilter/cli';
import { check, exec, GiB, MiB, mib, must, say, since, which } from './story.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const TOOLS: ReadonlyArray<readonly [tool: string, pkg: string]> = [
  ['mkfs.ext4', 'e2fsprogs'],
  ['e2fsck', 'e2fsprogs'],
  ['dumpe2fs', 'e2fsprogs'],
  ['fsfreeze', 'util-linux'],
  ['fstrim', 'util-linux'],
  ['sha256sum', 'coreutils'],
];

/** Whether this machine can run the ext4 story, and if not, which prerequisite is missing. */
export function fsStoryPrerequisites(): { ok: true; method: string } | { ok: false; reason: string } {
  const pre = connectPrerequisites();
  if (!pre.ok) return { ok: false, reason: pre.reason };
  for (const [tool, pkg] of TOOLS) if (which(tool) === null) return { ok: false, reason: `${tool} is not installed (apt-get install ${pkg})` };
  return { ok: true, method: pre.method === 'nbdfuse' ? 'nbdfuse + loop' : 'nbd-client' };
}

type Sums = Map<string, string>;

/** SHA-256 of every regular file under `root`, by relative path (lost+found aside). */
async function checksums(root: string): Promise<Sums> {
  const r = await must('sh', ['-c', `cd "$1" && find . -type f -not -path './lost+found/*' -print0 | sort -z | xargs -0 -r sha256sum`, 'sh', root]);
  const out: Sums = new Map();
  for (const line of r.stdout.split('\n')) {
    const m = /^([0-9a-f]{64}) {2}\.\/(.*)$/.exec(line);
    if (m?.[1] !== undefined && m[2] !== undefined) out.set(m[2], m[1]);
  }
  return out;
}

/** Bytes in the regular files under `root`. */
async function treeBytes(root: string): Promise<number> {
  const r = await must('find', [root, '-type', 'f', '-printf', '%s\\n']);
  return r.stdout.split('\n').reduce((s, l) => s + (Number(l) || 0), 0);
}

/** How two checksum maps differ, in a few words; '' when equal. */
function sumsDiff(want: Sums, got: Sums): string {
  const missing = [...want.keys()].filter((k) => !got.has(k));
  const extra = [...got.keys()].filter((k) => !want.has(k));
  const changed = [...want.keys()].filter((k) => got.has(k) && got.get(k) !== want.get(k));
  if (missing.length + extra.length + changed.length === 0) return '';
  const few = (xs: string[]): string => `${xs.length}${xs.length > 0 ? ` (${xs.slice(0, 3).join(', ')}${xs.length > 3 ? ', ...' : ''})` : ''}`;
  return `${few(changed)} differ, ${few(missing)} missing, ${few(extra)} unexpected`;
}

/** Mount points under `dir`, deepest last, from /proc/mounts (octal escapes undone). */
function mountPointsUnder(dir: string, fuse: boolean): string[] {
  return fs
    .readFileSync('/proc/mounts', 'utf8')
    .split('\n')
    .map((l) => l.split(' '))
    .filter((f) => f[1] !== undefined && (f[2] ?? '').startsWith('fuse') === fuse)
    .map((f) => (f[1] ?? '').replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))))
    .filter((m) => m.startsWith(`${dir}/`));
}

/** `fstrim -v`'s "/mnt: 959.8 MiB (1006383104 bytes) trimmed" as "fstrim: 959.8 MiB trimmed". */
const fstrimSaid = (out: string): string => `fstrim: ${out.trim().replace(/^.*: /, '').replace(/ \(\d+ bytes\)/, '')}`;

const globalCounts = async (): Promise<string> => {
  const loops = (await exec('losetup', ['-a'])).stdout.split('\n').filter((l) => l !== '').length;
  const mounts = fs.readFileSync('/proc/mounts', 'utf8').split('\n').filter((l) => l !== '').length;
  return `${loops} loop device(s) in losetup -a, ${mounts} line(s) in /proc/mounts`;
};

/** Runs the ext4 story; failed checks are counted in story.ts, a failed step throws. */
export async function fsStory(method: string): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-demo-'));
  const stateDirs = [path.join(dir, 'state'), path.join(dir, 'state2')];
  const daemons: Daemon[] = [];
  const before = await globalCounts();
  say(`working in ${dir}; before: ${before}`);

  // Undoes everything, whatever state the story stopped in; safe to call twice.
  let cleaning: Promise<void> | null = null;
  const cleanup = (): Promise<void> =>
    (cleaning ??= (async () => {
      for (const m of mountPointsUnder(dir, false).reverse()) {
        await exec('fsfreeze', ['-u', m], 10_000);
        const r = await exec('umount', [m], 60_000);
        if (r.code !== 0) await exec('umount', ['-l', m], 60_000);
      }
      // While the daemons still serve them: disconnect what they connected.
      for (const s of stateDirs) {
        for (const c of listConnections(path.join(s, 'connections'))) await disconnectDevice(c.device, { connectionsDir: path.join(s, 'connections') }).catch((err: Error) => say(`cleanup: ${err.message}`));
      }
      for (const d of daemons.splice(0).reverse()) await d.stop().catch(() => {});
      // Whatever is still there (a disconnect failed, a connect half-done).
      const held = await heldUnder(dir);
      for (const l of held.loops) await exec('losetup', ['-d', l.split(':')[0] ?? ''], 30_000);
      for (const m of mountPointsUnder(dir, true).reverse()) {
        const r = await exec('fusermount3', ['-u', m], 30_000);
        if (r.code !== 0) await exec('umount', ['-l', m], 30_000);
      }
      for (const pid of (await heldUnder(dir)).nbdfuse) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone
        }
      }
      const left = await heldUnder(dir);
      const records = stateDirs.flatMap((s) => listConnections(path.join(s, 'connections')));
      const what = [...left.loops, ...left.mounts, ...left.nbdfuse.map((p) => `nbdfuse pid ${p}`), ...records.map((c) => `connection record ${c.id}`)];
      check('nothing left behind: no loop device, mount, FUSE file or nbdfuse of the demo', what.length === 0, what.length === 0 ? `after: ${await globalCounts()}` : what.join('; '));
      // Never a recursive remove over a live mount.
      if (left.mounts.length === 0) fs.rmSync(dir, { recursive: true, force: true });
      else say(`left ${dir} in place: something is still mounted there`);
    })());
  const onSignal = (sig: NodeJS.Signals): void => {
    say(`${sig}: cleaning up before exiting`);
    void cleanup().finally(() => process.exit(130));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    await story(dir, method, stateDirs, daemons);
  } finally {
    await cleanup();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

interface Entry {
  kind: string;
  bytesRead: number;
  bytesWritten: number;
  changedBytes: number;
  file: string;
  zeros: Array<readonly [number, number]>;
}

async function story(dir: string, method: string, stateDirs: string[], daemons: Daemon[]): Promise<void> {
  const image = path.join(dir, 'data.raw');
  const control = path.join(dir, 'control.sock');
  const backups = path.join(dir, 'backups');
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  fs.writeFileSync(image, '');
  fs.truncateSync(image, GiB);
  const daemon = await startDaemon({ sources: [image], cbt: true, listen: `unix:${path.join(dir, 'nbd.sock')}`, control, stateDir: stateDirs[0] });
  daemons.push(daemon);
  const ctl = <T>(method: string, params: Record<string, unknown> = {}): Promise<T> => callControl(control, method, params) as Promise<T>;
  say(`serving a 1 GiB sparse image as export "data" with CBT (daemon in this process)`);

  let t = performance.now();
  const { device } = await ctl<{ device: string }>('connect', { export: 'data' });
  say(`blkfilter connect data -> ${device} (${method}) in ${since(t)}`);
  t = performance.now();
  await must('mkfs.ext4', ['-q', '-F', '-L', 'demo', device]);
  await must('mount', [device, mnt]);
  say(`mkfs.ext4 ${device} and mount on ${mnt} in ${since(t)}`);

  // Real files: the repository's sources and TypeScript's lib folder.
  t = performance.now();
  await must('sh', ['-c', 'cd "$1" && cp -a --parents packages/*/src "$2"', 'sh', REPO, mnt]);
  const tsLib = (() => {
    try {
      return path.join(path.dirname(createRequire(path.join(REPO, 'package.json')).resolve('typescript/package.json')), 'lib');
    } catch {
      return null;
    }
  })();
  if (tsLib !== null) await must('cp', ['-a', tsLib, path.join(mnt, 'typescript-lib')]);
  // A first fstrim (as fstrim.timer would run): ext4 then re-trims only block groups that free blocks later.
  const trim0 = await must('fstrim', ['-v', mnt]);
  await must('sh', ['-c', 'date > "$1/written-just-before-freeze-1"', 'sh', mnt]);
  const sums1 = await checksums(mnt);
  say(`copied ${sums1.size} files (${mib(await treeBytes(mnt))}: packages/*/src${tsLib !== null ? ', typescript/lib' : ''}), ${fstrimSaid(trim0.stdout)}, in ${since(t)}; sha256 of each file recorded; no sync: the freeze flushes`);

  /** A frozen take, then a backup; returns the backup's entry. */
  const point = async (n: number): Promise<Entry> => {
    const snap = await ctl<{ id: string }>('snapshot.create', { devices: ['data'], storage: 'memory', limitBytes: 512 * MiB });
    const { result, frozenMs } = await withFrozenFilesystems(() => ctl<{ images: string[] }>('snapshot.take', { id: snap.id }), { mountpoints: [mnt], timeoutMs: 10_000 });
    say(`snapshot ${n} taken with ${mnt} frozen for ${frozenMs.toFixed(0)} ms (fsfreeze -f, take, fsfreeze -u): image ${result.images.join(', ')}`);
    check(`snapshot ${n} was taken frozen`, frozenMs > 0, `${frozenMs.toFixed(0)} ms`);
    const tb = performance.now();
    const b = await ctl<{ entry: Entry }>('backup', { snapshot: snap.id, to: backups });
    await ctl('snapshot.destroy', { id: snap.id });
    const e = b.entry;
    const zeros = e.zeros.reduce((s, z) => s + z[1], 0);
    say(`backup ${n}: ${e.kind}, CBT changed ${mib(e.changedBytes)}${zeros > 0 ? ` (${mib(zeros)} of it discarded: zero clusters)` : ''}, read ${mib(e.bytesRead)}, stored ${mib(e.bytesWritten)} in ${e.file} (${since(tb)})`);
    return e;
  };
  const full = await point(1);
  check('backup 1 is full', full.kind === 'full');

  // Changes: add a tree, edit files (appends and an in-place write), delete files, fstrim.
  t = performance.now();
  await must('sh', ['-c', 'cd "$1" && mkdir "$2/added" && cp -a --parents packages/*/dist "$2/added"', 'sh', REPO, mnt]);
  const added = await treeBytes(path.join(mnt, 'added'));
  const some = [...sums1.keys()].filter((k) => k.endsWith('.ts')).slice(0, 3);
  for (const f of some) await must('sh', ['-c', 'echo "// changed after point 1" >> "$1"', 'sh', path.join(mnt, f)]);
  const big = tsLib !== null ? 'typescript-lib/lib.dom.d.ts' : some[0] ?? '';
  await must('dd', ['if=/dev/urandom', `of=${path.join(mnt, big)}`, 'bs=4096', 'count=1', 'seek=64', 'conv=notrunc', 'status=none']);
  const gone = tsLib !== null ? ['typescript-lib/typescript.js', 'typescript-lib/_tsc.js'] : [];
  const deleted = [...sums1.keys()].filter((k) => k.startsWith('packages/registry/'));
  await must('rm', ['-rf', path.join(mnt, 'packages', 'registry'), ...gone.map((g) => path.join(mnt, g))]);
  await must('sync', []);
  const trim = await must('fstrim', ['-v', mnt]);
  // One more file after the sync: only the freeze will flush it.
  await must('sh', ['-c', 'date > "$1/written-just-before-freeze-2"', 'sh', mnt]);
  const sums2 = await checksums(mnt);
  say(`changes: added ${mib(added)} (packages/*/dist), appended to ${some.length} files, rewrote 4 KiB inside ${big}, deleted ${deleted.length + gone.length} files, ${fstrimSaid(trim.stdout)} (${since(t)})`);

  const inc = await point(2);
  check('backup 2 is incremental', inc.kind === 'incremental');
  check('backup 2 read only what CBT reported changed', inc.bytesRead <= inc.changedBytes, `${mib(inc.bytesRead)} read for ${mib(inc.changedBytes)} changed`);
  // CBT counts the ranges fstrim discarded as changed: the backup reads them (zeros, cheap) and
  // records them as zero clusters, which hide the deleted files' blocks in the older images.
  // Beside those, it reads what the files changed, plus ext4's metadata and journal blocks.
  const discarded = inc.zeros.reduce((s, z) => s + z[1], 0);
  const edited = some.length * 64 + 4096;
  const bound = added + edited + 16 * MiB;
  check(
    'backup 2 read about what changed, not the disk',
    inc.bytesRead - discarded <= bound && inc.bytesWritten >= added && inc.bytesWritten <= bound,
    `${mib(inc.bytesRead - discarded)} of data read and ${mib(inc.bytesWritten)} stored for ${mib(added + edited)} of files added or edited (+ ext4 metadata); the full backup read ${mib(full.bytesRead)}`,
  );

  t = performance.now();
  await must('umount', [mnt]);
  await ctl('disconnect', { device });
  await daemon.stop();
  daemons.splice(daemons.indexOf(daemon), 1);
  say(`umount, blkfilter disconnect ${device}, stop (${since(t)})`);

  // Restore both points into new images; serve them; look at them read-only.
  const restored: string[] = [];
  for (const at of [1, 2]) {
    t = performance.now();
    const to = path.join(dir, `data-at-${at}.raw`);
    const r = await restore(backups, { to, at });
    restored.push(to);
    say(`blkfilter restore --at ${at} -> ${path.basename(to)} (${mib(r.bytes)}) in ${since(t)}`);
  }
  const control2 = path.join(dir, 'control2.sock');
  daemons.push(await startDaemon({ sources: restored, listen: `unix:${path.join(dir, 'nbd2.sock')}`, control: control2, stateDir: stateDirs[1] }));
  const ctl2 = <T>(method: string, params: Record<string, unknown> = {}): Promise<T> => callControl(control2, method, params) as Promise<T>;
  for (const [at, want] of [[1, sums1], [2, sums2]] as const) {
    t = performance.now();
    const c = await ctl2<{ device: string; readOnly: boolean }>('connect', { export: `data-at-${at}`, readOnly: true });
    check(`point ${at}: connected read-only as ${c.device}`, c.readOnly);
    const features = (await must('dumpe2fs', ['-h', c.device])).stdout.split('\n').find((l) => l.startsWith('Filesystem features:')) ?? '';
    check(`point ${at}: no journal to replay (the freeze left it clean)`, features !== '' && !features.includes('needs_recovery'), features.includes('needs_recovery') ? 'needs_recovery is set' : '');
    const fsck = await exec('e2fsck', ['-fn', c.device], 300_000);
    check(`point ${at}: e2fsck -fn is clean`, fsck.code === 0, fsck.code === 0 ? (fsck.stdout.trim().split('\n').pop() ?? '') : `exit ${fsck.code}: ${(fsck.stdout + fsck.stderr).trim().split('\n').slice(-3).join(' / ')}`);
    const m = path.join(dir, `at-${at}`);
    fs.mkdirSync(m);
    await must('mount', ['-o', 'ro,norecovery', c.device, m]);
    const got = await checksums(m);
    await must('umount', [m]);
    const diff = sumsDiff(want, got);
    check(`point ${at}: mounted -o ro,norecovery, its ${got.size} files equal the files at freeze ${at} (sha256)`, diff === '', diff);
    await ctl2('disconnect', { device: c.device });
    say(`point ${at}: umount, disconnect (${since(t)})`);
  }
}
