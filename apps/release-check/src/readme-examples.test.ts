// Every code block of every README (and of docs/) is an example a user will paste: TypeScript
// blocks are type-checked against the built packages and run, imports by package name; shell
// blocks run in a temp folder with the built `blkfilter` first on PATH. A block that cannot run
// (it needs root, a remote server, or it is the test run itself) says why in a
// `<!-- no-run: why -->` comment right before it; TypeScript ones are still type-checked.
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { blockSlug, exampleToJs, literalOfComment, ROOT, run, typeCheck, type RunResult } from './examples.js';
import { allBlocks, LANGS, type CodeBlock } from './markdown.js';

const blocks = allBlocks(ROOT);
const tsBlocks = blocks.filter((b) => LANGS[b.lang as keyof typeof LANGS] === 'typescript');
const shBlocks = blocks.filter((b) => LANGS[b.lang as keyof typeof LANGS] === 'shell');
const where = (b: CodeBlock): string => `${b.file}:${b.line}`;

// Inside the workspace, so that `@blkfilter/*` resolve to the built packages as they would for a user.
const work = join(ROOT, 'apps/release-check/.examples');

// Tools a shell example may call besides blkfilter; a machine without one skips that example.
const TOOLS = ['jq', 'qemu-img', 'nbdinfo', 'nbdcopy', 'curl', 'truncate'];

// What a runnable example must not do: it runs on a developer's machine, as whoever runs the
// tests (root on CI). A block that installs, mounts, touches system folders or writes to an
// absolute path is refused here, before it runs, unless it is marked no-run.
const UNSAFE: readonly [RegExp, string][] = [
  [/(^|[\s;&|(])(sudo|apt-get|apt|dnf|systemctl|mount|umount|losetup|mkfs(\.\w+)?|fsfreeze)\s/m, 'runs a system administration command'],
  [/(^|[\s;&|(])npm\s+(ci|install|i|publish|link)\b/m, 'installs packages'],
  [/(^|[\s;&|(])blkfilter\s+(--\S+\s+\S+\s+)?connect\b/m, 'connects a kernel device'],
  [/(^|[\s=('"])\/(?!dev\/null\b)[A-Za-z]/m, 'uses an absolute path (use a relative one: it runs in a temp folder)'],
];

/** Why a shell block may not run, or null. */
function unsafeReason(code: string): string | null {
  const commands = code.replace(/(^|\s)#.*$/gm, '$1'); // comments may name anything
  for (const [re, why] of UNSAFE) if (re.test(commands)) return why;
  return null;
}

async function haveTool(tool: string): Promise<boolean> {
  const r = await run('sh', ['-c', `command -v ${tool}`], { cwd: ROOT });
  return r.code === 0;
}

function expectSuccess(r: RunResult, at: string): void {
  const status = r.signal === null ? `exit code ${r.code}` : `signal ${r.signal}`;
  expect(status, `${at} ended with ${status}\n--- stderr\n${r.stderr}\n--- stdout\n${r.stdout}`).toBe('exit code 0');
}

describe('README examples', () => {
  it('every block declares a known language, and every no-run marker says why', () => {
    const problems = blocks.flatMap((b) => [
      ...(b.lang in LANGS ? [] : [`${where(b)}: block language "${b.lang}" is none of ${Object.keys(LANGS).join(', ')} (a diagram or output is \`text\`)`]),
      ...(b.noRun === '' ? [`${where(b)}: <!-- no-run --> without a reason: write <!-- no-run: why -->`] : []),
    ]);
    expect(problems).toEqual([]);
    // The scan itself must find the examples (a broken extractor would pass everything).
    expect(tsBlocks.length).toBeGreaterThan(10);
  });

  it('reads the outputs a README promises: `console.log(x); // <literal>` becomes a check', () => {
    expect(literalOfComment(' true')).toEqual({ source: 'true' });
    expect(literalOfComment(" { label: 'demo', writes: 4096 }")).toEqual({ source: "{ label: 'demo', writes: 4096 }" });
    expect(literalOfComment(' 4096: the length')).toEqual({ source: '4096' });
    expect(literalOfComment(" [{ sector: 2048, sectors: 128 }]: copy these")).toEqual({ source: '[{ sector: 2048, sectors: 128 }]' });
    expect(literalOfComment(' block 0')).toBeUndefined();
    expect(literalOfComment(' { generationId, changesNumber: 2, ... }')).toBeUndefined();
    const { js, checks } = exampleToJs("console.log(1 + 1); // 2\nconsole.log('x'); // prose\n", 'here');
    expect(checks).toBe(1);
    expect(js).toContain('__expectLogged(1 + 1, (2), "here line 1")');
    // The READMEs promise outputs; the scan must find them.
    expect(tsBlocks.filter((b) => b.noRun === null).reduce((n, b) => n + exampleToJs(b.code, where(b)).checks, 0)).toBeGreaterThan(5);
  });

  describe('TypeScript', () => {
    const files = new Map<CodeBlock, string>();
    beforeAll(() => {
      rmSync(work, { recursive: true, force: true });
      mkdirSync(work, { recursive: true });
      for (const b of tsBlocks) {
        const file = join(work, `${blockSlug(b)}.mts`);
        // `export {}`: a block without imports is a module too (top-level await).
        writeFileSync(file, `${b.code}\nexport {};\n`);
        files.set(b, file);
      }
    });
    afterAll(() => rmSync(work, { recursive: true, force: true }));

    it('type-check against the built packages (no-run blocks too)', () => {
      expect(typeCheck([...files.values()]).map((d) => d.replace(`${work}/`, ''))).toEqual([]);
    });

    for (const b of tsBlocks.filter((x) => x.noRun === null)) {
      it(`runs ${where(b)}`, async () => {
        // Paths in a runnable example are relative: it runs in a temp folder of its own.
        expect(/['"`]\/[A-Za-z]/.exec(b.code)?.[0], `${where(b)} uses an absolute path: make it relative, or mark it <!-- no-run: why -->`).toBeUndefined();
        const { js } = exampleToJs(b.code, where(b));
        const file = join(work, `${blockSlug(b)}.mjs`);
        writeFileSync(file, js);
        // Relative paths of the example (disk.raw, backups/vm) land in a folder of its own.
        const cwd = mkdtempSync(join(tmpdir(), 'blkfilter-example-'));
        try {
          const r = await run(process.execPath, [file], { cwd, timeoutMs: 60_000 });
          expectSuccess(r, where(b));
        } finally {
          rmSync(cwd, { recursive: true, force: true });
        }
      });
    }
  });

  describe('shell', () => {
    let bin = '';
    beforeAll(() => {
      bin = mkdtempSync(join(tmpdir(), 'blkfilter-example-bin-'));
      // `blkfilter` as the installed bin would be: the built cli's bin script.
      writeFileSync(join(bin, 'blkfilter'), `#!/bin/sh\nexec "${process.execPath}" "${join(ROOT, 'packages/cli/bin/blkfilter.js')}" "$@"\n`);
      chmodSync(join(bin, 'blkfilter'), 0o755);
    });
    afterAll(() => rmSync(bin, { recursive: true, force: true }));

    for (const b of shBlocks.filter((x) => x.noRun === null)) {
      it(`runs ${where(b)}`, async (ctx) => {
        const unsafe = unsafeReason(b.code);
        expect(unsafe, `${where(b)} ${unsafe}: make it self-contained, or mark it <!-- no-run: why -->`).toBeNull();
        const missing: string[] = [];
        for (const tool of TOOLS) if (new RegExp(`(^|[\\s|(])${tool}\\b`, 'm').test(b.code) && !(await haveTool(tool))) missing.push(tool);
        if (missing.length > 0) {
          console.log(`skipping ${where(b)}: ${missing.join(', ')} not installed`);
          ctx.skip();
        }
        const cwd = mkdtempSync(join(tmpdir(), 'blkfilter-example-'));
        try {
          // The daemon's control socket and state live in the example's folder; a daemon the
          // example starts in the background is stopped when the script ends, however it ends.
          const script = [
            'set -euo pipefail',
            "trap 'jobs -p | xargs -r kill 2>/dev/null; wait' EXIT",
            b.code,
          ].join('\n');
          const env = {
            ...process.env,
            PATH: `${bin}:${process.env.PATH ?? ''}`,
            BLKFILTER_CONTROL: join(cwd, 'control.sock'),
            XDG_STATE_HOME: join(cwd, 'state'),
            XDG_RUNTIME_DIR: cwd,
          };
          const r = await run('bash', ['-c', script], { cwd, env, timeoutMs: 60_000 });
          expectSuccess(r, where(b));
        } finally {
          rmSync(cwd, { recursive: true, force: true });
        }
      });
    }
  });
});
