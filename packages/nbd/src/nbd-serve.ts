// The runnable `nbd-serve` program: `node dist/nbd-serve.js --file disk.raw --port 0`. Prints
// where it listens as one JSON line on stdout (not when socket-activated: stdout then belongs to
// the client that started us) and closes cleanly on SIGINT/SIGTERM.
import { BlkError } from '@blkfilter/bio';
import { serveMain } from './serve-main.js';

try {
  const handle = await serveMain(process.argv.slice(2));
  if (!handle.socketActivated) process.stdout.write(`${JSON.stringify(handle.address)}\n`);
  let stopping = false;
  const stop = (): void => {
    if (stopping) return;
    stopping = true;
    handle.close().then(
      () => process.exit(0),
      (err: unknown) => {
        process.stderr.write(`nbd-serve: ${err instanceof Error ? err.message : String(err)}\n`);
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
} catch (err) {
  process.stderr.write(`nbd-serve: ${BlkError.isInstance(err) || err instanceof Error ? err.message : String(err)}\n`);
  process.exit(2);
}
