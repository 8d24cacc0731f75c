import net from 'node:net';
import { BlkError } from '@blkfilter/bio';

// The control channel between `blkfilter serve` and the other commands: JSON lines over a unix
// socket. A request is { id, method, params }; the answer is { id, result } or
// { id, error: { code, message } }, with any number of { id, progress } lines before it.

/** A method of the control server: may report progress while it runs. */
export type ControlMethod = (params: Record<string, unknown>, progress: (p: unknown) => void) => Promise<unknown> | unknown;

/** The daemon could not be reached, or answered with an error. */
export class ControlError extends BlkError {}

/** Listens on `socketPath` and serves `methods`. Resolves with the server once listening. */
export async function startControlServer(socketPath: string, methods: Record<string, ControlMethod>): Promise<net.Server> {
  const server = net.createServer((sock) => {
    let buf = '';
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => {
      buf += chunk;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim() !== '') void handle(line);
      }
      if (buf.length > 1 << 20) sock.destroy(); // no line is that long: not a client of ours
    });
    sock.on('error', () => {});
    const send = (msg: unknown): void => {
      if (!sock.destroyed) sock.write(`${JSON.stringify(msg)}\n`);
    };
    const handle = async (line: string): Promise<void> => {
      let id: unknown = null;
      try {
        const req = JSON.parse(line) as { id?: unknown; method?: unknown; params?: unknown };
        id = req.id ?? null;
        const method = typeof req.method === 'string' && Object.hasOwn(methods, req.method) ? methods[req.method] : undefined;
        if (method === undefined) {
          throw new BlkError('ENOSYS', `unknown control method ${JSON.stringify(req.method)} (known: ${Object.keys(methods).sort().join(', ')})`);
        }
        const params = typeof req.params === 'object' && req.params !== null ? (req.params as Record<string, unknown>) : {};
        const result = await method(params, (p) => send({ id, progress: p }));
        send({ id, result: result ?? null });
      } catch (err) {
        const code = BlkError.isInstance(err) ? err.code : ((err as NodeJS.ErrnoException).code ?? 'EIO');
        send({ id, error: { code, message: (err as Error).message ?? String(err) } });
      }
    };
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return server;
}

/**
 * Calls `method` on the daemon at `socketPath`; `onProgress` sees progress lines. Rejects with
 * a {@link ControlError} carrying the daemon's code, or ECONNREFUSED/ENOENT when none runs.
 */
export function callControl(socketPath: string, method: string, params: Record<string, unknown> = {}, onProgress?: (p: unknown) => void): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(socketPath);
    let buf = '';
    let settled = false;
    const finish = (fn: () => void): void => {
      if (settled) return;
      settled = true;
      sock.end();
      fn();
    };
    sock.setEncoding('utf8');
    sock.on('connect', () => sock.write(`${JSON.stringify({ id: 1, method, params })}\n`));
    sock.on('data', (chunk: string) => {
      buf += chunk;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const msg = JSON.parse(buf.slice(0, nl)) as { progress?: unknown; result?: unknown; error?: { code: string; message: string } };
        buf = buf.slice(nl + 1);
        if (msg.progress !== undefined) onProgress?.(msg.progress);
        else if (msg.error !== undefined) finish(() => reject(new ControlError(msg.error?.code ?? 'EIO', msg.error?.message ?? 'error')));
        else finish(() => resolve(msg.result));
      }
    });
    sock.on('error', (err: NodeJS.ErrnoException) =>
      finish(() =>
        reject(
          err.code === 'ENOENT' || err.code === 'ECONNREFUSED'
            ? new ControlError(err.code, `no blkfilter daemon at ${socketPath}: start one with \`blkfilter serve IMAGE\` (or pass --control PATH)`)
            : err,
        ),
      ),
    );
    sock.on('close', () => finish(() => reject(new ControlError('EPIPE', `the daemon at ${socketPath} closed the connection before answering ${method}`))));
  });
}
