/// <reference lib="dom" />
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

// `blkfilter serve --http`, as a user runs it (dist/cli.js), judged by a Prometheus text-format
// parser and by Debian's chromium driven by puppeteer-core (no browser download).
const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');
const require = createRequire(import.meta.url);
type PromFamily = { name: string; type: string; metrics: Array<{ labels?: Record<string, string>; value?: string; buckets?: Record<string, string>; count?: string }> };
const parseProm = require('parse-prometheus-text-format') as (text: string) => PromFamily[];
const CHROMIUM = '/usr/bin/chromium';
const haveQemuIo = spawnSync('qemu-io', ['--version'], { stdio: 'ignore' }).status === 0;
const haveChromium = fs.existsSync(CHROMIUM);
if (!haveChromium) console.log(`status page browser test skipped: no ${CHROMIUM} (apt-get install chromium)`);
if (!haveQemuIo) console.log('status page tests skipped: no qemu-io (apt-get install qemu-utils)');
const OUT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'test-output');

interface Served {
  readonly proc: ChildProcess;
  readonly control: string;
  readonly http: string;
  readonly nbdPort: number;
}

async function serve(dir: string, image: string, extra: string[] = []): Promise<Served> {
  const control = path.join(dir, `${path.basename(image)}.sock`);
  const proc = spawn(process.execPath, [CLI, '--control', control, 'serve', '--state-dir', path.join(dir, 'state'), '--cbt', '--listen', '127.0.0.1:0', '--http', '127.0.0.1:0', ...extra, image], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  const http = await new Promise<string>((resolve, reject) => {
    proc.stderr?.on('data', (d: Buffer) => {
      log += d.toString();
      const m = /status page on (http:\/\/[^/\s]+)\//.exec(log);
      if (m !== null && log.includes('ready')) resolve(m[1] as string);
    });
    proc.on('exit', (code) => reject(new Error(`daemon exited ${code}: ${log}`)));
  });
  const status = JSON.parse(blk(control, 'status', '--json')) as { nbd: { port: number } };
  return { proc, control, http, nbdPort: status.nbd.port };
}

function blk(control: string, ...args: string[]): string {
  return execFileSync(process.execPath, [CLI, '--control', control, ...args], { encoding: 'utf8' });
}

async function stop(s: Served | undefined): Promise<void> {
  if (s === undefined || s.proc.exitCode !== null) return;
  s.proc.kill('SIGTERM');
  await new Promise((r) => s.proc.once('exit', r));
}

const KiB64 = 64 * 1024;

describe.skipIf(!haveQemuIo)('serve --http: the status page, its API and /metrics', () => {
  let dir: string;
  let d: Served;
  let snapshotId: string;
  const writes = [
    { at: 4 << 20, n: 8 }, // blocks 64..71
    { at: 20 << 20, n: 3 }, // blocks 320..322
  ];

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-http-'));
    const img = path.join(dir, 'disk.raw');
    fs.writeFileSync(img, '');
    fs.truncateSync(img, 64 << 20);
    d = await serve(dir, img);
    // A known pattern: 64 KiB writes, one NBD request each.
    const cmds = writes.flatMap((w) => Array.from({ length: w.n }, (_, i) => ['-c', `write -P 0x5a ${w.at + i * KiB64} 64k`]).flat());
    execFileSync('qemu-io', ['-f', 'raw', `nbd://127.0.0.1:${d.nbdPort}/disk`, ...cmds], { stdio: 'ignore' });
    snapshotId = (JSON.parse(blk(d.control, 'snapshot', 'create', 'disk', '--storage', 'memory', '--limit', '16M', '--json')) as { id: string }).id;
    blk(d.control, 'snapshot', 'take', snapshotId);
    // After the take: copy-on-write fills the diff storage (2 chunks of 256 KiB).
    execFileSync('qemu-io', ['-f', 'raw', `nbd://127.0.0.1:${d.nbdPort}/disk`, '-c', 'write -P 0x77 0 512k'], { stdio: 'ignore' });
  }, 120_000);
  afterAll(async () => {
    await stop(d);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('serves /metrics in Prometheus text format, with counters equal to the I/O done', async () => {
    const res = await fetch(`${d.http}/metrics`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/plain/);
    const text = await res.text();
    const fams = parseProm(text);
    const value = (name: string, labels: Record<string, string>): number => {
      const fam = fams.find((f) => f.name === name);
      const m = fam?.metrics.find((x) => Object.entries(labels).every(([k, v]) => x.labels?.[k] === v));
      if (m === undefined) throw new Error(`no ${name} ${JSON.stringify(labels)}`);
      return Number(m.value ?? m.count);
    };
    const nWrites = writes.reduce((n, w) => n + w.n, 0) + 1;
    const wBytes = writes.reduce((n, w) => n + w.n * KiB64, 0) + 512 * 1024;
    expect(value('blkfilter_nbd_export_ops_total', { export: 'disk', op: 'write' })).toBe(nWrites);
    expect(value('blkfilter_nbd_export_bytes_total', { export: 'disk', op: 'write' })).toBe(wBytes);
    // The device saw the same writes, plus the copy-on-write read of the two chunks.
    expect(value('blkfilter_device_bytes_total', { device: 'disk', op: 'write' })).toBe(wBytes);
    expect(value('blkfilter_device_bytes_total', { device: 'disk', op: 'read' })).toBeGreaterThanOrEqual(512 * 1024);
    expect(value('blkfilter_cbt_changed_bytes', { device: 'disk' })).toBe(11 * KiB64);
    expect(value('blkfilter_cbt_snap_number', { device: 'disk' })).toBe(1);
    const status = JSON.parse(blk(d.control, 'status', '--json')) as { snapshots: Array<{ storage: { usedBytes: number; limitBytes: number } }> };
    expect(value('blkfilter_snapshot_diff_storage_used_bytes', { snapshot: snapshotId })).toBe(status.snapshots[0]?.storage.usedBytes);
    expect(value('blkfilter_snapshot_diff_storage_used_bytes', { snapshot: snapshotId })).toBe(512 * 1024);
    expect(value('blkfilter_snapshot_diff_storage_limit_bytes', { snapshot: snapshotId })).toBe(16 << 20);
    expect(value('blkfilter_snapshot_state', { snapshot: snapshotId, state: 'taken' })).toBe(1);
    expect(value('blkfilter_nbd_connections', { export: 'disk' })).toBe(0);
    // Histograms: this parser folds every series of a histogram into one (it drops their
    // labels), so it gets one series at a time: cumulative buckets ending at +Inf = count.
    const series = '{export="disk",device="disk",class="write"';
    const one = text
      .split('\n')
      .filter((l) => /^# (HELP|TYPE) blkfilter_nbd_export_latency_seconds /.test(l) || l.startsWith(`blkfilter_nbd_export_latency_seconds_bucket${series},`) || l.startsWith(`blkfilter_nbd_export_latency_seconds_sum${series}}`) || l.startsWith(`blkfilter_nbd_export_latency_seconds_count${series}}`))
      .map((l) => l.replace(`${series},`, '{').replace(`${series}}`, ''))
      .join('\n');
    const lat = parseProm(`${one}\n`)[0]?.metrics[0];
    const buckets = Object.values(lat?.buckets ?? {}).map(Number);
    expect(buckets.length).toBeGreaterThan(10);
    expect(buckets).toEqual([...buckets].sort((a, b) => a - b));
    expect(buckets.at(-1)).toBe(nWrites);
    expect(Number(lat?.count)).toBe(nWrites);
  });

  it('serves /api/status exactly as status --json prints it', async () => {
    const api: unknown = await (await fetch(`${d.http}/api/status`)).json();
    expect(api).toEqual(JSON.parse(blk(d.control, 'status', '--json')));
  });

  it('answers bad requests with 4xx and keeps serving', async () => {
    const code = async (p: string, init?: RequestInit): Promise<number> => (await fetch(`${d.http}${p}`, init)).status;
    expect(await code('/api/status', { method: 'POST', body: 'x' })).toBe(405);
    expect(await code('/api/status', { method: 'DELETE' })).toBe(405);
    expect(await code('/nope')).toBe(404);
    expect(await code('/assets/../package.json')).toBe(404);
    expect(await code('/api/heatmap')).toBe(400);
    expect(await code('/api/heatmap?device=nosuch')).toBe(404);
    expect(await code('/api/heatmap?device=disk&offset=abc')).toBe(400);
    expect(await code('/api/heatmap?device=disk&offset=1000&length=100')).toBe(400);
    expect(await code('/api/heatmap?device=disk&buckets=0')).toBe(400);
    expect(await code('/api/heatmap?device=disk&buckets=99999999')).toBe(400);
    expect(await code('/api/heatmap?device=disk&offset=99999999999999999999')).toBe(400);
    expect(await code('/api/status')).toBe(200);
    expect(d.proc.exitCode).toBe(null);
  });

  it('downsamples the heat map by the max of each bucket', async () => {
    const res = await fetch(`${d.http}/api/heatmap?device=disk&buckets=128`);
    expect(res.headers.get('content-type')).toBe('application/octet-stream');
    expect(res.headers.get('x-blocks-per-bucket')).toBe('8');
    const map = new Uint8Array(await res.arrayBuffer());
    expect(map.length).toBe(128);
    // Blocks 64..71 are bucket 8; 320..322 are bucket 40: changed in take 1, the rest not.
    expect([...map].flatMap((g, i) => (g !== 0 ? [i] : []))).toEqual([8, 40]);
    expect(map[8]).toBe(1);
  });

  describe.skipIf(!haveChromium)('in headless chromium', () => {
    it('shows the devices, a heat map whose changed cells are the writes, and the diff-storage fill of status --json', async () => {
      const { default: puppeteer } = await import('puppeteer-core');
      const browser = await puppeteer.launch({
        executablePath: CHROMIUM,
        headless: true,
        userDataDir: fs.mkdtempSync(path.join(dir, 'chromium-')),
        args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
      });
      let big: Served | undefined;
      try {
        const page = await browser.newPage();
        await page.setViewport({ width: 1280, height: 1400 });
        await page.goto(`${d.http}/`);
        await page.waitForSelector('body[data-ready="true"]');
        await page.waitForSelector('canvas[data-device="disk"][data-render-ms]');
        expect(await page.$eval('#devices', (e) => e.textContent)).toMatch(/disk.*64 MiB.*cbt @1000.*snapshot-cow @500/s);

        // Read the canvas back: every cell's colour says changed or not; the changed cells are
        // exactly the blocks written before the take.
        const cells = await page.$eval('canvas[data-device="disk"]', (c) => {
          const canvas = c as HTMLCanvasElement;
          const { cols, cell, per, length } = canvas.dataset;
          const ctx = canvas.getContext('2d') as CanvasRenderingContext2D;
          const out: string[] = [];
          const n = Math.ceil(Number(length) / Number(per));
          for (let i = 0; i < n; i++) {
            const x = (i % Number(cols)) * Number(cell);
            const y = Math.floor(i / Number(cols)) * Number(cell);
            const p = ctx.getImageData(x, y, 1, 1).data;
            out.push(`${p[0]},${p[1]},${p[2]}`);
          }
          return { out, per: Number(per) };
        });
        expect(cells.per).toBe(1);
        const unchanged = cells.out[0];
        const changed = cells.out.flatMap((c, i) => (c !== unchanged ? [i] : []));
        const expected = writes.flatMap((w) => Array.from({ length: w.n }, (_, i) => w.at / KiB64 + i));
        expect(changed).toEqual(expected);
        expect(new Set(changed.map((i) => cells.out[i]))).toEqual(new Set(['220,40,30']));

        // The diff-storage fill is status --json's.
        const status = JSON.parse(blk(d.control, 'status', '--json')) as { snapshots: Array<{ id: string; storage: { usedBytes: number; limitBytes: number } }> };
        const row = await page.$eval(`tr[data-snapshot="${snapshotId}"]`, (e) => ({ used: Number(e.getAttribute('data-used')), limit: Number(e.getAttribute('data-limit')), text: e.textContent }));
        expect(row.used).toBe(status.snapshots[0]?.storage.usedBytes);
        expect(row.limit).toBe(status.snapshots[0]?.storage.limitBytes);
        expect(row.text).toMatch(/512 KiB of 16 MiB \(3\.1%\)/);

        // Live charts: a sample arrives by Server-Sent Events and makes a uPlot row.
        const samples = (): Promise<number> => page.$eval('.chartrow[data-key="export:disk"]', (e) => Number((e as HTMLElement).dataset.samples));
        await page.waitForFunction(() => Number(document.querySelector<HTMLElement>('.chartrow[data-key="export:disk"]')?.dataset.samples) >= 2, { timeout: 30_000 });
        const before = await samples();
        // Some load while the charts fill (what it shows is looked at, not asserted).
        const load = spawn('qemu-io', ['-f', 'raw', `nbd://127.0.0.1:${d.nbdPort}/disk`, ...Array.from({ length: 400 }, (_, i) => ['-c', `read ${(i % 256) * KiB64} 64k`]).flat()], { stdio: 'ignore' });
        await new Promise((r) => load.once('exit', r));
        await page.waitForFunction((n: number) => Number(document.querySelector<HTMLElement>('.chartrow[data-key="export:disk"]')?.dataset.samples) >= n + 3, { timeout: 30_000 }, before);
        await page.waitForFunction(() => document.querySelector('#conn')?.textContent === 'live');
        fs.mkdirSync(OUT, { recursive: true });
        await page.screenshot({ path: path.join(OUT, 'status-page.png'), fullPage: true });
        console.log(`status page screenshot: ${path.join(OUT, 'status-page.png')}`);

        // A 1 TiB disk: 2,097,152 CBT blocks of 512 KiB, drawn whole (a figure, not an assert).
        const bigImg = path.join(dir, 'big.raw');
        fs.writeFileSync(bigImg, '');
        fs.truncateSync(bigImg, 2 ** 40);
        big = await serve(dir, bigImg);
        execFileSync('qemu-io', ['-f', 'raw', `nbd://127.0.0.1:${big.nbdPort}/big`, '-c', 'write -z 100G 1G', '-c', 'write 700G 64k'], { stdio: 'ignore' });
        const id = (JSON.parse(blk(big.control, 'snapshot', 'create', 'big', '--storage', 'memory', '--json')) as { id: string }).id;
        blk(big.control, 'snapshot', 'take', id);
        const page2 = await browser.newPage();
        await page2.goto(`${big.http}/`);
        await page2.waitForSelector('canvas[data-device="big"][data-render-ms]', { timeout: 60_000 });
        const figure = await page2.$eval('canvas[data-device="big"]', (c) => ({ ms: (c as HTMLCanvasElement).dataset.renderMs, per: (c as HTMLCanvasElement).dataset.per }));
        console.log(`1 TiB heat map (2,097,152 blocks, ${figure.per} per pixel): fetched and drawn in ${figure.ms} ms`);
        expect(figure.per).toBe('8');
        await page2.screenshot({ path: path.join(OUT, 'status-page-1tib.png') });
      } finally {
        await browser.close();
        await stop(big);
      }
    }, 180_000);
  });
});
