// NBD URIs as libnbd and qemu write them (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md):
// nbd://HOST[:PORT]/EXPORT, nbds://... (TLS), nbd+unix:///EXPORT?socket=PATH, nbds+unix://...
import fs from 'node:fs';
import path from 'node:path';
import { InvalidArgumentError } from '@blkfilter/bio';
import type { NbdClientTlsOptions } from './client-handshake.js';
import { NBD_DEFAULT_PORT } from './protocol.js';

/** What an NBD URI names: where to connect, which export, and TLS. */
export interface NbdUri {
  readonly host?: string;
  readonly port?: number;
  readonly path?: string;
  readonly exportName: string;
  /** Present for `nbds://` and `nbds+unix://`. */
  readonly tls?: NbdClientTlsOptions;
  /** A short name for a device on this export: the export name, else the host or socket file name. */
  readonly defaultName: string;
}

/** True when `s` looks like an NBD URI (`nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`). */
export function isNbdUri(s: string): boolean {
  return /^nbds?(\+unix)?:\/\//.test(s);
}

/**
 * Parses an NBD URI. TLS material comes from the query, as libnbd reads it:
 * `tls-certificates=DIR` (`ca-cert.pem`, and `client-cert.pem` + `client-key.pem` if there), or
 * `tls-psk-file=FILE` (lines `username:hexkey`, as `psktool` writes them) with `tls-username`.
 * `defaults.tlsCertificates` applies to `nbds` URIs that name neither. Throws
 * `InvalidArgumentError` for anything else, with the URI in the message.
 */
export function parseNbdUri(uri: string, defaults: { tlsCertificates?: string } = {}): NbdUri {
  if (!isNbdUri(uri)) throw new InvalidArgumentError(`${uri}: not an NBD URI (expected nbd://HOST[:PORT]/EXPORT, nbds://..., nbd+unix:///EXPORT?socket=PATH)`);
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new InvalidArgumentError(`${uri}: not a valid URI`);
  }
  const secure = u.protocol.startsWith('nbds');
  const unix = u.protocol.endsWith('+unix:');
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  const q = u.searchParams;
  let tls: NbdClientTlsOptions | undefined;
  if (secure) {
    const psk = q.get('tls-psk-file');
    const dir = q.get('tls-certificates') ?? defaults.tlsCertificates;
    if (psk !== null) tls = { psk: readPsk(uri, psk, q.get('tls-username')) };
    else if (dir !== undefined) tls = tlsFromDir(uri, dir);
    else tls = {};
  }
  let defaultName: string;
  if (unix) {
    const socket = q.get('socket');
    if (socket === null || socket === '') throw new InvalidArgumentError(`${uri}: an nbd+unix URI needs ?socket=PATH`);
    if (u.host !== '') throw new InvalidArgumentError(`${uri}: an nbd+unix URI has no host (nbd+unix:///EXPORT?socket=PATH)`);
    defaultName = exportName || path.basename(socket).replace(/\.sock$/, '') || 'nbd';
    return { path: socket, exportName, defaultName, ...(tls !== undefined ? { tls } : {}) };
  }
  const host = u.hostname.replace(/^\[(.*)\]$/, '$1') || '127.0.0.1';
  const port = u.port === '' ? NBD_DEFAULT_PORT : Number(u.port);
  defaultName = exportName || host;
  return { host, port, exportName, defaultName, ...(tls !== undefined ? { tls } : {}) };
}

function readFile(uri: string, file: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new InvalidArgumentError(`${uri}: cannot read ${file}: ${(err as Error).message}`);
  }
}

/** TLS options from a folder laid out as for nbdkit and qemu (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`). */
export function tlsFromDir(uri: string, dir: string): NbdClientTlsOptions {
  const ca = path.join(dir, 'ca-cert.pem');
  if (!fs.existsSync(ca)) throw new InvalidArgumentError(`${uri}: ${ca} is missing: the CA certificate that signed the server's certificate is needed to verify it`);
  const cert = path.join(dir, 'client-cert.pem');
  const key = path.join(dir, 'client-key.pem');
  const withClient = fs.existsSync(cert) && fs.existsSync(key);
  return { ca: readFile(uri, ca), ...(withClient ? { cert: readFile(uri, cert), key: readFile(uri, key) } : {}) };
}

function readPsk(uri: string, file: string, username: string | null): { identity: string; key: Buffer } {
  for (const line of readFile(uri, file).toString('utf8').split('\n')) {
    const m = /^([^:\s]+):([0-9a-fA-F]+)\s*$/.exec(line);
    if (m === null) continue;
    if (username === null || m[1] === username) return { identity: m[1] as string, key: Buffer.from(m[2] as string, 'hex') };
  }
  throw new InvalidArgumentError(`${uri}: no ${username === null ? 'key' : `key for ${username}`} in ${file} (expected lines username:hexkey, as psktool writes)`);
}
