import fs from 'node:fs';
import path from 'node:path';
import type { CaseResult } from './bench-util.js';

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/**
 * Draws the ratios of a report as a horizontal bar chart: one bar per case, the 1.0 line
 * (parity with the baseline) marked, each bar labelled with the ratio and the baseline. A case
 * with a goal has its goal drawn across its bar, and is green when it meets it, red when not.
 */
export function reportSvg(results: readonly CaseResult[], title: string): string {
  const rowH = 26;
  // Room for the longest case name (12 px sans-serif: ~6.6 px a character), at least 470 px.
  const left = Math.max(470, Math.ceil(16 + 6.6 * Math.max(0, ...results.map((r) => r.name.length))));
  const width = left + 530;
  const barW = width - left - 160;
  const top = 50;
  const maxRatio = Math.max(1.2, ...results.map((r) => Math.max(r.ratio, r.goal ?? 0)));
  const x = (v: number): number => left + (Math.min(v, maxRatio) / maxRatio) * barW;
  const h = top + results.length * rowH + 40;
  const rows = results
    .map((r, i) => {
      const y = top + i * rowH;
      const color = r.goal !== undefined ? (r.ratio >= r.goal ? '#2f9e44' : '#e03131') : r.ratio >= 0.9 ? '#2f9e44' : r.ratio >= 0.5 ? '#f08c00' : '#e03131';
      const goal =
        r.goal === undefined
          ? ''
          : `<line x1="${x(r.goal).toFixed(1)}" y1="${y + 1}" x2="${x(r.goal).toFixed(1)}" y2="${y + rowH - 1}" stroke="#1c1c1c" stroke-width="3"><title>goal ${r.goal}x</title></line>`;
      return [
        `<text x="${left - 8}" y="${y + 17}" text-anchor="end" font-size="12">${esc(r.name)}</text>`,
        `<rect x="${left}" y="${y + 4}" width="${Math.max(1, x(r.ratio) - left).toFixed(1)}" height="${rowH - 8}" fill="${color}"/>`,
        goal,
        `<text x="${(Math.max(x(r.ratio), r.goal !== undefined ? x(r.goal) : 0) + 6).toFixed(1)}" y="${y + 17}" font-size="12">${r.ratio.toFixed(2)}x${r.goal !== undefined ? ` (goal ${r.goal}x)` : ''} <tspan fill="#868e96">vs ${esc(r.baseline.what)}</tspan></text>`,
      ].join('');
    })
    .join('\n');
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width + 260}" height="${h}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="16" y="28" font-size="16" font-weight="bold">${esc(title)}</text>
${rows}
<line x1="${x(1)}" y1="${top - 6}" x2="${x(1)}" y2="${h - 30}" stroke="#222" stroke-dasharray="4 3"/>
<text x="${x(1)}" y="${h - 14}" text-anchor="middle" font-size="11">1.0 = same speed as the baseline; a thick tick = the case's goal</text>
</svg>
`;
}

/** Writes `latest.json` and `latest.svg` into `dir`; returns their paths. */
export function saveReport(dir: string, report: { results: readonly CaseResult[]; date: string }): { json: string; svg: string } {
  fs.mkdirSync(dir, { recursive: true });
  const json = path.join(dir, 'latest.json');
  const svg = path.join(dir, 'latest.svg');
  fs.writeFileSync(json, `${JSON.stringify(report, null, 2)}\n`);
  fs.writeFileSync(svg, reportSvg(report.results, `blkfilter bench ${report.date}: throughput ratio against same-run baselines`));
  return { json, svg };
}
