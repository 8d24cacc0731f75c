// The packages as a user gets them: `npm pack` of each (what `npm publish` would upload),
// installed from the tarballs into a project of its own outside the workspace. Each package's
// README examples type-check against the installed types and run there, every subpath of every
// exports map imports, and the cli's bin works.
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { blockSlug, exampleToJs, ROOT, run, typeCheck, type RunResult } from './examples.js';
import { extractBlocks, LANGS } from './markdown.js';

const PACKAGES = readdirSync(join(ROOT, 'packages')).sort();
const NPM = process.platform === 'win32' ? 'npm.cmd' : 'npm';
// A registry that cannot be reached is the one reason to skip (npm resolves the tarballs'
// dependencies through it, from its cache where it can).
const OFFLINE = /E(AI_AGAIN|NOTFOUND|CONNREFUSED|CONNRESET|TIMEDOUT|NETUNREACH|NOTCACHED)\b/;

interface PackageJson {
  name: string;
  exports?: Record<string, unknown>;
}

let scratch = '';
let skipReason: string | null = null;

function describeRun(r: RunResult): string {
  return `${r.signal === null ? `exit code ${r.code}` : `signal ${r.signal}`}\n--- stderr\n${r.stderr}\n--- stdout\n${r.stdout}`;
}

beforeAll(async () => {
  scratch = mkdtempSync(join(tmpdir(), 'blkfilter-consumer-'));
  const tarballs = join(scratch, 'tarballs');
  mkdirSync(tarballs);
  const pack = await run(NPM, ['pack', '--pack-destination', tarballs, ...PACKAGES.flatMap((p) => ['-w', `packages/${p}`])], { cwd: ROOT, timeoutMs: 60_000 });
  if (pack.code !== 0) {
    skipReason = `npm pack failed, so there is nothing to install: ${describeRun(pack)}`;
    return;
  }
  const project = join(scratch, 'project');
  mkdirSync(project);
  writeFileSync(join(project, 'package.json'), `${JSON.stringify({ name: 'blkfilter-consumer', private: true, type: 'module' }, null, 2)}\n`);
  const files = readdirSync(tarballs).map((f) => join(tarballs, f));
  const install = await run(NPM, ['install', '--prefer-offline', '--no-audit', '--no-fund', '--loglevel=error', ...files], { cwd: project, timeoutMs: 90_000 });
  if (install.code !== 0 && OFFLINE.test(install.stderr)) skipReason = `npm install could not reach the registry: ${install.stderr.trim().split('\n')[0]}`;
  else expect(install.code, `npm install of the tarballs: ${describeRun(install)}`).toBe(0);
}, 180_000);

afterAll(() => {
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

describe('the packed packages, installed from their tarballs', () => {
  const project = (): string => join(scratch, 'project');

  it.for(PACKAGES)('@blkfilter/%s: every subpath of its exports map imports', async (name, ctx) => {
    if (skipReason) return ctx.skip(skipReason);
    const dir = join(project(), 'node_modules/@blkfilter', name);
    const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as PackageJson;
    const subpaths = Object.keys(pkg.exports ?? { '.': null }).filter((s) => s !== './package.json');
    const probe = subpaths.map((s) => `await import(${JSON.stringify(pkg.name + s.slice(1))});`).join('\n');
    const r = await run(process.execPath, ['--input-type=module', '-e', probe], { cwd: project(), timeoutMs: 30_000 });
    expect(r.code, `${pkg.name}: ${describeRun(r)}`).toBe(0);
  });

  it('the README examples of every package type-check against the installed types and run', async (ctx) => {
    if (skipReason) return ctx.skip(skipReason);
    const dir = join(project(), 'examples');
    mkdirSync(dir, { recursive: true });
    const blocks = PACKAGES.flatMap((p) => {
      const file = `packages/${p}/README.md`;
      return extractBlocks(file, readFileSync(join(ROOT, file), 'utf8')).filter((b) => LANGS[b.lang as keyof typeof LANGS] === 'typescript');
    });
    // Every package with a library API shows it in a TypeScript Usage example.
    expect(new Set(blocks.map((b) => b.file.split('/')[1]))).toEqual(new Set(PACKAGES.filter((p) => p !== 'cli')));
    const files = blocks.map((b) => {
      const file = join(dir, `${blockSlug(b)}.mts`);
      writeFileSync(file, `${b.code}\nexport {};\n`);
      return file;
    });
    expect(typeCheck(files).map((d) => d.replace(`${dir}/`, ''))).toEqual([]);
    for (const b of blocks.filter((x) => x.noRun === null)) {
      const file = join(dir, `${blockSlug(b)}.mjs`);
      writeFileSync(file, exampleToJs(b.code, `${b.file}:${b.line}`).js);
      const cwd = mkdtempSync(join(scratch, 'run-'));
      const r = await run(process.execPath, [file], { cwd, timeoutMs: 60_000 });
      expect(r.code, `${b.file}:${b.line} in the consumer project: ${describeRun(r)}`).toBe(0);
    }
  });

  it('node_modules/.bin/blkfilter --help works', async (ctx) => {
    if (skipReason) return ctx.skip(skipReason);
    const r = await run(join(project(), 'node_modules/.bin/blkfilter'), ['--help'], { cwd: project(), timeoutMs: 30_000 });
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout).toContain('Usage: blkfilter');
    expect(r.stdout).toContain('backup [options] [snapshot]');
  });

  it('libnbd starts the installed bin by socket activation (packages/nbd/README.md)', async (ctx) => {
    if (skipReason) return ctx.skip(skipReason);
    if ((await run('sh', ['-c', 'command -v nbdinfo'], { cwd: ROOT })).code !== 0) return ctx.skip('nbdinfo is not installed');
    const cwd = mkdtempSync(join(scratch, 'activation-'));
    writeFileSync(join(cwd, 'disk.raw'), Buffer.alloc(1 << 20));
    // The line from the README, with the bin of this project; state and control socket in cwd.
    const env = { ...process.env, XDG_STATE_HOME: join(cwd, 'state'), XDG_RUNTIME_DIR: cwd, BLKFILTER_CONTROL: join(cwd, 'control.sock') };
    const r = await run('nbdinfo', ['--size', '--', '[', join(project(), 'node_modules/.bin/blkfilter'), 'serve', 'disk.raw', ']'], { cwd, env, timeoutMs: 60_000 });
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout.trim()).toBe(String(1 << 20));
  });
});
