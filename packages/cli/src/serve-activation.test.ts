import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, expect, it } from 'vitest';

// The real command, as libnbd's clients start it: `nbdinfo -- [ node dist/cli.js serve IMAGE ]`
// passes a listening socket as fd 3 with LISTEN_PID/LISTEN_FDS (systemd socket activation).
const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');
const tools = ['nbdinfo', 'nbdcopy'].every((t) => spawnSync(t, ['--version'], { stdio: 'ignore' }).status === 0);

let dir: string;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-activation-'));
});

afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

function runOk(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 60_000 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${String(r.status)} (${String(r.signal)})\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

/** `[ node cli.js --control SOCK serve IMAGE ]`: a daemon of its own per client. */
function serve(image: string, control: string): string[] {
  return ['--', '[', process.execPath, CLI, '--control', path.join(dir, control), 'serve', '--state-dir', path.join(dir, 'state'), image, ']'];
}

it.skipIf(!tools || !fs.existsSync(CLI))('socket activation: nbdinfo and nbdcopy start `blkfilter serve` themselves', () => {
  const img = path.join(dir, 'sa.raw');
  const data = crypto.randomBytes(4 << 20);
  fs.writeFileSync(img, data);
  const info = JSON.parse(runOk('nbdinfo', ['--json', ...serve(img, 'a.sock')])) as { exports: Array<Record<string, unknown>> };
  expect(info.exports[0]).toMatchObject({ 'export-size': 4 << 20 });
  // Read through the source side ...
  const out = path.join(dir, 'sa.copy');
  runOk('nbdcopy', [...serve(img, 'b.sock'), out]);
  expect(fs.readFileSync(out).equals(data)).toBe(true);
  // ... and write through the destination side.
  const dst = path.join(dir, 'sa-dst.raw');
  fs.writeFileSync(dst, Buffer.alloc(4 << 20));
  runOk('nbdcopy', [img, ...serve(dst, 'c.sock')]);
  expect(fs.readFileSync(dst).equals(data)).toBe(true);
});
