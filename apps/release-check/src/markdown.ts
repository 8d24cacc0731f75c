import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';

/** A fenced code block of a Markdown file. */
export interface CodeBlock {
  /** The file, relative to the repository root. */
  readonly file: string;
  /** 1-based line of the opening fence. */
  readonly line: number;
  /** The first word of the info string (`ts`, `sh`, `text`), or '' when there is none. */
  readonly lang: string;
  readonly code: string;
  /** The reason given by a `<!-- no-run: reason -->` comment right before the fence, else null. */
  readonly noRun: string | null;
}

/** Languages a block may declare, and what the examples test does with each. */
export const LANGS = {
  ts: 'typescript',
  typescript: 'typescript',
  sh: 'shell',
  bash: 'shell',
  text: 'text',
} as const;

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)?.*$/;
// The marker must say why: `<!-- no-run -->` alone is reported by the test as a marker without reason.
const NO_RUN = /^\s*<!--\s*no-run\b:?\s*(.*?)\s*-->\s*$/;

/** Every fenced code block of `text`, with the no-run marker (if any) that precedes it. */
export function extractBlocks(file: string, text: string): CodeBlock[] {
  const lines = text.split('\n');
  const blocks: CodeBlock[] = [];
  let lastNonBlank = '';
  for (let i = 0; i < lines.length; i++) {
    const open = FENCE.exec(lines[i] ?? '');
    if (!open) {
      if ((lines[i] ?? '').trim() !== '') lastNonBlank = lines[i] ?? '';
      continue;
    }
    const fence = open[1] ?? '```';
    const lang = (open[2] ?? '').toLowerCase();
    const body: string[] = [];
    let j = i + 1;
    for (; j < lines.length; j++) {
      const l = lines[j] ?? '';
      if (l.trim().startsWith(fence[0]!.repeat(fence.length)) && l.trim().replaceAll(fence[0]!, '') === '') break;
      body.push(l);
    }
    const marker = NO_RUN.exec(lastNonBlank);
    blocks.push({ file, line: i + 1, lang, code: `${body.join('\n')}\n`, noRun: marker ? marker[1] ?? '' : null });
    lastNonBlank = '';
    i = j;
  }
  return blocks;
}

/** The Markdown files whose examples must hold: the root README, each workspace's, and docs/. */
export function markdownFiles(root: string): string[] {
  const files = ['README.md'];
  for (const base of ['packages', 'apps']) {
    for (const name of readdirSync(join(root, base)).sort()) {
      if (existsSync(join(root, base, name, 'README.md'))) files.push(`${base}/${name}/README.md`);
    }
  }
  const walk = (dir: string): void => {
    for (const entry of readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
      const p = join(dir, entry.name);
      if (entry.isDirectory()) walk(p);
      else if (entry.name.endsWith('.md')) files.push(relative(root, p));
    }
  };
  walk(join(root, 'docs'));
  return files;
}

/** Every block of every file {@link markdownFiles} lists. */
export function allBlocks(root: string): CodeBlock[] {
  return markdownFiles(root).flatMap((f) => extractBlocks(f, readFileSync(join(root, f), 'utf8')));
}
