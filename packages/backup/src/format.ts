// The parts of the qcow2 format (qemu's docs/interop/qcow2.txt) this package writes and reads:
// versions 2 and 3, no encryption, no external data file, no extended L2 entries; deflate
// compressed clusters (compression_type 0). Header offsets are named here once.

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const QCOW2_VERSION = 3;
/** Bytes of the version 3 header we write (fields up to and including header_length). */
export const HEADER_LENGTH = 104;
/** log2 of the refcount width in bits: 4 = 16-bit refcounts, qemu's default. */
export const REFCOUNT_ORDER = 4;
/** qemu refuses backing file names longer than this. */
export const MAX_BACKING_NAME = 1023;
/** qemu's limit on the L1 table (QCOW_MAX_L1_SIZE): 32 MiB. */
export const MAX_L1_BYTES = 32 << 20;
/** qemu's limit on the refcount table (QCOW_MAX_REFTABLE_SIZE): 8 MiB. */
export const MAX_REFTABLE_BYTES = 8 << 20;

/** L1/L2 entry bit 63: the cluster's refcount is exactly one (qemu checks it). */
export const OFLAG_COPIED = 1n << 63n;
/** L2 entry bit 62: compressed cluster. */
export const OFLAG_COMPRESSED = 1n << 62n;
/** L2 entry bit 0 (v3): the cluster reads as zeros, whatever the backing file holds. */
export const OFLAG_ZERO = 1n;
/** Bits 9-55 of an L1/L2 entry: the host offset. */
export const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;
/** L1 entry bits that must be zero: 1-8 and 56-62. */
export const L1_RESERVED = 0x7f00_0000_0000_01fen;
/** Standard L2 entry bits that must be zero: 1-8 and 56-61 (bit 0 is the zero flag in v3). */
export const L2_RESERVED = 0x3f00_0000_0000_01fen;

/** Incompatible feature bits (header offset 72). */
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_EXTERNAL_DATA = 1n << 2n;
export const INCOMPAT_COMPRESSION_TYPE = 1n << 3n;
export const INCOMPAT_EXTENDED_L2 = 1n << 4n;
export const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_EXTERNAL_DATA | INCOMPAT_COMPRESSION_TYPE | INCOMPAT_EXTENDED_L2;

/** compression_type header byte (offset 104): 0 deflate, 1 zstd. */
export const COMPRESSION_DEFLATE = 0;
export const COMPRESSION_ZSTD = 1;
/** qemu compresses with a 4 KiB window (deflateInit2 windowBits -12); its inflate refuses more. */
export const DEFLATE_WINDOW_BITS = 12;

/** Header extension: backing file format name. */
export const EXT_BACKING_FORMAT = 0xe2792aca;
/** Header extension: end of the extension area. */
export const EXT_END = 0;

/** Default cluster size: 64 KiB, qemu's default. */
export const DEFAULT_CLUSTER_SIZE = 65536;

/** Bit position of the "additional sectors" field of a compressed cluster descriptor. */
export function compressedShift(clusterBits: number): number {
  return 62 - (clusterBits - 8);
}
