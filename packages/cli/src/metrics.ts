import { blkStatusName, IO_LATENCY_BUCKETS, IO_STATS_OPS, IoStats, isReqOp, opName } from '@blkfilter/bio';
import { Registry, type Metric } from 'prom-client';
import type { DaemonIoStats } from './io-stats.js';
import type { StatusModel } from './status-model.js';

type Labels = Record<string, string | number>;
interface Value {
  readonly metricName?: string;
  readonly labels: Labels;
  readonly value: number;
}
interface Family {
  readonly name: string;
  readonly help: string;
  readonly type: 'counter' | 'gauge' | 'histogram';
  readonly values: Value[];
}

/** What `/metrics` reads at each scrape (nothing is counted here; the data path counts). */
export interface MetricsSource {
  readonly io: DaemonIoStats;
  /** The status model, as `status --json` prints it. */
  status(): Promise<StatusModel>;
  /** Open NBD connections per export. */
  connections(): Map<string, number>;
  /** CBT of a tracked device: the active changes number and the bytes the read map says changed in the last take. */
  cbt(device: string): Promise<{ changesNumber: number; snapNumber: number; changedBytes: number } | null>;
}

const CLASS_NAMES = ['read', 'write', 'flush'] as const;

function ioFamilies(prefix: string, what: string, rows: ReadonlyArray<{ labels: Labels; stats: IoStats }>): Family[] {
  const ops: Family = { name: `${prefix}_ops_total`, help: `Completed ${what} requests by op (errors included).`, type: 'counter', values: [] };
  const bytes: Family = { name: `${prefix}_bytes_total`, help: `Bytes of ${what} requests that completed OK, by op.`, type: 'counter', values: [] };
  const errors: Family = { name: `${prefix}_errors_total`, help: `Failed ${what} requests by block-layer status.`, type: 'counter', values: [] };
  const latency: Family = { name: `${prefix}_latency_seconds`, help: `Time from submission to completion of ${what} requests.`, type: 'histogram', values: [] };
  for (const { labels, stats } of rows) {
    for (let op = 0; op < IO_STATS_OPS; op++) {
      if (!isReqOp(op)) continue;
      const l = { ...labels, op: opName(op).toLowerCase() };
      ops.values.push({ labels: l, value: stats.ops[op] as number });
      bytes.values.push({ labels: l, value: stats.bytes[op] as number });
    }
    stats.errors.forEach((n, status) => {
      if (n > 0) errors.values.push({ labels: { ...labels, status: blkStatusName(status) }, value: n });
    });
    for (let c = 0; c < 3; c++) {
      const l = { ...labels, class: CLASS_NAMES[c] as string };
      let cum = 0;
      for (let b = 0; b < IO_LATENCY_BUCKETS; b++) {
        cum += stats.latency[c * IO_LATENCY_BUCKETS + b] as number;
        const le = IoStats.bucketUpperSeconds(b);
        // Every bucket from 8 µs up: finer ones say nothing a scrape can use.
        if (b >= 3) latency.values.push({ metricName: `${prefix}_latency_seconds_bucket`, labels: { ...l, le: le === Infinity ? '+Inf' : String(le) }, value: cum });
      }
      latency.values.push({ metricName: `${prefix}_latency_seconds_sum`, labels: l, value: (stats.latencySumMs[c] as number) / 1000 });
      latency.values.push({ metricName: `${prefix}_latency_seconds_count`, labels: l, value: cum });
    }
  }
  return [ops, bytes, errors, latency];
}

/** Collects every family once per scrape. */
export async function collectFamilies(src: MetricsSource): Promise<Family[]> {
  const status = await src.status();
  const fams: Family[] = [];
  const devRows = [...src.io.devices.values()].flatMap((d) => (d.stats !== null ? [{ labels: { device: d.name }, stats: d.stats }] : []));
  fams.push(...ioFamilies('blkfilter_device', 'block-device', devRows));
  const expRows = [...src.io.exports].map(([name, e]) => ({ labels: { export: name, device: e.device }, stats: e.stats }));
  fams.push(...ioFamilies('blkfilter_nbd_export', 'NBD', expRows));
  const conns = src.connections();
  fams.push({
    name: 'blkfilter_nbd_connections',
    help: 'Open NBD client connections per export.',
    type: 'gauge',
    values: [...src.io.exports.keys()].map((name) => ({ labels: { export: name }, value: conns.get(name) ?? 0 })),
  });

  const gen: Family = { name: 'blkfilter_cbt_changes_number', help: 'Active CBT generation (changes number, 1..255) per tracked device.', type: 'gauge', values: [] };
  const snapNo: Family = { name: 'blkfilter_cbt_snap_number', help: 'CBT take number of the read map (0 before the first take).', type: 'gauge', values: [] };
  const changed: Family = { name: 'blkfilter_cbt_changed_bytes', help: 'Bytes of blocks the CBT read map marks as changed in the last take.', type: 'gauge', values: [] };
  for (const d of status.devices) {
    if (!d.filters.some((f) => f.name === 'cbt')) continue;
    const c = await src.cbt(d.name);
    if (c === null) continue;
    gen.values.push({ labels: { device: d.name }, value: c.changesNumber });
    snapNo.values.push({ labels: { device: d.name }, value: c.snapNumber });
    changed.values.push({ labels: { device: d.name }, value: c.changedBytes });
  }
  fams.push(gen, snapNo, changed);

  const used: Family = { name: 'blkfilter_snapshot_diff_storage_used_bytes', help: 'Bytes of chunks stored in a snapshot\'s diff storage.', type: 'gauge', values: [] };
  const alloc: Family = { name: 'blkfilter_snapshot_diff_storage_allocated_bytes', help: 'Bytes of diff storage allocated so far.', type: 'gauge', values: [] };
  const limit: Family = { name: 'blkfilter_snapshot_diff_storage_limit_bytes', help: 'Most bytes the diff storage may grow to.', type: 'gauge', values: [] };
  const state: Family = { name: 'blkfilter_snapshot_state', help: 'Snapshot state: 1 for the state it is in.', type: 'gauge', values: [] };
  const copied: Family = { name: 'blkfilter_snapshot_copied_chunks', help: 'Chunks saved in diff storage, per device of the snapshot.', type: 'gauge', values: [] };
  for (const s of status.snapshots) {
    used.values.push({ labels: { snapshot: s.id }, value: s.storage.usedBytes });
    alloc.values.push({ labels: { snapshot: s.id }, value: s.storage.allocatedBytes });
    limit.values.push({ labels: { snapshot: s.id }, value: s.storage.limitBytes });
    for (const st of ['created', 'taken', 'corrupted', 'destroyed']) state.values.push({ labels: { snapshot: s.id, state: st }, value: s.state === st ? 1 : 0 });
    for (const d of s.devices) copied.values.push({ labels: { snapshot: s.id, device: d.device }, value: d.copiedChunks });
  }
  fams.push(used, alloc, limit, state, copied);

  const done: Family = { name: 'blkfilter_backup_done_bytes', help: 'Bytes copied so far by a backup in progress.', type: 'gauge', values: [] };
  const total: Family = { name: 'blkfilter_backup_total_bytes', help: 'Bytes a backup in progress will copy.', type: 'gauge', values: [] };
  for (const b of status.backups ?? []) {
    const l = { id: String(b.id), dir: String(b.dir) };
    done.values.push({ labels: l, value: Number(b.bytesDone) || 0 });
    total.values.push({ labels: l, value: Number(b.bytesTotal) || 0 });
  }
  fams.push(done, total);
  return fams;
}

/**
 * The Prometheus text of the daemon's metrics (content type in `contentType`). prom-client
 * formats and escapes; the values are read from the counters at scrape time, so nothing on the
 * data path goes through prom-client.
 */
export async function renderMetrics(src: MetricsSource): Promise<{ text: string; contentType: string }> {
  const registry = new Registry();
  for (const fam of await collectFamilies(src)) {
    const m = { name: fam.name, help: fam.help, type: fam.type, get: () => ({ name: fam.name, help: fam.help, type: fam.type, values: fam.values, aggregator: 'sum' }) };
    registry.registerMetric(m as unknown as Metric);
  }
  return { text: await registry.metrics(), contentType: registry.contentType };
}
