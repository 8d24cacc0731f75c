// The parts of the qcow2 format (qemu's docs/interop/qcow2.txt) this package writes and reads:
// version 3, no encryption, no compression, no internal snapshots, 16-bit refcounts.

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const QCOW2_VERSION = 3;
/** Bytes of the version 3 header we write (fields up to and including header_length). */
export const HEADER_LENGTH = 104;
/** log2 of the refcount width in bits: 4 = 16-bit refcounts, qemu's default. */
export const REFCOUNT_ORDER = 4;

/** L1/L2 entry bit 63: the cluster's refcount is exactly one (qemu checks it). */
export const OFLAG_COPIED = 1n << 63n;
/** L2 entry bit 62: compressed cluster (never written here; refused when read). */
export const OFLAG_COMPRESSED = 1n << 62n;
/** L2 entry bit 0 (v3): the cluster reads as zeros, whatever the backing file holds. */
export const OFLAG_ZERO = 1n;
/** Bits 9-55 of an L1/L2 entry: the host offset. */
export const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;

/** Header extension: backing file format name. */
export const EXT_BACKING_FORMAT = 0xe2792aca;
/** Header extension: end of the extension area. */
export const EXT_END = 0;

/** Default cluster size: 64 KiB, qemu's default. */
export const DEFAULT_CLUSTER_SIZE = 65536;
