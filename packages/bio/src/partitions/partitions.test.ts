import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { afterAll, describe, expect, it, onTestFinished } from 'vitest';
import { MemoryBackend } from '../backends/memory.js';
import { createDisk, type BlockDev, type Disk } from '../device.js';
import { InvalidArgumentError, PartitionTableError } from '../errors.js';
import { blkdevRead, blkdevWrite } from '../io.js';
import { readPartitionTable } from './index.js';
import type { PartitionTable } from './types.js';

// Images are made by util-linux (sfdisk, or fdisk -b 4096 since sfdisk 2.38 has no
// --sector-size) and our parser is checked against what util-linux reads back.

const MiB = 1 << 20;
const IMAGE_BYTES = 64 * MiB;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-partitions-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

let seq = 0;
/** A new path ending in ".img", so that util-linux names its partitions `<path>1`. */
function imagePath(): string {
  return path.join(tmp, `image${seq++}.img`);
}

/** Makes a sparse image of `bytes` and partitions it with the sfdisk `script`. */
function makeImage(script: string, lbs: 512 | 4096 = 512, bytes = IMAGE_BYTES): string {
  const file = imagePath();
  fs.writeFileSync(file, '');
  fs.truncateSync(file, bytes);
  if (lbs === 512) {
    execFileSync('sfdisk', ['--no-reread', '--no-tell-kernel', '-q', file], { input: script, stdio: 'pipe' });
  } else {
    const scriptFile = `${file}.sfdisk`;
    fs.writeFileSync(scriptFile, script);
    // fdisk's "I" loads an sfdisk script, "w" writes the table; a script that fails to load
    // still exits 0 (and writes an empty DOS label), so check what fdisk said.
    const out = execFileSync('fdisk', ['-b', String(lbs), file], { input: `I\n${scriptFile}\nw\n`, encoding: 'utf8', stdio: 'pipe' });
    if (!out.includes('Script successfully applied')) throw new Error(`fdisk could not apply the script to ${file}:\n${out}`);
  }
  return file;
}

interface ListedPartition {
  partno: number;
  start: number;
  size: number;
  type: string;
  uuid?: string;
  name?: string;
  bootable: boolean;
  attrs: bigint;
}

/** A table as util-linux lists it; start and size in sectors of `sectorSize`. */
interface Listed {
  label: string;
  id: string;
  sectorSize: number;
  firstLba?: number;
  lastLba?: number;
  partitions: ListedPartition[];
}

interface SfdiskJson {
  partitiontable: {
    label: string;
    id: string;
    sectorsize: number;
    firstlba?: number;
    lastlba?: number;
    partitions: Array<{ node: string; start: number; size: number; type: string; uuid?: string; name?: string; bootable?: boolean; attrs?: string }>;
  };
}

/** `sfdisk --json file` for 512-byte sectors; fdisk's "O" dump (the `sfdisk --dump` format) for others. */
function listImage(file: string, lbs: 512 | 4096 = 512): Listed {
  if (lbs === 512) {
    const { partitiontable: t } = JSON.parse(execFileSync('sfdisk', ['--json', file], { encoding: 'utf8' })) as SfdiskJson;
    return {
      label: t.label,
      id: t.id,
      sectorSize: t.sectorsize,
      firstLba: t.firstlba,
      lastLba: t.lastlba,
      partitions: t.partitions.map((p) => ({
        partno: partnoOf(file, p.node),
        start: p.start,
        size: p.size,
        type: p.type,
        uuid: p.uuid,
        name: p.name,
        bootable: p.bootable === true,
        attrs: parseAttrs(p.attrs),
      })),
    };
  }
  const dumpFile = `${file}.dump`;
  execFileSync('fdisk', ['-b', String(lbs), file], { input: `O\n${dumpFile}\nq\n`, stdio: 'pipe' });
  return parseDump(file, fs.readFileSync(dumpFile, 'utf8'));
}

function partnoOf(file: string, node: string): number {
  expect(node.startsWith(file)).toBe(true);
  return Number(node.slice(file.length));
}

function parseDump(file: string, text: string): Listed {
  const head = new Map<string, string>();
  const partitions: ListedPartition[] = [];
  for (const line of text.split('\n')) {
    if (line.startsWith(file)) {
      const [node, rest] = line.split(' : ') as [string, string];
      const fields = new Map<string, string>();
      for (const m of rest.matchAll(/(\w+)(?:=("(?:[^"\\]|\\.)*"|[^,]*))?/g)) fields.set(m[1] as string, (m[2] ?? '').trim());
      const name = fields.get('name');
      const attrs = fields.get('attrs');
      partitions.push({
        partno: partnoOf(file, node),
        start: Number(fields.get('start')),
        size: Number(fields.get('size')),
        type: fields.get('type') as string,
        uuid: fields.get('uuid'),
        name: name === undefined ? undefined : unquote(name),
        bootable: fields.has('bootable'),
        attrs: parseAttrs(attrs === undefined ? undefined : unquote(attrs)),
      });
    } else {
      const m = /^([\w-]+): (.*)$/.exec(line);
      if (m) head.set(m[1] as string, m[2] as string);
    }
  }
  const num = (k: string): number | undefined => (head.has(k) ? Number(head.get(k)) : undefined);
  return {
    label: head.get('label') as string,
    id: head.get('label-id') as string,
    sectorSize: Number(head.get('sector-size')),
    firstLba: num('first-lba'),
    lastLba: num('last-lba'),
    partitions,
  };
}

/** Undoes the dump's quoting, where bytes outside ASCII are written `\xNN`. */
function unquote(quoted: string): string {
  const body = quoted.slice(1, -1);
  const bytes: number[] = [];
  for (let i = 0; i < body.length; i++) {
    if (body[i] === '\\' && body[i + 1] === 'x') {
      bytes.push(parseInt(body.slice(i + 2, i + 4), 16));
      i += 3;
    } else {
      if (body[i] === '\\') i++;
      bytes.push(...Buffer.from(body[i] as string, 'utf8'));
    }
  }
  return Buffer.from(bytes).toString('utf8');
}

/** libfdisk's GPT attribute string (`RequiredPartition LegacyBIOSBootable GUID:60,61`) as bits. */
function parseAttrs(attrs: string | undefined): bigint {
  const named: Record<string, number> = { RequiredPartition: 0, NoBlockIOProtocol: 1, LegacyBIOSBootable: 2 };
  let bits = 0n;
  for (const word of (attrs ?? '').split(/\s+/).filter(Boolean)) {
    const bitNumbers = word.startsWith('GUID:') ? word.slice(5).split(',').map(Number) : [named[word] as number];
    for (const b of bitNumbers) {
      expect(Number.isInteger(b)).toBe(true);
      bits |= 1n << BigInt(b);
    }
  }
  return bits;
}

/** Checks `table` against util-linux's `listed`, converting its sectors to 512-byte ones. */
function expectSameTable(table: PartitionTable | null, listed: Listed): void {
  expect(table).not.toBeNull();
  expect(listed.partitions.length).toBeGreaterThan(0);
  const t = table as PartitionTable;
  const k = listed.sectorSize / 512;
  expect({ label: t.label, id: t.id, sectorSize: t.sectorSize }).toEqual({ label: listed.label, id: listed.id, sectorSize: listed.sectorSize });
  if (t.label === 'gpt') expect({ firstLba: t.firstLba, lastLba: t.lastLba }).toEqual({ firstLba: listed.firstLba, lastLba: listed.lastLba });
  expect(
    t.partitions.map((p) => ({ partno: p.partno, start: p.start, size: p.size, type: p.type, uuid: p.uuid, name: p.name, bootable: p.bootable === true, attrs: p.attributes ?? 0n })),
  ).toEqual(
    listed.partitions.map((p) => ({
      partno: p.partno,
      start: p.start * k,
      size: p.size * k,
      type: p.type,
      uuid: p.uuid,
      // libfdisk leaves out an empty GPT name.
      name: t.label === 'gpt' ? (p.name ?? '') : undefined,
      bootable: p.bootable,
      attrs: p.attrs,
    })),
  );
}

/**
 * A disk named `name` holding `image` (a file or its bytes), partitions not yet scanned;
 * removed when the test ends. Only the non-zero 64 KiB chunks are written: the memory
 * backend reads the rest as zeros.
 */
async function loadImage(name: string, image: string | Buffer, lbs: 512 | 4096 = 512): Promise<Disk> {
  const data = typeof image === 'string' ? fs.readFileSync(image) : image;
  const disk = await createDisk({ name, backend: new MemoryBackend({ sizeBytes: data.length }), scanPartitions: false, logicalBlockSize: lbs });
  onTestFinished(() => disk.remove());
  const chunk = 64 * 1024;
  const zeros = Buffer.alloc(chunk);
  for (let off = 0; off < data.length; off += chunk) {
    const piece = data.subarray(off, Math.min(off + chunk, data.length));
    if (!piece.equals(zeros.subarray(0, piece.length))) await blkdevWrite(disk.part0, off, piece);
  }
  return disk;
}

function flipByte(buf: Buffer, offset: number): void {
  buf[offset] = (buf[offset] as number) ^ 0xff;
}

const DOS_SCRIPT = `label: dos
label-id: 0x1234abcd
size=10M, type=83, bootable
size=10M, type=ef
size=30M, type=5
size=5M, type=82
size=5M, type=83
size=5M, type=8e
type=c
`;

const GPT_SCRIPT = `label: gpt
label-id: 01234567-89AB-CDEF-0123-456789ABCDEF
size=10M, type=L, name="root fs"
size=10M, type=U, name="EFI System", attrs="RequiredPartition LegacyBIOSBootable GUID:60"
size=5M, type=S, name="swäp", uuid=aabbccdd-1122-3344-5566-778899001122
start=40M, size=2M, type=L
size=1M, type=L, name="a name of thirty-six characters!!!!!"
`;

describe('readPartitionTable: DOS (MBR)', () => {
  it('reads primaries and an extended partition with 3 logical partitions as sfdisk does', async () => {
    const file = makeImage(DOS_SCRIPT);
    const listed = listImage(file);
    const disk = await loadImage('pt-dos0', file);
    const table = await disk.rescanPartitions();
    expectSameTable(table, listed);
    expect(table?.partitions.map((p) => [p.partno, p.kind, p.type])).toEqual([
      [1, 'primary', '83'],
      [2, 'primary', 'ef'],
      [3, 'extended', '5'],
      [4, 'primary', '82'],
      [5, 'logical', '83'],
      [6, 'logical', '8e'],
      [7, 'logical', 'c'],
    ]);
    expect(table?.id).toBe('0x1234abcd');
  });

  it('converts logical blocks to 512-byte sectors on a 4096-byte-sector disk, logical partitions included', async () => {
    const file = makeImage(DOS_SCRIPT, 4096);
    const listed = listImage(file, 4096);
    expect(listed.partitions.map((p) => p.partno)).toEqual([1, 2, 3, 4, 5, 6, 7]);
    const disk = await loadImage('pt-dos4k', file, 4096);
    expectSameTable(await disk.rescanPartitions(), listed);
  });

  it('stops an EBR chain that loops back, listing each logical partition once', async () => {
    const file = makeImage(DOS_SCRIPT);
    const listed = listImage(file);
    const image = fs.readFileSync(file);
    const extStart = image.readUInt32LE(446 + 2 * 16 + 8);
    // Follow the links to the last EBR and point its link back at the first.
    let ebr = extStart;
    for (let link = ebr * 512 + 446 + 16; image.readUInt32LE(link + 12) !== 0; link = ebr * 512 + 446 + 16) {
      ebr = extStart + image.readUInt32LE(link + 8);
    }
    expect(ebr).not.toBe(extStart);
    const link = ebr * 512 + 446 + 16;
    image[link + 4] = 0x05;
    image.writeUInt32LE(0, link + 8);
    image.writeUInt32LE(2048, link + 12);
    const disk = await loadImage('pt-dosloop', image);
    expectSameTable(await disk.rescanPartitions(), listed);
  });

  it('stops an EBR chain whose link leaves the extended partition', async () => {
    const file = makeImage(DOS_SCRIPT);
    const image = fs.readFileSync(file);
    const extStart = image.readUInt32LE(446 + 2 * 16 + 8);
    const extSize = image.readUInt32LE(446 + 2 * 16 + 12);
    // The first EBR's link points past the extended partition, at a plausible EBR that must not be read.
    const outside = extSize + 4096;
    image.writeUInt32LE(outside, extStart * 512 + 446 + 16 + 8);
    const decoy = (extStart + outside) * 512;
    image[decoy + 446 + 4] = 0x83;
    image.writeUInt32LE(1, decoy + 446 + 8);
    image.writeUInt32LE(100, decoy + 446 + 12);
    image[decoy + 510] = 0x55;
    image[decoy + 511] = 0xaa;
    const disk = await loadImage('pt-dosout', image);
    const table = await disk.rescanPartitions();
    expect(table?.partitions.map((p) => p.partno)).toEqual([1, 2, 3, 4, 5]);
  });

  it('cuts an entry that runs past the end of the disk and drops one that starts past it, as Linux does', async () => {
    const image = Buffer.alloc(8 * MiB); // 16384 sectors
    const entry = (slot: number, type: number, start: number, size: number): void => {
      const o = 446 + slot * 16;
      image[o + 4] = type;
      image.writeUInt32LE(start, o + 8);
      image.writeUInt32LE(size, o + 12);
    };
    entry(0, 0x83, 2048, 100_000);
    entry(1, 0x83, 20_000, 10);
    entry(2, 0x00, 4096, 8); // type 0 with a size: a partition to Linux and libfdisk alike
    image.writeUInt16LE(0xaa55, 510);
    const disk = await loadImage('pt-doseod', image);
    const table = await disk.rescanPartitions();
    expect(table?.partitions.map((p) => [p.partno, p.start, p.size, p.type])).toEqual([
      [1, 2048, 16384 - 2048, '83'],
      [3, 4096, 8, '0'],
    ]);
    expect(disk.partitions.map((p) => p.name)).toEqual(['pt-doseod1', 'pt-doseod3']);
  });

  it('returns null for a FAT boot sector: 0x55AA but boot indicators that are neither 0 nor 0x80', async () => {
    const image = Buffer.alloc(MiB);
    image.set([0xeb, 0x3c, 0x90], 0);
    image.write('MSDOS5.0', 3, 'latin1');
    image.fill(0x37, 446, 510);
    image.writeUInt16LE(0xaa55, 510);
    const disk = await loadImage('pt-fat', image);
    expect(await disk.rescanPartitions()).toBeNull();
  });
});

describe('readPartitionTable: GPT', () => {
  it('reads named partitions, GUIDs and attributes as sfdisk does', async () => {
    const file = makeImage(GPT_SCRIPT);
    const listed = listImage(file);
    const disk = await loadImage('pt-gpt0', file);
    const table = await disk.rescanPartitions();
    expectSameTable(table, listed);
    expect(table?.usedBackup).toBe(false);
    expect(table?.partitions.map((p) => p.name)).toEqual(['root fs', 'EFI System', 'swäp', '', 'a name of thirty-six characters!!!!!']);
    expect(table?.partitions[1]?.attributes).toBe((1n << 60n) | 0b101n);
    expect(table?.partitions[2]?.uuid).toBe('AABBCCDD-1122-3344-5566-778899001122');
    expect(table?.partitions.every((p) => p.kind === 'gpt')).toBe(true);
  });

  it('reads a GPT on a disk with 4096-byte logical blocks', async () => {
    const file = makeImage(GPT_SCRIPT, 4096);
    const listed = listImage(file, 4096);
    expect(listed.sectorSize).toBe(4096);
    const disk = await loadImage('pt-gpt4k', file, 4096);
    const table = await disk.rescanPartitions();
    expectSameTable(table, listed);
    expect(table?.partitions[0]?.start).toBe(256 * 8);
  });

  for (const lbs of [512, 4096] as const) {
    it(`uses the backup when the primary header is corrupt (${lbs}-byte blocks)`, async () => {
      const file = makeImage(GPT_SCRIPT, lbs);
      const before = listImage(file, lbs);
      const image = fs.readFileSync(file);
      flipByte(image, lbs + 60); // inside the disk GUID: the header CRC no longer matches
      const disk = await loadImage(`pt-gptbadhdr${lbs}`, image, lbs);
      const table = await disk.rescanPartitions();
      expectSameTable(table, before);
      expect(table?.usedBackup).toBe(true);
      expect(disk.partitions).toHaveLength(before.partitions.length);
    });

    it(`uses the backup when the primary entry array is corrupt (${lbs}-byte blocks)`, async () => {
      const file = makeImage(GPT_SCRIPT, lbs);
      const before = listImage(file, lbs);
      const image = fs.readFileSync(file);
      flipByte(image, 2 * lbs + 56); // first entry's name
      const disk = await loadImage(`pt-gptbadents${lbs}`, image, lbs);
      const table = await disk.rescanPartitions();
      expectSameTable(table, before);
      expect(table?.usedBackup).toBe(true);
    });
  }

  it('throws PartitionTableError naming both headers when both are corrupt', async () => {
    const file = makeImage(GPT_SCRIPT);
    const image = fs.readFileSync(file);
    flipByte(image, 512 + 60);
    flipByte(image, image.length - 512 + 60);
    const disk = await loadImage('pt-gptbad2', image);
    const err = await disk.rescanPartitions().then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(PartitionTableError);
    const message = (err as Error).message;
    expect(message).toContain('"pt-gptbad2"');
    expect(message).toMatch(/primary header at LBA 1: header CRC32 is 0x[0-9a-f]{8}/);
    expect(message).toContain(`backup header at LBA ${image.length / 512 - 1}: header CRC32`);
    expect(disk.partitions).toHaveLength(0);
  });

  it('skips an entry that ends past the last LBA of the disk, as efi.c does', async () => {
    const file = makeImage(GPT_SCRIPT);
    const image = fs.readFileSync(file);
    const lastLba = image.length / 512 - 1;
    // Rewrite entry 4 of the primary to end one block past the disk, with fresh CRCs.
    const entries = 2 * 512;
    image.writeBigUInt64LE(BigInt(lastLba + 1), entries + 3 * 128 + 40);
    const numEntries = image.readUInt32LE(512 + 80);
    image.writeUInt32LE(crc32(image.subarray(entries, entries + numEntries * 128)), 512 + 88);
    image.writeUInt32LE(0, 512 + 16);
    image.writeUInt32LE(crc32(image.subarray(512, 512 + image.readUInt32LE(512 + 12))), 512 + 16);
    const disk = await loadImage('pt-gpteod', image);
    const table = await disk.rescanPartitions();
    expect(table?.usedBackup).toBe(false);
    expect(table?.partitions.map((p) => p.partno)).toEqual([1, 2, 3, 5]);
  });
});

describe('readPartitionTable: no table', () => {
  it('returns null for a blank disk and for data without the 0x55AA signature', async () => {
    const disk = await loadImage('pt-none', Buffer.alloc(MiB));
    expect(await disk.rescanPartitions()).toBeNull();
    expect(disk.partitions).toHaveLength(0);
    await blkdevWrite(disk.part0, 0, Buffer.alloc(512, 0xa5));
    expect(await readPartitionTable(disk.part0)).toBeNull();
  });

  it('refuses a partition: tables are read from the whole disk', async () => {
    const disk = await loadImage('pt-notdisk', makeImage(DOS_SCRIPT));
    await disk.rescanPartitions();
    await expect(readPartitionTable(disk.partition(1) as BlockDev)).rejects.toThrow(InvalidArgumentError);
  });
});

describe('Disk.rescanPartitions', () => {
  it('creates <disk>p<n> devices and remaps their bios onto the whole disk', async () => {
    const file = makeImage(GPT_SCRIPT);
    const listed = listImage(file);
    const disk = await loadImage('pt-remap0', file);
    await disk.rescanPartitions();
    expect(disk.partitions.map((p) => p.name)).toEqual(listed.partitions.map((p) => `pt-remap0p${p.partno}`));
    const part = disk.partition(2) as BlockDev;
    expect([part.startSect, part.nrSects]).toEqual([listed.partitions[1]?.start, listed.partitions[1]?.size]);
    const data = Buffer.alloc(8192);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
    await blkdevWrite(part, 4096, data);
    expect(await blkdevRead(disk.part0, part.startSect * 512 + 4096, data.length)).toEqual(data);
    expect(await blkdevRead(part, 4096, data.length)).toEqual(data);
  });
});
