import fs from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { BlkError, InvalidArgumentError } from '@blkfilter/bio';
import { renderMetrics, type MetricsSource } from './metrics.js';
import type { StatusModel } from './status-model.js';

// The status page's server: static assets shipped in the package (assets/, uPlot from its own
// package), a read-only JSON/binary API over the daemon's status model, Server-Sent Events for
// the live charts and /metrics for Prometheus. Nothing here changes state: GET and HEAD only.

/** Most buckets one heat-map request may ask for (a 1024 x 1024 canvas). */
export const HEATMAP_MAX_BUCKETS = 1 << 20;

/** What the HTTP server reads from the daemon. */
export interface HttpSource extends MetricsSource {
  /** CBT info of a tracked device (throws when the device has no CBT). */
  cbtInfo(device: string): Promise<{ blockSize: number; blockCount: number; snapNumber: number; changesNumber: number; generationId: string }>;
  /** The CBT read map, one byte per block. */
  cbtMap(device: string, range: { offset: number; length: number }): Promise<Uint8Array>;
  /** The last backups of each folder the daemon backed up to (newest first). */
  backups(): Promise<unknown[]>;
}

/** Options of {@link startHttpServer}. */
export interface HttpServerOptions {
  /** `HOST:PORT` or `PORT` (host defaults to 127.0.0.1, loopback). */
  readonly listen: string;
  readonly source: HttpSource;
  readonly log?: (line: string) => void;
}

/** A running status-page server. */
export interface StatusHttpServer {
  /** Where it listens. */
  readonly host: string;
  readonly port: number;
  close(): Promise<void>;
}

/** Parses `--http`: `HOST:PORT`, `[V6]:PORT` or a bare `PORT`, saying which part is wrong. */
export function parseHttpAddress(value: string): { host: string; port: number } {
  const m = /^(?:(?:\[([^\]]+)\]|([^:[\]]*)):)?(\d+)$/.exec(value.trim());
  if (m === null) throw new InvalidArgumentError(`--http ${value}: expected HOST:PORT or PORT (e.g. 127.0.0.1:8080, [::1]:8080, 8080)`);
  const host = m[1] ?? (m[2] || '127.0.0.1');
  const port = Number(m[3]);
  if (port > 65535) throw new InvalidArgumentError(`--http ${value}: port ${port} is not from 0 to 65535`);
  if (m[1] !== undefined && !net.isIPv6(host)) throw new InvalidArgumentError(`--http ${value}: "${host}" is not an IPv6 address`);
  if (m[1] === undefined && !net.isIPv4(host) && !/^[A-Za-z0-9.-]+$/.test(host)) throw new InvalidArgumentError(`--http ${value}: "${host}" is not an IP address or host name`);
  return { host, port };
}

const ASSET_TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
};

/** The package's own assets folder (next to dist/ in the package; tsup's chunks sit in dist/). */
function assetsDir(): string {
  return path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'assets');
}

/** Every file the page may fetch, read once at start: a path not in this map is a 404. */
function loadAssets(): Map<string, { body: Buffer; type: string }> {
  const files = new Map<string, { body: Buffer; type: string }>();
  const dir = assetsDir();
  for (const name of fs.readdirSync(dir)) {
    const type = ASSET_TYPES[path.extname(name)];
    if (type !== undefined) files.set(`/assets/${name}`, { body: fs.readFileSync(path.join(dir, name)), type });
  }
  // uPlot from its own package, resolved the way Node resolves our imports: no copy, no CDN.
  const require = createRequire(import.meta.url);
  files.set('/assets/uPlot.iife.min.js', { body: fs.readFileSync(require.resolve('uplot/dist/uPlot.iife.min.js')), type: ASSET_TYPES['.js'] as string });
  files.set('/assets/uPlot.min.css', { body: fs.readFileSync(require.resolve('uplot/dist/uPlot.min.css')), type: ASSET_TYPES['.css'] as string });
  const index = files.get('/assets/index.html');
  if (index !== undefined) files.set('/', index);
  return files;
}

class HttpError extends Error {
  readonly status: number;
  constructor(status: number, message: string) {
    super(message);
    this.status = status;
  }
}

function intParam(url: URL, key: string, fallback?: number): number {
  const v = url.searchParams.get(key);
  if (v === null) {
    if (fallback !== undefined) return fallback;
    throw new HttpError(400, `missing ?${key}=`);
  }
  if (!/^\d{1,15}$/.test(v)) throw new HttpError(400, `?${key}=${v.slice(0, 40)} is not a whole number`);
  return Number(v);
}

/**
 * Max of each run of `per` bytes of `map` (the last run may be shorter): the heat map keeps
 * the newest generation a bucket saw, so one changed block is never averaged away.
 */
export function downsampleMax(map: Uint8Array, per: number): Uint8Array {
  const n = Math.ceil(map.length / per);
  const out = new Uint8Array(n);
  if (per === 1) {
    out.set(map);
    return out;
  }
  for (let i = 0, j = 0; i < n; i++) {
    const end = Math.min(j + per, map.length);
    let m = 0;
    for (; j < end; j++) {
      const v = map[j] as number;
      if (v > m) m = v;
    }
    out[i] = m;
  }
  return out;
}

/**
 * Starts the status page and API on `listen` (loopback unless told otherwise). Resolves once
 * listening. Routes: `/` (the page), `/assets/*`, `/api/status` (the status model, as
 * `status --json`), `/api/cbt?device=`, `/api/heatmap?device=&offset=&length=&buckets=`
 * (binary), `/api/backups`, `/api/live` (Server-Sent Events, one sample a second), `/metrics`.
 */
export async function startHttpServer(options: HttpServerOptions): Promise<StatusHttpServer> {
  const { host, port } = parseHttpAddress(options.listen);
  const src = options.source;
  const assets = loadAssets();
  const live = new Set<http.ServerResponse>();
  let timer: NodeJS.Timeout | null = null;

  const tick = (): void => {
    void (async () => {
      const status = await src.status();
      const msg = `data: ${JSON.stringify({ t: Date.now(), io: src.io.sample(), status })}\n\n`;
      for (const res of live) res.write(msg);
    })().catch((err: unknown) => options.log?.(`http: live sample failed: ${String(err)}`));
  };

  const route = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.setHeader('Allow', 'GET, HEAD');
      throw new HttpError(405, `${String(req.method)} is not allowed: the status page is read-only`);
    }
    let url: URL;
    try {
      url = new URL(req.url ?? '/', 'http://localhost');
    } catch {
      throw new HttpError(400, 'bad request URL');
    }
    const p = url.pathname;
    const asset = assets.get(p);
    if (asset !== undefined) {
      res.writeHead(200, { 'Content-Type': asset.type, 'Content-Length': asset.body.length, 'Cache-Control': 'no-cache' });
      res.end(req.method === 'HEAD' ? undefined : asset.body);
      return;
    }
    switch (p) {
      case '/api/status':
        return json(res, await src.status());
      case '/api/backups':
        return json(res, await src.backups());
      case '/api/cbt':
        return json(res, await src.cbtInfo(await cbtDevice(url)));
      case '/api/heatmap': {
        const device = await cbtDevice(url);
        const info = await src.cbtInfo(device);
        const offset = intParam(url, 'offset', 0);
        const length = intParam(url, 'length', info.blockCount - Math.min(offset, info.blockCount));
        const buckets = intParam(url, 'buckets', 4096);
        if (offset + length > info.blockCount || length === 0) throw new HttpError(400, `blocks ${offset} + ${length} are not inside the map of ${info.blockCount} blocks`);
        if (buckets < 1 || buckets > HEATMAP_MAX_BUCKETS) throw new HttpError(400, `?buckets= must be from 1 to ${HEATMAP_MAX_BUCKETS}`);
        if (info.snapNumber === 0) throw new HttpError(409, `the CBT map of "${device}" has no take yet: take a snapshot first`);
        const per = Math.ceil(length / buckets);
        const body = downsampleMax(await src.cbtMap(device, { offset, length }), per);
        res.writeHead(200, {
          'Content-Type': 'application/octet-stream',
          'Content-Length': body.length,
          'Cache-Control': 'no-store',
          'X-Block-Size': String(info.blockSize),
          'X-Block-Count': String(info.blockCount),
          'X-Blocks-Per-Bucket': String(per),
          'X-Snap-Number': String(info.snapNumber),
        });
        res.end(req.method === 'HEAD' ? undefined : Buffer.from(body.buffer, body.byteOffset, body.length));
        return;
      }
      case '/api/live': {
        res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-store', Connection: 'keep-alive' });
        res.write('retry: 2000\n\n');
        live.add(res);
        if (timer === null) {
          // The baseline: the first sample then covers one second, not the time since the last client left.
          src.io.sample();
          timer = setInterval(tick, 1000);
        }
        req.on('close', () => {
          live.delete(res);
          if (live.size === 0 && timer !== null) {
            clearInterval(timer);
            timer = null;
          }
        });
        return;
      }
      case '/metrics': {
        const m = await renderMetrics(src);
        res.writeHead(200, { 'Content-Type': m.contentType, 'Cache-Control': 'no-store' });
        res.end(m.text);
        return;
      }
      default:
        throw new HttpError(404, `no such page: ${p.slice(0, 100)}`);
    }
  };

  const cbtDevice = async (url: URL): Promise<string> => {
    const device = url.searchParams.get('device');
    if (device === null || device === '') throw new HttpError(400, 'missing ?device=');
    const status = await src.status();
    const tracked = status.devices.some((d) => d.name === device && d.filters.some((f) => f.name === 'cbt'));
    if (!tracked) throw new HttpError(404, `no device "${device.slice(0, 100)}" with CBT attached`);
    return device;
  };

  const server = http.createServer((req, res) => {
    route(req, res).catch((err: unknown) => {
      // A bad range or name the library refused is the request's fault, not the daemon's.
      const status = err instanceof HttpError ? err.status : BlkError.isInstance(err) && (err.code === 'EINVAL' || err.code === 'ENODEV') ? 400 : 500;
      if (status === 500) options.log?.(`http: ${req.method} ${req.url}: ${String(err)}`);
      if (res.headersSent) {
        res.destroy();
        return;
      }
      json(res, { error: err instanceof Error ? err.message : String(err) }, status);
    });
  });
  server.on('clientError', (_err, socket) => {
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
    else socket.destroy();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const addr = server.address() as net.AddressInfo;
  return {
    host: addr.address,
    port: addr.port,
    close: async () => {
      if (timer !== null) clearInterval(timer);
      timer = null;
      for (const res of live) res.end();
      live.clear();
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

function json(res: http.ServerResponse, value: unknown, status = 200): void {
  const body = JSON.stringify(value);
  res.writeHead(status, { 'Content-Type': 'application/json; charset=utf-8', 'Content-Length': Buffer.byteLength(body), 'Cache-Control': 'no-store' });
  res.end(body);
}

export type { StatusModel };
