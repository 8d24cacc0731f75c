import { list } from '@blkfilter/backup';
import { cbtInfo, cbtMap } from '@blkfilter/cbt';
import type { NbdServer } from '@blkfilter/nbd';
import { startHttpServer, type HttpSource, type StatusHttpServer } from './http.js';
import type { DaemonIoStats } from './io-stats.js';
import type { StatusModel } from './status-model.js';

/** What the daemon hands the status page. */
export interface StatusPageOptions {
  /** `--http`: `HOST:PORT` or `PORT`. */
  readonly listen: string;
  readonly io: DaemonIoStats;
  /** The daemon's `status` control method: the one source of the status model. */
  readonly status: () => Promise<unknown> | unknown;
  readonly nbd: () => NbdServer | null;
  /** Folders this daemon backed up to (absolute paths), for "last backups of each folder". */
  readonly backupDirs: ReadonlySet<string>;
  readonly log?: (line: string) => void;
}

/** How many points of each folder the page shows. */
const LAST_POINTS = 5;

/** Starts `serve --http`: the status page, its API and `/metrics`, reading the daemon. */
export async function startStatusPage(o: StatusPageOptions): Promise<StatusHttpServer> {
  const source: HttpSource = {
    io: o.io,
    status: async () => (await o.status()) as StatusModel,
    connections: () => o.nbd()?.connectionsByExport() ?? new Map(),
    cbt: async (device) => {
      const info = await cbtInfo(device);
      if (info.snapNumber === 0) return { changesNumber: info.changesNumber, snapNumber: 0, changedBytes: 0 };
      const map = await cbtMap(device, { offset: 0, length: info.blockCount });
      let blocks = 0;
      for (let i = 0; i < map.length; i++) if (map[i] === info.snapNumber) blocks++;
      return { changesNumber: info.changesNumber, snapNumber: info.snapNumber, changedBytes: blocks * info.blockSize };
    },
    cbtInfo: (device) => cbtInfo(device),
    cbtMap: (device, range) => cbtMap(device, range),
    backups: async () => {
      const out: unknown[] = [];
      for (const dir of o.backupDirs) {
        try {
          const { manifest } = await list(dir);
          const points = manifest.points.map((p, i) => ({ position: i + 1, createdAt: p.createdAt, images: p.images.map((im) => ({ device: im.device, kind: im.kind, file: im.file, size: im.size })) }));
          out.push({ dir, points: points.slice(-LAST_POINTS).reverse() });
        } catch (err) {
          out.push({ dir, error: err instanceof Error ? err.message : String(err), points: [] });
        }
      }
      return out;
    },
  };
  return startHttpServer({ listen: o.listen, source, ...(o.log !== undefined ? { log: o.log } : {}) });
}
