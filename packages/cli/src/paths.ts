import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

function isRoot(): boolean {
  return process.getuid?.() === 0;
}

/**
 * Where daemons put their control sockets: `$XDG_RUNTIME_DIR/blkfilter`, else `/run/blkfilter`
 * for root, else a per-user folder in the temp dir. `status` looks for daemons here.
 */
export function runtimeDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.XDG_RUNTIME_DIR !== undefined && env.XDG_RUNTIME_DIR !== '') return path.join(env.XDG_RUNTIME_DIR, 'blkfilter');
  if (isRoot()) return '/run/blkfilter';
  return path.join(os.tmpdir(), `blkfilter-${process.getuid?.() ?? 'user'}`);
}

/**
 * Where a daemon keeps state that must outlive it (CBT maps and journals, diff storage):
 * `$XDG_STATE_HOME/blkfilter`, else `/var/lib/blkfilter` for root, else
 * `~/.local/state/blkfilter`.
 */
export function defaultStateDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.XDG_STATE_HOME !== undefined && env.XDG_STATE_HOME !== '') return path.join(env.XDG_STATE_HOME, 'blkfilter');
  if (isRoot()) return '/var/lib/blkfilter';
  return path.join(os.homedir(), '.local', 'state', 'blkfilter');
}

/** The default control socket: `$BLKFILTER_CONTROL`, else `control.sock` in {@link runtimeDir}. */
export function defaultControlPath(env: NodeJS.ProcessEnv = process.env): string {
  return env.BLKFILTER_CONTROL ?? path.join(runtimeDir(env), 'control.sock');
}

/**
 * A stable identity of a source, for the name of its state folder: an image file by its
 * canonical path, device and inode (a file renamed keeps its state, another file at the same
 * path does not); an NBD source by its URI (host, port or socket, export name). The folder name
 * starts readable (`vm.raw-3f2a...`).
 */
export function sourceKey(source: string): string {
  let identity: string;
  let label: string;
  if (/^nbds?(\+unix)?:\/\//.test(source)) {
    const u = new URL(source);
    const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
    identity = `nbd|${u.protocol}|${u.hostname}|${u.port}|${u.searchParams.get('socket') ?? ''}|${exportName}`;
    label = `${u.hostname || 'unix'}-${exportName || 'default'}`;
  } else {
    const real = fs.realpathSync(source);
    const st = fs.statSync(real);
    identity = `file|${real}|${st.dev}|${st.ino}`;
    label = path.basename(real);
  }
  const hash = createHash('sha256').update(identity).digest('hex').slice(0, 16);
  return `${label.replace(/[^A-Za-z0-9_.-]/g, '-').slice(0, 40)}-${hash}`;
}
