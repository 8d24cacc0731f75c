import path from 'node:path';
import { InvalidArgumentError } from '@blkfilter/bio';
import type { NbdServerAddress } from '@blkfilter/nbd';
import { ConnectError, connectExport, disconnectDevice, listConnections, type ConnectionStatus } from './connect.js';
import type { ControlMethod } from './control.js';

/** What the daemon tells {@link connectControlMethods}. */
export interface ConnectContext {
  /** The daemon's control socket: the owner recorded in its connections. */
  readonly control: string;
  /** The registry folder (`<stateDir>/connections`): keep it stable across restarts. */
  readonly connectionsDir: string;
  readonly address: () => NbdServerAddress | null;
  readonly exportNames: () => readonly string[];
  readonly tls: boolean;
  readonly log: (line: string) => void;
}

/** The NBD URI of `exportName` at `address`, as nbdfuse and nbd-client take it. */
export function nbdUri(address: NbdServerAddress, exportName: string): string {
  const name = encodeURIComponent(exportName);
  if (address.kind === 'unix') return `nbd+unix:///${name}?socket=${encodeURIComponent(address.path)}`;
  if (address.kind === 'tcp') {
    const host = address.host === '0.0.0.0' || address.host === '::' || address.host === '' ? '127.0.0.1' : address.host.includes(':') ? `[${address.host}]` : address.host;
    return `nbd://${host}:${address.port}/${name}`;
  }
  throw new ConnectError('ENOTSUP', 'the daemon serves an inherited socket (socket activation): its address is unknown, so nothing can connect to it; serve with --listen');
}

/** The connections a daemon made that are still recorded. */
export function daemonConnections(ctx: Pick<ConnectContext, 'connectionsDir' | 'control'>): ConnectionStatus[] {
  return listConnections(ctx.connectionsDir, ctx.control);
}

/**
 * The control methods `connect`, `disconnect` and `connections`. One connect at a time per
 * daemon, so two racing connects of one export cannot both pass the "already connected" check.
 */
export function connectControlMethods(ctx: ConnectContext): Record<string, ControlMethod> {
  let queue: Promise<unknown> = Promise.resolve();
  const serial = <T>(fn: () => Promise<T>): Promise<T> => {
    const p = queue.then(fn, fn);
    queue = p.catch(() => {});
    return p;
  };
  return {
    connect: (p) =>
      serial(async () => {
        const exportName = p.export;
        if (typeof exportName !== 'string' || exportName === '') throw new InvalidArgumentError('connect needs an EXPORT name');
        const names = ctx.exportNames();
        if (!names.includes(exportName)) throw new ConnectError('ENOENT', `no export "${exportName}" on this daemon (exports: ${names.join(', ') || 'none'})`);
        if (ctx.tls) throw new ConnectError('ENOTSUP', 'the daemon requires TLS on NBD; connect does not pass certificates to nbdfuse yet: serve without --tls-certs on a unix socket or loopback');
        const existing = daemonConnections(ctx).find((c) => c.exportName === exportName);
        if (existing !== undefined) {
          throw new ConnectError('EBUSY', `export "${exportName}" is already connected as ${existing.device}${existing.state === 'stale' ? ' (stale: disconnect it first)' : ''}; two kernel devices on one export would corrupt a filesystem`);
        }
        const address = ctx.address();
        if (address === null) throw new ConnectError('ESHUTDOWN', 'the daemon is stopping');
        const c = await connectExport({ uri: nbdUri(address, exportName), exportName, readOnly: p.readOnly === true, connectionsDir: ctx.connectionsDir, owner: ctx.control });
        ctx.log(`connected ${exportName} as ${c.device} (${c.method}${c.readOnly ? ', read-only' : ''})`);
        return c;
      }),
    disconnect: (p) =>
      serial(async () => {
        const device = p.device;
        if (typeof device !== 'string' || device === '') throw new InvalidArgumentError('disconnect needs a DEVICE, e.g. /dev/loop3');
        const c = await disconnectDevice(device, { connectionsDir: ctx.connectionsDir });
        ctx.log(`disconnected ${c.device} (export ${c.exportName})`);
        return c;
      }),
    connections: () => daemonConnections(ctx),
  };
}

/** The folder of connection records under a daemon's state dir. */
export function connectionsDirOf(stateDir: string): string {
  return path.join(stateDir, 'connections');
}
