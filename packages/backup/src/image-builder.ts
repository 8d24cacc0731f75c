import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import { openImageFile, readExtent } from './chain.js';
import { createExtentHasher, type ExtentAlgorithm, type ExtentHasher } from './digest.js';
import type { ExtentDigest, ImageEntry, Manifest, ZeroExtent } from './manifest.js';
import type { Qcow2Writer } from './writer.js';

/** Bytes of guest disk per extent digest window (and per restore step). */
export const DIGEST_SPAN = 4 << 20;

/** Called at each durable step of a backup or prune (crash tests kill the process here). */
export type StepHook = (step: string) => void;

/** Accumulates a new image: writes clusters and records data extents with digests and zero runs. */
export class ImageBuilder {
  readonly extents: ExtentDigest[] = [];
  readonly zeros: ZeroExtent[] = [];
  private runStart = 0;
  private runLen = 0;
  private runHash: ExtentHasher | null = null;

  constructor(
    readonly writer: Qcow2Writer,
    private readonly span: number,
    private readonly algorithm: ExtentAlgorithm,
  ) {}

  /** Guest cluster `index` holds `bytes` (the last cluster may be shorter). */
  async data(index: number, bytes: Buffer): Promise<void> {
    const g = index * this.writer.clusterSize;
    await this.writer.writeCluster(index, bytes);
    if (this.runHash !== null && this.runStart + this.runLen === g && Math.floor(this.runStart / this.span) === Math.floor(g / this.span)) {
      this.runHash.update(bytes);
      this.runLen += bytes.length;
      return;
    }
    this.endRun();
    this.runStart = g;
    this.runLen = bytes.length;
    this.runHash = createExtentHasher(this.algorithm);
    this.runHash.update(bytes);
  }

  /** Guest cluster `index` reads as zeros, hiding the backing file. */
  async zero(index: number): Promise<void> {
    await this.writer.zeroCluster(index);
    const cs = this.writer.clusterSize;
    const g = index * cs;
    const len = Math.min(cs, this.writer.virtualSize - g);
    const last = this.zeros.at(-1);
    if (last !== undefined && last[0] + last[1] === g) this.zeros[this.zeros.length - 1] = [last[0], last[1] + len];
    else this.zeros.push([g, len]);
  }

  private endRun(): void {
    if (this.runHash !== null && this.runLen > 0) this.extents.push([this.runStart, this.runLen, this.runHash.digest()]);
    this.runHash = null;
    this.runLen = 0;
  }

  async close(): Promise<void> {
    this.endRun();
    await this.writer.close();
  }
}

/** SHA-256 and size of a whole file. */
export async function fileDigest(file: string): Promise<{ size: number; sha256: string }> {
  const fh = await fs.open(file, 'r');
  try {
    const hash = createHash('sha256');
    const buf = Buffer.allocUnsafe(4 << 20);
    let size = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, size);
      if (bytesRead === 0) break;
      hash.update(buf.subarray(0, bytesRead));
      size += bytesRead;
    }
    return { size, sha256: hash.digest('hex') };
  } finally {
    await fh.close();
  }
}

/**
 * Re-reads a new image as restore will: structure, cluster map against the recorded extents,
 * every data extent against its digest. Returns the number of extents checked.
 */
export async function verifyNewImage(where: string, entry: ImageEntry, dev: Manifest['devices'][number], clusterSize: number, span: number, algorithm: ExtentAlgorithm): Promise<number> {
  const reader = await openImageFile(where, entry, dev, clusterSize);
  try {
    const scratch = Buffer.allocUnsafe(span);
    for (const [s, l, sha] of entry.extents) await readExtent(reader, s, l, sha, scratch, algorithm);
    return entry.extents.length;
  } finally {
    await reader.close();
  }
}
