import { Bio, BioVec, BlkStatus, ReqFlag, ReqOp, SECTOR_SIZE, bioChain, blkStatusToErrno, submitBio, type BlockDev, type IoStats } from '@blkfilter/bio';
import { allocationExtents, depthExtents, dirtyBitmapExtents } from './block-status.js';
import { exportFlags, exportReadOnly, type ExportEntry, type MetaContext } from './exports.js';
import { NBD_MAX_EXTENTS, NBD_MAX_PAYLOAD, NbdCmd, NbdCmdFlag, NbdErrno, NbdTransmissionFlag, nbdCmdName } from './protocol.js';
import type { ReplyHost, ReplyWriter } from './reply.js';
import type { RequestCtx } from './request-ctx.js';
import { RmwOp } from './rmw.js';
import { ZERO_CHUNK, errnoForBio, submitSplit, zeros } from './submit.js';

/** Offsets at or above 2^53 are past any device; checking the high word avoids rounding. */
const OFFSET_HI_LIMIT = 0x200000;

/** The ReqOp number each NBD command is counted as in export stats (-1: not counted). */
const CMD_OP: readonly number[] = [ReqOp.READ, ReqOp.WRITE, -1, ReqOp.FLUSH, ReqOp.DISCARD, -1, ReqOp.WRITE_ZEROES, -1];

/** What running requests needs of the connection, beyond the reply writer's needs. */
export interface TransmissionHost extends ReplyHost {
  /** A pooled payload buffer of at least `size` bytes, attached to `ctx` and counted in flight. */
  attachBuffer(ctx: RequestCtx, size: number): Buffer;
  /** A bug: costs the connection, never the server. */
  internalError(err: unknown): void;
}

/**
 * The transmission phase of a connection on one export: checks each request against the export
 * and runs it as bios (`submitBio`, so every filter sees it), then hands the outcome to the
 * {@link ReplyWriter}.
 */
export class Transmission {
  readonly host: TransmissionHost;
  readonly writer: ReplyWriter;
  readonly exp: ExportEntry;
  readonly device: BlockDev;
  readonly exportSize: number;
  readonly lbs: number;
  readonly readOnly: boolean;
  readonly flags: number;
  readonly structured: boolean;
  readonly metaContexts: readonly MetaContext[];
  readonly metaIds: readonly number[];
  /** The export's request counters, or null. */
  readonly stats: IoStats | null;
  /** Why the last {@link Transmission.check} refused a request. */
  checkMessage = '';

  constructor(host: TransmissionHost, writer: ReplyWriter, exp: ExportEntry, structured: boolean, metaContexts: readonly MetaContext[]) {
    this.host = host;
    this.writer = writer;
    this.exp = exp;
    this.device = exp.device;
    this.exportSize = exp.device.sizeBytes;
    this.lbs = exp.device.disk.limits.logicalBlockSize;
    this.readOnly = exportReadOnly(exp);
    this.flags = exportFlags(exp, structured);
    this.structured = structured;
    this.metaContexts = metaContexts;
    this.metaIds = metaContexts.map((c) => c.id);
    this.stats = exp.stats;
    writer.structured = structured;
    writer.sparseReads = structured && exp.device.disk.backend.blockStatus !== undefined;
    writer.device = exp.device;
  }

  /** Validates a request against the export; returns 0 or the NBD errno (message in checkMessage). */
  check(ctx: RequestCtx): number {
    const type = ctx.type;
    const len = ctx.length;
    let valid: number = NbdCmdFlag.FUA;
    switch (type) {
      case NbdCmd.READ:
        if (this.structured) valid |= NbdCmdFlag.DF;
        break;
      case NbdCmd.WRITE:
      case NbdCmd.FLUSH:
      case NbdCmd.TRIM:
      case NbdCmd.CACHE:
        break;
      case NbdCmd.WRITE_ZEROES:
        valid |= NbdCmdFlag.NO_HOLE;
        if ((this.flags & NbdTransmissionFlag.SEND_FAST_ZERO) !== 0) valid |= NbdCmdFlag.FAST_ZERO;
        break;
      case NbdCmd.BLOCK_STATUS:
        valid |= NbdCmdFlag.REQ_ONE;
        break;
      default:
        this.checkMessage = `invalid request type ${type}`;
        return NbdErrno.EINVAL;
    }
    if ((ctx.cmdFlags & ~valid) !== 0) {
      this.checkMessage = `unsupported flags 0x${ctx.cmdFlags.toString(16)} for ${nbdCmdName(type)}`;
      return NbdErrno.EINVAL;
    }
    if (type === NbdCmd.FLUSH) return 0;
    if (this.readOnly && (type === NbdCmd.WRITE || type === NbdCmd.TRIM || type === NbdCmd.WRITE_ZEROES)) {
      this.checkMessage = `export ${JSON.stringify(this.exp.name)} is read-only`;
      return NbdErrno.EPERM;
    }
    if (ctx.offHi >= OFFSET_HI_LIMIT || ctx.offset + len > this.exportSize) {
      this.checkMessage = `${nbdCmdName(type)} at ${ctx.offset} + ${len} is past the end of the export (${this.exportSize} bytes)`;
      return type === NbdCmd.WRITE || type === NbdCmd.WRITE_ZEROES ? NbdErrno.ENOSPC : NbdErrno.EINVAL;
    }
    switch (type) {
      case NbdCmd.READ:
        if (len > NBD_MAX_PAYLOAD) {
          this.checkMessage = `READ of ${len} bytes is over the ${NBD_MAX_PAYLOAD}-byte maximum payload`;
          return this.structured ? NbdErrno.EOVERFLOW : NbdErrno.EINVAL;
        }
        break;
      case NbdCmd.CACHE:
        if (len > NBD_MAX_PAYLOAD) {
          this.checkMessage = `CACHE of ${len} bytes is over the ${NBD_MAX_PAYLOAD}-byte maximum payload`;
          return NbdErrno.EOVERFLOW;
        }
        return 0;
      case NbdCmd.BLOCK_STATUS:
        if (len === 0) {
          this.checkMessage = 'BLOCK_STATUS needs a non-zero length';
          return NbdErrno.EINVAL;
        }
        if (this.metaContexts.length === 0) {
          this.checkMessage = 'BLOCK_STATUS without a metadata context negotiated (NBD_OPT_SET_META_CONTEXT)';
          return NbdErrno.EINVAL;
        }
        return 0;
      case NbdCmd.TRIM:
        return 0;
      default:
        break;
    }
    const lbs = this.lbs;
    if (ctx.offset % lbs !== 0 || len % lbs !== 0) {
      // The minimum block size is a hint to clients; like qemu-nbd, serve the others by
      // bouncing through the covering blocks (READ) or read-modify-write (WRITE, WRITE_ZEROES).
      if (Math.ceil((ctx.offset + len) / lbs) * lbs > this.exportSize) {
        this.checkMessage = `${nbdCmdName(type)} at ${ctx.offset} + ${len} ends in a partial block past the end of the export (${this.exportSize} bytes)`;
        return NbdErrno.EINVAL;
      }
      ctx.unaligned = true;
    }
    return 0;
  }

  /** Runs a checked request other than WRITE. */
  execute(ctx: RequestCtx): void {
    const dev = this.device;
    const fua = (ctx.cmdFlags & NbdCmdFlag.FUA) !== 0 ? ReqFlag.FUA : 0;
    const len = ctx.length;
    switch (ctx.type) {
      case NbdCmd.READ: {
        if (len === 0) {
          if (this.structured) this.writer.none(ctx);
          else this.writer.simple(ctx, 0);
          return;
        }
        if (ctx.unaligned) {
          const lbs = this.lbs;
          const start = Math.floor(ctx.offset / lbs) * lbs;
          const size = Math.ceil((ctx.offset + len) / lbs) * lbs - start;
          ctx.dataOff = ctx.offset - start;
          const buf = this.host.attachBuffer(ctx, size);
          submitSplit(ctx.prepareBio(ReqOp.READ, dev, start / SECTOR_SIZE, size, buf, 0));
          return;
        }
        const buf = this.host.attachBuffer(ctx, len);
        submitSplit(ctx.prepareBio(ReqOp.READ, dev, ctx.offset / SECTOR_SIZE, len, buf, 0));
        return;
      }
      case NbdCmd.FLUSH:
        submitBio(ctx.prepareBio(ReqOp.FLUSH, dev, 0, 0, null, 0));
        return;
      case NbdCmd.TRIM: {
        // Advisory: round inward to whole blocks; a device without discard ignores it.
        const lbs = this.lbs;
        const start = Math.ceil(ctx.offset / lbs) * lbs;
        const end = Math.floor((ctx.offset + len) / lbs) * lbs;
        if (end <= start || dev.disk.limits.maxDiscardSectors === 0) {
          this.writer.simple(ctx, 0);
          return;
        }
        submitSplit(ctx.prepareBio(ReqOp.DISCARD, dev, start / SECTOR_SIZE, end - start, null, fua));
        return;
      }
      case NbdCmd.WRITE_ZEROES:
        this.writeZeroes(ctx, dev, fua);
        return;
      case NbdCmd.CACHE: {
        const lbs = this.lbs;
        const start = Math.floor(ctx.offset / lbs) * lbs;
        const end = Math.min(this.exportSize, Math.ceil((ctx.offset + len) / lbs) * lbs);
        if (end <= start) {
          this.writer.simple(ctx, 0);
          return;
        }
        // The actions of a READ, replying with just a status: the data lands in any cache
        // below (page cache, a CoW filter) and every filter sees the access.
        const buf = this.host.attachBuffer(ctx, end - start);
        submitSplit(ctx.prepareBio(ReqOp.READ, dev, start / SECTOR_SIZE, end - start, buf, 0));
        return;
      }
      case NbdCmd.BLOCK_STATUS:
        this.blockStatus(ctx);
        return;
      default:
        this.writer.error(ctx, NbdErrno.EINVAL, `invalid request type ${ctx.type}`);
    }
  }

  /** Runs a WRITE whose payload is all in `ctx.buf`. */
  write(ctx: RequestCtx): void {
    const fua = (ctx.cmdFlags & NbdCmdFlag.FUA) !== 0 ? ReqFlag.FUA : 0;
    if (ctx.unaligned) {
      const op = new RmwOp(ctx, this.device, this.lbs, fua, 0);
      op.locks.acquire(op);
      return;
    }
    submitSplit(ctx.prepareBio(ReqOp.WRITE, this.device, ctx.offset / SECTOR_SIZE, ctx.length, ctx.buf, fua));
  }

  private writeZeroes(ctx: RequestCtx, dev: BlockDev, fua: number): void {
    const len = ctx.length;
    if (len === 0) {
      this.writer.simple(ctx, 0);
      return;
    }
    const canZero = dev.disk.limits.maxWriteZeroesSectors > 0;
    if (!canZero && (ctx.cmdFlags & NbdCmdFlag.FAST_ZERO) !== 0) {
      this.writer.error(ctx, NbdErrno.ENOTSUP, `"${dev.name}" has no WRITE_ZEROES: zeroing would be as slow as writing`);
      return;
    }
    if (ctx.unaligned) {
      // The partial blocks are written as data: FAST_ZERO still holds, it is two blocks at most.
      const nounmap = (ctx.cmdFlags & NbdCmdFlag.NO_HOLE) !== 0 ? ReqFlag.NOUNMAP : 0;
      const op = new RmwOp(ctx, dev, this.lbs, fua, nounmap);
      op.locks.acquire(op);
      return;
    }
    const sector = ctx.offset / SECTOR_SIZE;
    if (canZero) {
      const flags = fua | ((ctx.cmdFlags & NbdCmdFlag.NO_HOLE) !== 0 ? ReqFlag.NOUNMAP : 0);
      submitSplit(ctx.prepareBio(ReqOp.WRITE_ZEROES, dev, sector, len, null, flags));
      return;
    }
    // No WRITE_ZEROES below: write zeros from one shared buffer, every piece chained to the
    // last, which completes the request.
    const z = zeros();
    const last = Math.min(len, ZERO_CHUNK);
    const lastOffset = len - last;
    const parent = ctx.prepareBio(ReqOp.WRITE, dev, sector + lastOffset / SECTOR_SIZE, last, z, fua);
    for (let done = 0; done < lastOffset; done += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, lastOffset - done);
      const piece = new Bio(ReqOp.WRITE, dev, sector + done / SECTOR_SIZE, n, [new BioVec(z, 0, n)]);
      piece.flags = fua;
      bioChain(piece, parent);
      submitSplit(piece);
    }
    submitSplit(parent);
  }

  private blockStatus(ctx: RequestCtx): void {
    const contexts = this.metaContexts;
    const maxExtents = (ctx.cmdFlags & NbdCmdFlag.REQ_ONE) !== 0 ? 1 : NBD_MAX_EXTENTS;
    const offset = ctx.offset;
    const len = ctx.length;
    let async = false;
    let results: Array<number[] | Promise<number[]>>;
    try {
      results = contexts.map((c) => {
        if (c.depth !== null) return depthExtents(c.depth, offset, len, maxExtents);
        if (c.bitmap === null) return allocationExtents(this.device, offset, len, maxExtents);
        async = true;
        return dirtyBitmapExtents(c.bitmap, offset, len, maxExtents);
      });
    } catch (err) {
      // The range was checked against the export's size at connect; the device may have shrunk.
      this.writer.error(ctx, NbdErrno.EINVAL, `block status failed: ${err instanceof Error ? err.message : String(err)}`);
      return;
    }
    if (!async) {
      this.writer.blockStatus(ctx, this.metaIds, results as number[][]);
      return;
    }
    Promise.all(results)
      .then(
        (extents) => this.writer.blockStatus(ctx, this.metaIds, extents),
        (err: unknown) => this.writer.error(ctx, NbdErrno.EIO, `block status failed: ${err instanceof Error ? err.message : String(err)}`),
      )
      .catch((err: unknown) => this.host.internalError(err));
  }

  /** A request's bio completed: reply with its outcome. */
  complete(ctx: RequestCtx, bio: Bio): void {
    const stats = this.stats;
    if (stats !== null && ctx.startTime >= 0) {
      const op = CMD_OP[ctx.type] ?? -1;
      if (op >= 0) stats.account(op, op === ReqOp.FLUSH ? 0 : ctx.length, bio.status, performance.now() - ctx.startTime);
    }
    const writer = this.writer;
    if (writer.closed) {
      this.host.release(ctx);
      return;
    }
    if (bio.status !== BlkStatus.OK) {
      const err = bio.error;
      const message = err !== null ? err.message : `${nbdCmdName(ctx.type)} failed: ${blkStatusToErrno(bio.status)}`;
      writer.error(ctx, errnoForBio(bio), message);
      return;
    }
    if (ctx.type === NbdCmd.READ) writer.read(ctx);
    else writer.simple(ctx, 0);
  }
}
