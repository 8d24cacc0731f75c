import fs from 'node:fs';
import path from 'node:path';
import { BlkError, blkdevRead, SECTOR_SIZE, type BlockDev } from '@blkfilter/bio';
import { ChainBackend } from './chain-backend.js';
import { OverlayBackend } from './overlay.js';

/** Suffix of the map a live restore keeps next to its image until it ends. */
export const LIVE_MAP_SUFFIX = '.live-restore';

/** Options of {@link startLiveRestore}. */
export interface LiveRestoreOptions {
  /** 1-based point (default: the newest). */
  readonly at?: number;
  readonly device?: string;
  /** The raw image to restore into (created; or resumed when its map is next to it). */
  readonly to: string;
  /** Named in the folder's lock note while the restore runs. */
  readonly holder?: string;
  /** Bytes copied per background step (default 1 MiB). */
  readonly step?: number;
}

/** A live restore in progress: its backend serves the device at once. */
export interface LiveRestore {
  readonly backend: OverlayBackend;
  readonly image: string;
  /** True when it resumed an interrupted live restore of the same point into the same image. */
  readonly resumed: boolean;
  /** Bytes of the device already in the image, and the device's size. */
  progress(): { done: number; total: number };
  /**
   * Copies the rest in the background, reading through `dev` (the device over
   * {@link backend}, so the copy goes through the same map as the guest's reads); resolves when
   * the image holds everything and is durable, and its map is removed.
   */
  run(dev: BlockDev, onProgress?: (done: number, total: number) => void): Promise<void>;
  /** Stops the background copy (the map stays: the next start resumes). */
  stop(): void;
}

interface MapHeader {
  readonly dir: string;
  readonly position: number;
  readonly sizeBytes: number;
  readonly seq: number;
}

/**
 * Starts restoring a point into a raw image while serving it: reads of data not yet restored
 * come from the backup (and are written into the image on the way), writes go to the image and
 * are never overwritten by the background copy. The map of what the image holds is saved next
 * to it (`IMAGE.live-restore`) at every FLUSH and every 64 MiB of background copy, after an
 * fdatasync of the image; after a crash the same call resumes (a write the guest had not
 * flushed may be lost, as on any disk). When it ends the map is removed and the image is a
 * plain raw image of the point plus the writes made meanwhile.
 */
export async function startLiveRestore(dir: string, options: LiveRestoreOptions): Promise<LiveRestore> {
  const image = path.resolve(options.to);
  const mapFile = image + LIVE_MAP_SUFFIX;
  const base = await ChainBackend.open(dir, {
    ...(options.at !== undefined ? { at: options.at } : {}),
    ...(options.device !== undefined ? { device: options.device } : {}),
    holder: options.holder ?? `live restore into ${image} (pid ${process.pid})`,
  });
  try {
    const header: MapHeader = { dir: path.resolve(dir), position: base.position, sizeBytes: base.sizeBytes, seq: base.point.seq };
    let present: Uint8Array | undefined;
    const imageExists = fs.existsSync(image);
    if (fs.existsSync(mapFile)) {
      const raw = fs.readFileSync(mapFile);
      const nl = raw.indexOf(10);
      const h = JSON.parse(raw.subarray(0, nl).toString('utf8')) as MapHeader;
      if (h.dir !== header.dir || h.position !== header.position || h.sizeBytes !== header.sizeBytes || h.seq !== header.seq) {
        throw new BlkError('EEXIST', `${mapFile} belongs to a live restore of point ${h.position} of ${h.dir}, not of point ${header.position} of ${header.dir}: finish that one, or remove ${image} and its map`);
      }
      present = new Uint8Array(raw.subarray(nl + 1));
    } else if (imageExists) {
      throw new BlkError('EEXIST', `${image} exists (EEXIST) and is not an interrupted live restore (no ${path.basename(mapFile)}): choose another name`);
    }
    let finished = false;
    const save = (p: Uint8Array): void => {
      if (finished) return; // a plain image now: no map
      // Synchronous, after the image's fdatasync: the map never claims data the image may lose.
      const tmp = `${mapFile}.tmp`;
      const fd = fs.openSync(tmp, 'w');
      try {
        fs.writeSync(fd, `${JSON.stringify(header)}\n`);
        fs.writeSync(fd, p);
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      fs.renameSync(tmp, mapFile);
    };
    const backend = new OverlayBackend({ base, file: image, copyOnRead: true, freshSparse: true, onDurable: save, ...(present !== undefined ? { present } : {}) });
    if (present === undefined) backend.syncNow(); // the map exists from the start: a crash now resumes
    const sectors = Math.floor(base.sizeBytes / SECTOR_SIZE);
    let stopped = false;
    const step = options.step ?? 1 << 20;
    return {
      backend,
      image,
      resumed: present !== undefined,
      progress: () => ({ done: backend.presentSectors * SECTOR_SIZE, total: sectors * SECTOR_SIZE }),
      stop: () => {
        stopped = true;
      },
      run: async (dev, onProgress) => {
        let since = 0;
        for (let s = backend.nextAbsent(0); s >= 0 && !stopped; s = backend.nextAbsent(s)) {
          const len = Math.min(step, (sectors - s) * SECTOR_SIZE);
          await blkdevRead(dev, s * SECTOR_SIZE, len); // copy-on-read fills the image
          since += len;
          if (since >= 64 << 20) {
            since = 0;
            backend.syncNow();
          }
          onProgress?.(backend.presentSectors * SECTOR_SIZE, sectors * SECTOR_SIZE);
        }
        if (stopped) return;
        backend.syncNow();
        finished = true;
        fs.rmSync(mapFile, { force: true });
        await fsyncParent(image);
      },
    };
  } catch (err) {
    await base.close();
    throw err;
  }
}

async function fsyncParent(image: string): Promise<void> {
  // The map's removal is durable: a crash after this does not resume a finished restore.
  const fd = fs.openSync(path.dirname(image), 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}
