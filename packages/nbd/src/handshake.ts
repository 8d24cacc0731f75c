import type net from 'node:net';
import tls from 'node:tls';
import type { ExportEntry, MetaContext } from './exports.js';
import { exportFlags } from './exports.js';
import {
  BASE_ALLOCATION,
  NBD_INIT_MAGIC_HI,
  NBD_INIT_MAGIC_LO,
  NBD_MAX_PAYLOAD,
  NBD_MAX_STRING,
  NBD_OPTS_MAGIC_HI,
  NBD_OPTS_MAGIC_LO,
  NbdClientFlag,
  NbdHandshakeFlag,
  NbdInfo,
  NbdOpt,
  NbdRep,
  QEMU_ALLOCATION_DEPTH,
  QEMU_DIRTY_BITMAP_PREFIX,
  nbdOptName,
} from './protocol.js';
import { writeU64 } from './reader.js';
import type { ServerCore } from './server-options.js';
import { NBD_OPTION_HEADER_SIZE, encodeOptionReply, isOptionMagic } from './wire.js';

/** Option payloads up to this size are parsed; larger ones are skipped and refused with ERR_TOO_BIG. */
const MAX_OPTION_BUFFERED = 64 * 1024;
const NO_ZEROES_PAD = Buffer.alloc(124);
const META_ID_BASE_ALLOCATION = 0;
const META_ID_ALLOCATION_DEPTH = 1;
const META_ID_DIRTY_BITMAP = 2;

const ST_FLAGS = 0;
const ST_OPTIONS = 1;
const ST_DONE = 2;

/** What the handshake needs of its connection. */
export interface HandshakeHost {
  /** The connection's socket (a TLS socket after STARTTLS). */
  readonly socket: net.Socket;
  /** True once the connection is closing: stop parsing. */
  readonly stopped: boolean;
  /** Moves the connection's listeners to `secure`, which wraps its socket, and drops buffered input. */
  swapSocket(secure: tls.TLSSocket): void;
  /** The export is chosen: transmission starts with the negotiated replies and contexts. */
  enterTransmission(exp: ExportEntry, structured: boolean, metaContexts: readonly MetaContext[]): void;
  /** A protocol violation: hang up once what is in flight is done. */
  fail(reason: string): void;
  /** The client asked to leave. */
  beginClose(reason: string): void;
  debug(message: string): void;
  warn(message: string): void;
}

/**
 * The fixed newstyle handshake of one connection (nbdkit's protocol-handshake-newstyle.c): the
 * greeting, client flags, options (LIST, INFO/GO, STRUCTURED_REPLY, meta contexts, STARTTLS)
 * until the client picks an export.
 */
export class Handshake {
  private readonly host: HandshakeHost;
  private readonly core: ServerCore;
  private stage = ST_FLAGS;
  private fixedNewstyle = false;
  private noZeroes = false;
  private structured = false;
  /** TLS is up (after STARTTLS). */
  tlsActive = false;
  private metaExport: ExportEntry | null = null;
  private metaContexts: MetaContext[] = [];
  private skipLeft = 0;
  private skipOption = 0;
  private skipReply = 0;
  private skipMessage = '';

  constructor(host: HandshakeHost, core: ServerCore) {
    this.host = host;
    this.core = core;
  }

  /** Sends the newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags. */
  greet(): void {
    const hello = Buffer.allocUnsafe(18);
    hello.writeUInt32BE(NBD_INIT_MAGIC_HI, 0);
    hello.writeUInt32BE(NBD_INIT_MAGIC_LO, 4);
    hello.writeUInt32BE(NBD_OPTS_MAGIC_HI, 8);
    hello.writeUInt32BE(NBD_OPTS_MAGIC_LO, 12);
    hello.writeUInt16BE(NbdHandshakeFlag.FIXED_NEWSTYLE | NbdHandshakeFlag.NO_ZEROES, 16);
    this.host.socket.write(hello);
  }

  /**
   * Parses handshake messages in `src[pos, end)` until the handshake is over, the connection
   * stops, or more bytes are needed; returns the position of the first byte not used (`end`
   * after STARTTLS: the rest of the plain-text stream is not ours to read).
   */
  consume(src: Buffer, pos: number, end: number): number {
    const host = this.host;
    while (pos < end && this.stage !== ST_DONE && !host.stopped) {
      if (this.stage === ST_FLAGS) {
        if (end - pos < 4) break;
        const flags = src.readUInt32BE(pos);
        pos += 4;
        this.handleClientFlags(flags);
        continue;
      }
      if (this.skipLeft > 0) {
        const n = Math.min(this.skipLeft, end - pos);
        pos += n;
        this.skipLeft -= n;
        if (this.skipLeft === 0) this.sendOptReply(this.skipOption, this.skipReply, this.skipMessage);
        continue;
      }
      if (end - pos < NBD_OPTION_HEADER_SIZE) break;
      if (!isOptionMagic(src, pos)) {
        host.fail(`bad option magic 0x${src.toString('hex', pos, pos + 8)}: expected IHAVEOPT`);
        break;
      }
      const opt = src.readUInt32BE(pos + 8);
      const len = src.readUInt32BE(pos + 12);
      if (len > MAX_OPTION_BUFFERED) {
        if (len > NBD_MAX_PAYLOAD) {
          host.fail(`option ${nbdOptName(opt)} carries ${len} bytes, over the ${NBD_MAX_PAYLOAD}-byte limit`);
          break;
        }
        pos += NBD_OPTION_HEADER_SIZE;
        this.startSkip(opt, len);
        continue;
      }
      if (end - pos < NBD_OPTION_HEADER_SIZE + len) break;
      const data = src.subarray(pos + NBD_OPTION_HEADER_SIZE, pos + NBD_OPTION_HEADER_SIZE + len);
      pos += NBD_OPTION_HEADER_SIZE + len;
      this.handleOption(opt, data);
      if (host.socket instanceof tls.TLSSocket && !this.tlsActive) return end;
    }
    return pos;
  }

  private handleClientFlags(flags: number): void {
    const known = NbdClientFlag.FIXED_NEWSTYLE | NbdClientFlag.NO_ZEROES;
    if ((flags & ~known) !== 0) {
      this.host.fail(`unknown client flags 0x${flags.toString(16)}`);
      return;
    }
    this.fixedNewstyle = (flags & NbdClientFlag.FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & NbdClientFlag.NO_ZEROES) !== 0;
    this.stage = ST_OPTIONS;
  }

  private done(exp: ExportEntry): void {
    this.stage = ST_DONE;
    this.host.enterTransmission(exp, this.structured, this.metaExport === exp ? this.metaContexts : []);
  }

  private startSkip(opt: number, len: number): void {
    this.skipLeft = len;
    this.skipOption = opt;
    const known = opt >= NbdOpt.EXPORT_NAME && opt <= NbdOpt.SET_META_CONTEXT && opt !== NbdOpt.PEEK_EXPORT;
    this.skipReply = known ? NbdRep.ERR_TOO_BIG : NbdRep.ERR_UNSUP;
    this.skipMessage = known ? `option ${nbdOptName(opt)} of ${len} bytes is too large` : `unsupported option ${opt}`;
    if (!this.fixedNewstyle || opt === NbdOpt.EXPORT_NAME) this.host.fail(`option ${nbdOptName(opt)} of ${len} bytes is too large`);
  }

  private sendOptReply(opt: number, type: number, payload?: Buffer | string): void {
    const data = typeof payload === 'string' ? Buffer.from(payload.slice(0, NBD_MAX_STRING), 'utf8') : (payload ?? null);
    this.host.socket.write(encodeOptionReply(opt, type, data));
  }

  private lookupExport(name: string): ExportEntry | undefined {
    const exp = this.core.exports.get(name);
    if (exp !== undefined || name !== '' || this.core.defaultExport === null) return exp;
    return this.core.exports.get(this.core.defaultExport);
  }

  private handleOption(opt: number, data: Buffer): void {
    const core = this.core;
    if (!this.fixedNewstyle && opt !== NbdOpt.EXPORT_NAME) {
      this.host.fail(`option ${nbdOptName(opt)} sent without fixed newstyle`);
      return;
    }
    if (core.tlsOptions !== null && core.tlsOptions.required !== false && !this.tlsActive) {
      // FORCEDTLS: only STARTTLS and ABORT before TLS.
      if (opt === NbdOpt.EXPORT_NAME) {
        this.host.fail('NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS');
        return;
      }
      if (opt !== NbdOpt.STARTTLS && opt !== NbdOpt.ABORT) {
        this.sendOptReply(opt, NbdRep.ERR_TLS_REQD, `option ${nbdOptName(opt)} not permitted before TLS: send NBD_OPT_STARTTLS first`);
        return;
      }
    }
    if (core.closing && opt !== NbdOpt.ABORT) {
      this.sendOptReply(opt, NbdRep.ERR_SHUTDOWN, 'server is shutting down');
      return;
    }
    switch (opt) {
      case NbdOpt.EXPORT_NAME:
        this.handleExportName(data);
        return;
      case NbdOpt.ABORT:
        this.sendOptReply(opt, NbdRep.ACK);
        this.host.beginClose('client sent NBD_OPT_ABORT');
        return;
      case NbdOpt.LIST:
        if (data.length !== 0) this.sendOptReply(opt, NbdRep.ERR_INVALID, 'NBD_OPT_LIST carries no data');
        else this.handleList();
        return;
      case NbdOpt.STARTTLS:
        this.handleStartTls(data);
        return;
      case NbdOpt.INFO:
      case NbdOpt.GO:
        this.handleInfo(opt, data);
        return;
      case NbdOpt.STRUCTURED_REPLY:
        if (data.length !== 0) this.sendOptReply(opt, NbdRep.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY carries no data');
        else if (this.structured) this.sendOptReply(opt, NbdRep.ERR_INVALID, 'structured replies already negotiated');
        else {
          this.structured = true;
          this.sendOptReply(opt, NbdRep.ACK);
        }
        return;
      case NbdOpt.LIST_META_CONTEXT:
      case NbdOpt.SET_META_CONTEXT:
        this.handleMetaContext(opt, data);
        return;
      default:
        this.sendOptReply(opt, NbdRep.ERR_UNSUP, `unsupported option ${nbdOptName(opt)}`);
    }
  }

  private handleExportName(data: Buffer): void {
    if (data.length > NBD_MAX_STRING) {
      this.host.fail(`NBD_OPT_EXPORT_NAME with a ${data.length}-byte name`);
      return;
    }
    const name = data.toString('utf8');
    const exp = this.lookupExport(name);
    if (exp === undefined || exp.device.disk.removed) {
      this.host.fail(`NBD_OPT_EXPORT_NAME for unknown export ${JSON.stringify(name)}`);
      return;
    }
    const reply = Buffer.alloc(10);
    writeU64(reply, exp.device.sizeBytes, 0);
    reply.writeUInt16BE(exportFlags(exp, this.structured), 8);
    this.host.socket.write(reply);
    if (!this.noZeroes) this.host.socket.write(NO_ZEROES_PAD);
    this.done(exp);
  }

  private handleList(): void {
    for (const exp of this.core.exports.values()) {
      const name = Buffer.from(exp.name, 'utf8');
      const desc = Buffer.from(exp.description ?? '', 'utf8');
      const payload = Buffer.allocUnsafe(4 + name.length + desc.length);
      payload.writeUInt32BE(name.length, 0);
      name.copy(payload, 4);
      desc.copy(payload, 4 + name.length);
      this.sendOptReply(NbdOpt.LIST, NbdRep.SERVER, payload);
    }
    this.sendOptReply(NbdOpt.LIST, NbdRep.ACK);
  }

  private handleInfo(opt: number, data: Buffer): void {
    if (data.length < 6) {
      this.sendOptReply(opt, NbdRep.ERR_INVALID, `${nbdOptName(opt)} needs at least 6 bytes, got ${data.length}`);
      return;
    }
    const nameLen = data.readUInt32BE(0);
    if (nameLen > data.length - 6 || nameLen > NBD_MAX_STRING) {
      this.sendOptReply(opt, NbdRep.ERR_INVALID, `${nbdOptName(opt)}: name length ${nameLen} does not fit the option`);
      return;
    }
    const nreq = data.readUInt16BE(4 + nameLen);
    if (4 + nameLen + 2 + 2 * nreq !== data.length) {
      this.sendOptReply(opt, NbdRep.ERR_INVALID, `${nbdOptName(opt)}: ${nreq} information requests do not match the option length`);
      return;
    }
    let wantName = false;
    for (let i = 0; i < nreq; i++) {
      const req = data.readUInt16BE(4 + nameLen + 2 + 2 * i);
      if (req === NbdInfo.NAME) wantName = true;
    }
    const name = data.toString('utf8', 4, 4 + nameLen);
    const exp = this.lookupExport(name);
    if (exp === undefined || exp.device.disk.removed) {
      this.sendOptReply(opt, NbdRep.ERR_UNKNOWN, `export ${JSON.stringify(name.slice(0, 80))} not present`);
      return;
    }
    if (wantName) this.sendInfo(opt, NbdInfo.NAME, Buffer.from(exp.name, 'utf8'));
    if (exp.description !== null) this.sendInfo(opt, NbdInfo.DESCRIPTION, Buffer.from(exp.description, 'utf8'));
    const lbs = exp.device.disk.limits.logicalBlockSize;
    const sizes = Buffer.allocUnsafe(12);
    sizes.writeUInt32BE(lbs, 0);
    sizes.writeUInt32BE(Math.max(4096, lbs), 4);
    sizes.writeUInt32BE(NBD_MAX_PAYLOAD, 8);
    this.sendInfo(opt, NbdInfo.BLOCK_SIZE, sizes);
    const info = Buffer.allocUnsafe(10);
    writeU64(info, exp.device.sizeBytes, 0);
    info.writeUInt16BE(exportFlags(exp, this.structured), 8);
    this.sendInfo(opt, NbdInfo.EXPORT, info);
    this.sendOptReply(opt, NbdRep.ACK);
    if (opt === NbdOpt.GO) this.done(exp);
  }

  private sendInfo(opt: number, type: number, payload: Buffer): void {
    const buf = Buffer.allocUnsafe(2 + payload.length);
    buf.writeUInt16BE(type, 0);
    payload.copy(buf, 2);
    this.sendOptReply(opt, NbdRep.INFO, buf);
  }

  private handleMetaContext(opt: number, data: Buffer): void {
    const isSet = opt === NbdOpt.SET_META_CONTEXT;
    if (isSet) {
      // SET replaces the previous selection even when it fails.
      this.metaExport = null;
      this.metaContexts = [];
      if (!this.structured) {
        this.sendOptReply(opt, NbdRep.ERR_INVALID, 'NBD_OPT_SET_META_CONTEXT needs structured replies negotiated first');
        return;
      }
    }
    const invalid = (why: string): void => this.sendOptReply(opt, NbdRep.ERR_INVALID, `${nbdOptName(opt)}: ${why}`);
    if (data.length < 8) return invalid('option too short');
    const nameLen = data.readUInt32BE(0);
    if (nameLen > NBD_MAX_STRING || 4 + nameLen + 4 > data.length) return invalid('inconsistent export name length');
    const name = data.toString('utf8', 4, 4 + nameLen);
    let pos = 4 + nameLen;
    const nq = data.readUInt32BE(pos);
    pos += 4;
    const queries: string[] = [];
    for (let i = 0; i < nq; i++) {
      if (pos + 4 > data.length) return invalid('inconsistent query count');
      const qlen = data.readUInt32BE(pos);
      pos += 4;
      if (pos + qlen > data.length) return invalid('inconsistent query length');
      // qemu skips over-long queries rather than failing the option.
      if (qlen <= NBD_MAX_STRING) queries.push(data.toString('utf8', pos, pos + qlen));
      pos += qlen;
    }
    if (pos !== data.length) return invalid('trailing bytes after the queries');
    const exp = this.lookupExport(name);
    if (exp === undefined) {
      this.sendOptReply(opt, NbdRep.ERR_UNKNOWN, `export ${JSON.stringify(name.slice(0, 80))} not present`);
      return;
    }
    const list = !isSet;
    let allocation = false;
    let depth = false;
    const hasDepth = exp.allocationDepth !== null;
    const bitmaps = exp.bitmaps.map(() => false);
    if (list && nq === 0) {
      allocation = true;
      depth = hasDepth;
      bitmaps.fill(true);
    } else {
      for (const q of queries) {
        if (q.startsWith('base:')) {
          const leaf = q.slice(5);
          if ((leaf === '' && list) || leaf === 'allocation') allocation = true;
        } else if (q.startsWith('qemu:')) {
          const rest = q.slice(5);
          if (rest === '') {
            if (list) {
              bitmaps.fill(true);
              depth = hasDepth;
            }
          } else if (rest === 'allocation-depth') {
            depth = hasDepth;
          } else if (rest.startsWith('dirty-bitmap:')) {
            const leaf = rest.slice('dirty-bitmap:'.length);
            if (leaf === '') {
              if (list) bitmaps.fill(true);
            } else {
              const i = exp.bitmaps.findIndex((b) => b.name === leaf);
              if (i >= 0) bitmaps[i] = true;
            }
          }
        }
        // Unknown namespaces are ignored, as the spec requires.
      }
    }
    const selected: MetaContext[] = [];
    if (allocation) selected.push({ id: META_ID_BASE_ALLOCATION, name: BASE_ALLOCATION, bitmap: null, depth: null });
    if (depth) selected.push({ id: META_ID_ALLOCATION_DEPTH, name: QEMU_ALLOCATION_DEPTH, bitmap: null, depth: exp.allocationDepth });
    exp.bitmaps.forEach((b, i) => {
      if (bitmaps[i] === true) selected.push({ id: META_ID_DIRTY_BITMAP + i, name: QEMU_DIRTY_BITMAP_PREFIX + b.name, bitmap: b, depth: null });
    });
    for (const c of selected) {
      const nameBuf = Buffer.from(c.name, 'utf8');
      const payload = Buffer.allocUnsafe(4 + nameBuf.length);
      payload.writeUInt32BE(list ? 0 : c.id, 0);
      nameBuf.copy(payload, 4);
      this.sendOptReply(opt, NbdRep.META_CONTEXT, payload);
    }
    this.sendOptReply(opt, NbdRep.ACK);
    if (isSet) {
      this.metaExport = exp;
      this.metaContexts = selected;
    }
  }

  private handleStartTls(data: Buffer): void {
    const core = this.core;
    if (data.length !== 0) {
      this.sendOptReply(NbdOpt.STARTTLS, NbdRep.ERR_INVALID, 'NBD_OPT_STARTTLS carries no data');
      return;
    }
    if (core.tlsContext === null || core.tlsOptions === null) {
      this.sendOptReply(NbdOpt.STARTTLS, NbdRep.ERR_POLICY, 'TLS not configured on this server');
      return;
    }
    if (this.tlsActive) {
      this.sendOptReply(NbdOpt.STARTTLS, NbdRep.ERR_INVALID, 'TLS already negotiated');
      return;
    }
    this.sendOptReply(NbdOpt.STARTTLS, NbdRep.ACK);
    // The client sends nothing until it has our ACK, so no byte of its TLS handshake can have
    // been read yet: wrap the socket now, in this same tick.
    const secure = new tls.TLSSocket(this.host.socket, {
      isServer: true,
      secureContext: core.tlsContext,
      requestCert: core.tlsOptions.requestCert === true,
      rejectUnauthorized: core.tlsOptions.requestCert === true,
    });
    this.host.swapSocket(secure);
    secure.on('secure', () => {
      this.tlsActive = true;
      // Negotiation state before STARTTLS does not survive it.
      this.structured = false;
      this.metaExport = null;
      this.metaContexts = [];
      this.host.debug('TLS established');
    });
    secure.on('error', (err: Error) => {
      this.host.warn(`TLS failed: ${err.message}`);
      secure.destroy();
    });
  }
}
