import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import type { CodeBlock } from './markdown.js';

/** The repository root. */
export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '../../..');

/** A file name for a block: `packages-bio-README-md-L23`. */
export function blockSlug(block: CodeBlock): string {
  return `${block.file.replace(/[^A-Za-z0-9]+/g, '-')}-L${block.line}`;
}

/** The compiler options of the packages themselves (tooling/tsconfig.base.json), for examples. */
export function exampleCompilerOptions(extra: ts.CompilerOptions = {}): ts.CompilerOptions {
  const file = join(ROOT, 'tooling/tsconfig.base.json');
  const { config } = ts.readConfigFile(file, ts.sys.readFile);
  const parsed = ts.parseJsonConfigFileContent(config, ts.sys, dirname(file));
  // @types/node comes from the workspace, wherever the example sits (a scratch project has none).
  return { ...parsed.options, noEmit: true, declaration: false, sourceMap: false, typeRoots: [join(ROOT, 'node_modules/@types')], ...extra };
}

/** Type-checks `files` together; one formatted line per diagnostic (empty: all good). */
export function typeCheck(files: readonly string[], options: ts.CompilerOptions = exampleCompilerOptions()): string[] {
  const program = ts.createProgram({ rootNames: [...files], options });
  return ts.getPreEmitDiagnostics(program).map((d) => {
    const text = ts.flattenDiagnosticMessageText(d.messageText, '\n');
    if (!d.file || d.start === undefined) return text;
    const { line, character } = d.file.getLineAndCharacterOfPosition(d.start);
    return `${d.file.fileName}:${line + 1}:${character + 1} TS${d.code}: ${text}`;
  });
}

/**
 * The literal a `// comment` after a `console.log(x);` promises, if it starts with one:
 * `// true`, `// { label: 'demo', writes: 4096 }`, `// 4096: the length`. Prose gives undefined.
 */
export function literalOfComment(comment: string): { source: string } | undefined {
  const text = comment.trim();
  // Longest prefix, cut before a ':' or ' ', that is a literal (evaluating it touches no name).
  const cuts = [text.length];
  for (let i = text.length - 1; i > 0; i--) if (text[i] === ':' || text[i] === ' ') cuts.push(i);
  for (const cut of cuts) {
    const source = text.slice(0, cut).trim();
    if (source === '' || !/^[-\d'"[{tfnu]/.test(source)) continue;
    try {
      new Function(`"use strict"; return (${source});`)();
      return { source };
    } catch {
      // not a literal (prose, `...`, a name): try a shorter prefix
    }
  }
  return undefined;
}

/**
 * JavaScript to run for a TypeScript example: `console.log(x); // <literal>` lines become checks
 * that x matches the literal (objects partially, as `toMatchObject`), so a README that promises
 * an output has to keep it.
 */
export function exampleToJs(code: string, where: string): { js: string; checks: number } {
  const sf = ts.createSourceFile('example.mts', code, ts.ScriptTarget.ES2022, true, ts.ScriptKind.TS);
  const edits: { start: number; end: number; text: string }[] = [];
  const visit = (node: ts.Node): void => {
    if (
      ts.isExpressionStatement(node) &&
      ts.isCallExpression(node.expression) &&
      node.expression.expression.getText(sf) === 'console.log' &&
      node.expression.arguments.length === 1
    ) {
      const lineEnd = code.indexOf('\n', node.end);
      const rest = code.slice(node.end, lineEnd === -1 ? code.length : lineEnd);
      const m = /^\s*\/\/(.*)$/.exec(rest);
      const literal = m ? literalOfComment(m[1] ?? '') : undefined;
      if (literal) {
        const { line } = sf.getLineAndCharacterOfPosition(node.getStart(sf));
        const arg = node.expression.arguments[0]!;
        edits.push({
          start: node.expression.getStart(sf),
          end: node.expression.end,
          text: `__expectLogged(${arg.getText(sf)}, (${literal.source}), ${JSON.stringify(`${where} line ${line + 1}`)})`,
        });
      }
    }
    ts.forEachChild(node, visit);
  };
  visit(sf);
  let out = code;
  for (const e of edits.sort((a, b) => b.start - a.start)) out = out.slice(0, e.start) + e.text + out.slice(e.end);
  const js = ts.transpileModule(out, {
    compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022, verbatimModuleSyntax: false },
  }).outputText;
  return { js: `${js}\n${EXPECT_LOGGED}\nexport {};\n`, checks: edits.length };
}

// Appended to every example (a function declaration is hoisted, so it may come last).
const EXPECT_LOGGED = `
function __expectLogged(actual, expected, where) {
  console.log(actual);
  const show = (v) => process.getBuiltinModule('node:util').inspect(v, { depth: 6 });
  const match = (a, e) => {
    if (e === null || typeof e !== 'object') return Object.is(a, e);
    if (a === null || typeof a !== 'object') return false;
    if (Array.isArray(e)) return Array.isArray(a) && a.length === e.length && e.every((x, i) => match(a[i], x));
    return Object.keys(e).every((k) => match(a[k], e[k]));
  };
  if (!match(actual, expected)) {
    console.error(where + ': the README says this logs ' + show(expected) + ', it logged ' + show(actual));
    process.exitCode = 1;
    throw new Error(where + ': logged output differs from the README');
  }
}
`;

/** Result of a child process. */
export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs a program to its end (killed after `timeoutMs`), collecting its output. */
export function run(cmd: string, args: readonly string[], opts: { cwd: string; env?: NodeJS.ProcessEnv; timeoutMs?: number }): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    // A stuck example must not outlive the test: kill its whole process group (it may have
    // started a daemon in the background).
    const timer = setTimeout(() => {
      stderr += `\n[killed after ${opts.timeoutMs} ms]`;
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        // already gone
      }
    }, opts.timeoutMs ?? 60_000);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** The text of a file, for messages. */
export function readText(file: string): string {
  return readFileSync(file, 'utf8');
}
