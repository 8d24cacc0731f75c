import zlib from 'node:zlib';
import type { CbtStateIo } from './state-io.js';

// State file layout, little-endian. The CRC covers the header (CRC field zeroed) and the maps,
// so a torn or partial write never passes for a valid state.
//   0  magic 'BFCBTMAP'      8
//   8  version u32           12  header size u32
//  16  block size u32        20  flags u32 (bit 0 clean, bit 1 read map follows)
//  24  block count u64       32  capacity (sectors) u64     40  start sector u64
//  48  generation id (16)    64  read map generation id (16)
//  80  changes number u8     81  snap number u8              84  CRC32 u32
//  88  epoch u32 (version 2: the checkpoint's number; its journal carries the same)
// 128  map (block count bytes), then the read map when flag bit 1 is set.
// Version 1 files (wave 1: no journal) are read; a dirty one means an unclean shutdown.
const MAGIC = Buffer.from('BFCBTMAP', 'latin1');
const VERSION = 2;
/** Bytes before the map. */
export const STATE_HEADER_SIZE = 128;
const FLAG_CLEAN = 1;
const FLAG_READ_MAP = 2;
const CRC_OFFSET = 84;

/** Everything the state file holds. */
export interface CbtState {
  readonly blockSize: number;
  readonly blockCount: number;
  readonly capacity: number;
  readonly startSect: number;
  readonly generationId: string;
  readonly changesNumber: number;
  readonly snapNumber: number;
  readonly snapGenerationId: string | null;
  readonly clean: boolean;
  /** Checkpoint number; the journal of the same epoch holds the marks made since. */
  readonly epoch: number;
  /** 1 for a wave-1 file without a journal, 2 otherwise. */
  readonly version: number;
  readonly map: Uint8Array;
  /** The frozen copy; null when no take happened in this generation. */
  readonly readMap: Uint8Array | null;
}

/** A state file that could not be used, and why (for the generation reason and messages). */
export interface StateProblem {
  readonly problem: 'missing' | 'invalid';
  readonly detail: string;
}

function uuidToBytes(uuid: string, into: Buffer, offset: number): void {
  Buffer.from(uuid.replace(/-/g, ''), 'hex').copy(into, offset);
}

function bytesToUuid(buf: Buffer, offset: number): string {
  const h = buf.toString('hex', offset, offset + 16);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Builds the header for `state` (CRC field zero). */
function encodeHeader(state: CbtState): Buffer {
  const h = Buffer.alloc(STATE_HEADER_SIZE);
  MAGIC.copy(h, 0);
  h.writeUInt32LE(VERSION, 8);
  h.writeUInt32LE(STATE_HEADER_SIZE, 12);
  h.writeUInt32LE(state.blockSize, 16);
  h.writeUInt32LE((state.clean ? FLAG_CLEAN : 0) | (state.readMap !== null ? FLAG_READ_MAP : 0), 20);
  h.writeBigUInt64LE(BigInt(state.blockCount), 24);
  h.writeBigUInt64LE(BigInt(state.capacity), 32);
  h.writeBigUInt64LE(BigInt(state.startSect), 40);
  uuidToBytes(state.generationId, h, 48);
  if (state.snapGenerationId !== null) uuidToBytes(state.snapGenerationId, h, 64);
  h.writeUInt8(state.changesNumber, 80);
  h.writeUInt8(state.snapNumber, 81);
  h.writeUInt32LE(state.epoch, 88);
  return h;
}

function stateCrc(header: Buffer, state: CbtState): number {
  let crc = zlib.crc32(header);
  crc = zlib.crc32(state.map, crc);
  if (state.readMap !== null) crc = zlib.crc32(state.readMap, crc);
  return crc;
}

/** The header of `state`, CRC included (for rewriting the header of a file that holds the same maps). */
export function encodeStateHeader(state: CbtState): Buffer {
  const h = encodeHeader(state);
  h.writeUInt32LE(stateCrc(h, state), CRC_OFFSET);
  return h;
}

/** The whole state file for `state`. */
export function encodeState(state: CbtState): Buffer {
  const h = encodeStateHeader(state);
  return Buffer.concat([h, state.map, ...(state.readMap !== null ? [state.readMap] : [])]);
}

/** Parses a state file; any defect is a {@link StateProblem}, never an exception. */
export function decodeState(buf: Buffer): CbtState | StateProblem {
  const bad = (detail: string): StateProblem => ({ problem: 'invalid', detail });
  if (buf.length < STATE_HEADER_SIZE) return bad(`${buf.length} bytes, shorter than the ${STATE_HEADER_SIZE}-byte header`);
  if (!buf.subarray(0, 8).equals(MAGIC)) return bad('no CBT state magic');
  const version = buf.readUInt32LE(8);
  if ((version !== VERSION && version !== 1) || buf.readUInt32LE(12) !== STATE_HEADER_SIZE) return bad(`format version ${version}, expected ${VERSION}`);
  const flags = buf.readUInt32LE(20);
  const blockCount = Number(buf.readBigUInt64LE(24));
  const hasRead = (flags & FLAG_READ_MAP) !== 0;
  const expected = STATE_HEADER_SIZE + blockCount * (hasRead ? 2 : 1);
  if (buf.length !== expected) return bad(`${buf.length} bytes, expected ${expected} for ${blockCount} blocks`);
  const header = Buffer.from(buf.subarray(0, STATE_HEADER_SIZE));
  const crc = header.readUInt32LE(CRC_OFFSET);
  header.writeUInt32LE(0, CRC_OFFSET);
  const map = new Uint8Array(buf.subarray(STATE_HEADER_SIZE, STATE_HEADER_SIZE + blockCount));
  const readMap = hasRead ? new Uint8Array(buf.subarray(STATE_HEADER_SIZE + blockCount)) : null;
  const changesNumber = buf.readUInt8(80);
  const snapNumber = buf.readUInt8(81);
  const state: CbtState = {
    blockSize: buf.readUInt32LE(16),
    blockCount,
    capacity: Number(buf.readBigUInt64LE(32)),
    startSect: Number(buf.readBigUInt64LE(40)),
    generationId: bytesToUuid(buf, 48),
    changesNumber,
    snapNumber,
    snapGenerationId: hasRead ? bytesToUuid(buf, 64) : null,
    clean: (flags & FLAG_CLEAN) !== 0,
    epoch: version === 1 ? 0 : buf.readUInt32LE(88),
    version,
    map,
    readMap,
  };
  if (stateCrc(header, state) !== crc) return bad('CRC32 mismatch (torn or corrupted write)');
  if (changesNumber < 1 || (hasRead ? snapNumber < 1 : snapNumber !== 0)) return bad(`changes number ${changesNumber} / snap number ${snapNumber} out of range`);
  return state;
}

/** Reads and parses the state file; a missing or unreadable file is a {@link StateProblem}. */
export async function readStateFile(io: CbtStateIo, file: string): Promise<CbtState | StateProblem> {
  let buf: Buffer | null;
  try {
    buf = await io.readFile(file);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    return { problem: 'invalid', detail: `unreadable (${code ?? String(err)})` };
  }
  if (buf === null) return { problem: 'missing', detail: 'no state file' };
  return decodeState(buf);
}
