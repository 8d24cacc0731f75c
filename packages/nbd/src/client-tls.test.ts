import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { blkdevRead, blkdevWrite, createDisk, disableBioDebug, enableBioDebug } from '@blkfilter/bio';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClientBackend } from './client.js';
import { NbdConnectionError, NbdOptionError } from './errors.js';
import { missingTools, runOk, tmpDir, waitForListener } from './test-helpers.js';
import { parseNbdUri } from './uri.js';

// TLS against nbdkit --tls=require: X.509 with the server certificate verified against a CA of
// our own, and PSK (nbdkit --tls-psk), through reconnects too.

const missing = missingTools('nbdkit', 'openssl');
let seq = 0;
const name = (p: string): string => `${p}${process.pid}x${seq++}`;

describe.skipIf(missing.length > 0)('NbdClientBackend over TLS (nbdkit --tls=require)', () => {
  let dir: string;
  let certs: string;
  let otherCa: string;
  let pskFile: string;
  const children: ChildProcess[] = [];

  const openssl = (...args: string[]): Promise<unknown> => runOk('openssl', args);
  async function makeCa(d: string, cn: string): Promise<void> {
    fs.mkdirSync(d, { recursive: true });
    await openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', `/CN=${cn}`, '-keyout', path.join(d, 'ca-key.pem'), '-out', path.join(d, 'ca-cert.pem'));
  }

  beforeAll(async () => {
    dir = tmpDir('tls');
    certs = path.join(dir, 'certs');
    await makeCa(certs, 'blkfilter test CA');
    await openssl('req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost', '-keyout', path.join(certs, 'server-key.pem'), '-out', path.join(certs, 'server.csr'));
    fs.writeFileSync(path.join(certs, 'ext.cnf'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
    await openssl('x509', '-req', '-in', path.join(certs, 'server.csr'), '-CA', path.join(certs, 'ca-cert.pem'), '-CAkey', path.join(certs, 'ca-key.pem'), '-CAcreateserial', '-days', '2', '-extfile', path.join(certs, 'ext.cnf'), '-out', path.join(certs, 'server-cert.pem'));
    otherCa = path.join(dir, 'other');
    await makeCa(otherCa, 'someone else');
    pskFile = path.join(dir, 'keys.psk');
    fs.writeFileSync(pskFile, `alice:${crypto.randomBytes(32).toString('hex')}\n`);
  });
  afterAll(() => {
    for (const c of children) c.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function nbdkit(sock: string, tlsArgs: string[]): Promise<ChildProcess> {
    fs.rmSync(sock, { force: true });
    const child = spawn('nbdkit', ['-f', '--exit-with-parent', '--tls=require', ...tlsArgs, '-U', sock, 'memory', '16M'], { stdio: ['ignore', 'ignore', 'pipe'] });
    children.push(child);
    await waitForListener(sock);
    return child;
  }

  it('X.509: verifies the server certificate against the CA, moves data, and reconnects over TLS', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    try {
      const sock = path.join(dir, 'x509.sock');
      let child = await nbdkit(sock, [`--tls-certificates=${certs}`]);
      const uri = parseNbdUri(`nbds+unix:///?socket=${sock}&tls-certificates=${certs}`);
      expect(uri.tls?.ca).toBeDefined();
      const backend = await NbdClientBackend.connect({ ...uri, connections: 2, retryDelayMs: 5 });
      expect(backend.description).toMatch(/^nbds\+unix:/);
      const disk = await createDisk({ name: name('tls'), backend, scanPartitions: false });
      const data = crypto.randomBytes(1 << 20);
      await blkdevWrite(disk.part0, 0, data);
      expect((await blkdevRead(disk.part0, 0, 1 << 20)).equals(data)).toBe(true);
      // The server goes away and comes back (memory plugin: empty again); a read waits and completes.
      child.kill('SIGKILL');
      await new Promise((r) => child.once('exit', r));
      const pending = blkdevRead(disk.part0, 0, 4096);
      child = await nbdkit(sock, [`--tls-certificates=${certs}`]);
      expect((await pending).equals(Buffer.alloc(4096))).toBe(true);
      expect(backend.status.reconnects).toBeGreaterThanOrEqual(1);
      await disk.remove();
      tracker.assertAllCompleted();
    } finally {
      disableBioDebug();
    }
  });

  it('refuses a server whose certificate another CA signed, and says when a server requires TLS', async () => {
    const sock = path.join(dir, 'x509b.sock');
    await nbdkit(sock, [`--tls-certificates=${certs}`]);
    const wrongCa = parseNbdUri(`nbds+unix:///?socket=${sock}&tls-certificates=${otherCa}`);
    await expect(NbdClientBackend.connect(wrongCa)).rejects.toThrow(/TLS with the NBD server failed: .*(self.signed|unable to verify|certificate)/i);
    await expect(NbdClientBackend.connect({ path: sock })).rejects.toThrow(/requires TLS: connect with nbds:\/\//);
    await expect(NbdClientBackend.connect({ path: sock })).rejects.toBeInstanceOf(NbdOptionError);
    // The name in the certificate must match: "localhost" and 127.0.0.1 are in it, this one is not.
    await expect(NbdClientBackend.connect({ ...parseNbdUri(`nbds+unix:///?socket=${sock}&tls-certificates=${certs}`), tls: { ca: fs.readFileSync(path.join(certs, 'ca-cert.pem')), servername: 'example.org' } })).rejects.toBeInstanceOf(NbdConnectionError);
  });

  it('PSK: connects with the key from a psktool-style file, and fails with a wrong key', async () => {
    const sock = path.join(dir, 'psk.sock');
    await nbdkit(sock, [`--tls-psk=${pskFile}`]);
    const backend = await NbdClientBackend.connect(parseNbdUri(`nbds+unix:///?socket=${sock}&tls-psk-file=${pskFile}&tls-username=alice`));
    const disk = await createDisk({ name: name('psk'), backend, scanPartitions: false });
    await blkdevWrite(disk.part0, 4096, Buffer.alloc(4096, 7));
    expect((await blkdevRead(disk.part0, 4096, 4096)).equals(Buffer.alloc(4096, 7))).toBe(true);
    await disk.remove();
    await expect(NbdClientBackend.connect({ path: sock, tls: { psk: { identity: 'alice', key: crypto.randomBytes(32) } } })).rejects.toBeInstanceOf(NbdConnectionError);
  });
});
