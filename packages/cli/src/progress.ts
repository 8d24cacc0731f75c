import cliProgress from 'cli-progress';

/** Human bytes: 1.5 GiB, 320 KiB. */
export function humanBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(v >= 100 ? 0 : 1)} ${units[u]}`;
}

/**
 * A progress reporter for a copy: a bar with bytes, rate and ETA on a terminal (stderr), nothing
 * otherwise (pipes and CI stay clean). Returns the callback and a `stop()`.
 */
export function progressBar(label: string, enabled = process.stderr.isTTY === true): { update: (done: number, total: number) => void; stop: () => void } {
  if (!enabled) return { update: () => {}, stop: () => {} };
  const started = Date.now();
  const bar = new cliProgress.SingleBar(
    {
      format: `${label} {bar} {percentage}% | {doneH} / {totalH} | {rate}/s | ETA {eta_formatted}`,
      stream: process.stderr,
      hideCursor: true,
      clearOnComplete: false,
      etaBuffer: 50,
    },
    cliProgress.Presets.shades_classic,
  );
  let startedBar = false;
  return {
    update(done, total) {
      const seconds = Math.max(0.001, (Date.now() - started) / 1000);
      const payload = { doneH: humanBytes(done), totalH: humanBytes(total), rate: humanBytes(done / seconds) };
      if (!startedBar) {
        bar.start(Math.max(1, total), done, payload);
        startedBar = true;
      } else {
        bar.setTotal(Math.max(1, total));
        bar.update(done, payload);
      }
    },
    stop() {
      if (startedBar) bar.stop();
    },
  };
}
