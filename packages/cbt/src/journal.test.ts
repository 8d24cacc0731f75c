// The journal's faults: a torn last commit is a normal crash (resume), damage anywhere else is
// told apart (new generation, with the file and frame named), and a journal that cannot be
// written never leaves a stale state behind.
import { crc32 } from 'node:zlib';
import { blkdevWrite, BlkStatus, Bio, createDiskSync, MemoryBackend, submitBioWait, type Disk } from '@blkfilter/bio';
import { attachFilter, detachFilter } from '@blkfilter/registry';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { cbtInfo, changedExtents } from './filter.js';
import { JOURNAL_HEADER_SIZE } from './journal.js';
import { OpClock, RecordingStateIo } from './power-cut.js';
import type { CbtStateHandle, CbtStateIo } from './state-io.js';
import { registerTestFilters, take, TAKER } from './test-util.js';
import { CbtGenerationReason } from './types.js';

const STATE = '/s/d.cbt';
const JOURNAL = `${STATE}.journal`;
let n = 0;
const disks: Disk[] = [];

beforeAll(registerTestFilters);
afterEach(async () => {
  for (const d of disks.splice(0)) {
    for (const f of ['cbt', TAKER]) await detachFilter(d.part0, f).catch(() => {});
    await d.remove();
  }
});

function disk(): Disk {
  const d = createDiskSync({ name: `jt${process.pid}x${n++}`, backend: new MemoryBackend({ sizeBytes: 1 << 20 }), scanPartitions: false });
  disks.push(d);
  return d;
}

async function attach(d: Disk, io: CbtStateIo): Promise<void> {
  await attachFilter(d.part0, 'cbt', { options: { blockSize: 4096, stateFile: STATE, stateIo: io } });
  await attachFilter(d.part0, TAKER);
}

/** A life that takes once and writes blocks 1, 2, 3 in three commits; returns its files as a crash leaves them. */
async function crashedLife(): Promise<{ files: Map<string, Buffer>; generationId: string }> {
  const io = new RecordingStateIo(new OpClock());
  const d = disk();
  await attach(d, io);
  await take(d.part0, [d.part0]);
  for (const b of [1, 2, 3]) await blkdevWrite(d.part0, b * 4096, Buffer.alloc(4096, b));
  const { generationId } = await cbtInfo(d.part0);
  return { files: io.files(), generationId };
}

/** Byte offsets of the journal's frames. */
function frames(journal: Buffer): number[] {
  const out: number[] = [];
  for (let p = JOURNAL_HEADER_SIZE; p + 16 <= journal.length; p += 512) if (journal.readUInt32LE(p) === 0x464a4642) out.push(p);
  return out;
}

async function reattach(files: Map<string, Buffer>) {
  const d = disk();
  await attach(d, new RecordingStateIo(new OpClock(), files));
  return { d, info: await cbtInfo(d.part0) };
}

describe('the CBT journal after a crash', () => {
  it('resumes when the last commit is torn: its writes never went down, the earlier marks are all there', async () => {
    const { files, generationId } = await crashedLife();
    const journal = files.get(JOURNAL) as Buffer;
    const f = frames(journal);
    expect(f.length).toBeGreaterThanOrEqual(4); // take, then one commit per first touch
    const torn = Buffer.from(journal);
    torn.fill(0, (f.at(-1) as number) + 8, (f.at(-1) as number) + 16); // the last frame's length and CRC
    files.set(JOURNAL, torn);
    const { d, info } = await reattach(files);
    expect(info).toMatchObject({ generationId, generationReason: CbtGenerationReason.RESUMED_AFTER_CRASH, snapNumber: 1 });
    await take(d.part0, [d.part0]);
    // Block 3's commit was torn, so its write never reached the device: only 1 and 2 are marked.
    expect(await changedExtents(d.part0, { since: 1, generationId })).toMatchObject({ kind: 'extents', extents: [{ sector: 8, sectors: 16 }] });
  });

  it('starts a new generation when a commit in the middle is damaged, naming the journal and the frame', async () => {
    const { files, generationId } = await crashedLife();
    const journal = Buffer.from(files.get(JOURNAL) as Buffer);
    const f = frames(journal);
    journal.writeUInt8(journal.readUInt8((f[1] as number) + 20) ^ 0x01, (f[1] as number) + 20); // a byte of the second commit's records
    files.set(JOURNAL, journal);
    const { info } = await reattach(files);
    expect(info.generationReason).toBe(CbtGenerationReason.STATE_INVALID);
    expect(info.generationId).not.toBe(generationId);
    expect(info.generationDetail).toMatch(new RegExp(`journal frame 2 at byte ${f[1]} is unreadable but frame 3 .* follows it.*${JOURNAL}`));
  });

  it('starts a new generation for a journal of a later checkpoint than the state file', async () => {
    const { files } = await crashedLife();
    const journal = Buffer.from(files.get(JOURNAL) as Buffer);
    journal.writeUInt32LE(journal.readUInt32LE(12) + 1, 12);
    journal.writeUInt32LE(crc32(journal.subarray(0, JOURNAL_HEADER_SIZE - 4)), JOURNAL_HEADER_SIZE - 4);
    files.set(JOURNAL, journal);
    const { info } = await reattach(files);
    expect(info).toMatchObject({ generationReason: CbtGenerationReason.STATE_INVALID });
    expect(info.generationDetail).toMatch(/continues checkpoint/);
  });

  it('resumes from the checkpoint alone when the journal is missing (a crash before it was made)', async () => {
    const { files, generationId } = await crashedLife();
    files.delete(JOURNAL);
    const { info } = await reattach(files);
    expect(info).toMatchObject({ generationId, generationReason: CbtGenerationReason.RESUMED_AFTER_CRASH });
    expect(info.generationDetail).toMatch(/no journal/);
  });
});


/** A state I/O whose writes fail after `okWrites`, and whose removals can fail too. */
class FailingIo implements CbtStateIo {
  readonly inner = new RecordingStateIo(new OpClock());
  writes = 0;
  okWrites = Infinity;
  failUnlink = false;
  readFile(file: string) {
    return this.inner.readFile(file);
  }
  private wrap(h: CbtStateHandle): CbtStateHandle {
    return {
      write: async (data, position) => {
        if (++this.writes > this.okWrites) throw Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' });
        await h.write(data, position);
      },
      sync: () => h.sync(),
      writeDurable: async (data, position) => {
        if (++this.writes > this.okWrites) throw Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' });
        await h.writeDurable(data, position);
      },
      close: () => h.close(),
    };
  }
  async create(file: string) {
    return this.wrap(await this.inner.create(file));
  }
  async openForWrite(file: string, options?: { readonly dsync?: boolean }) {
    return this.wrap(await this.inner.openForWrite(file, options));
  }
  rename(from: string, to: string) {
    return this.inner.rename(from, to);
  }
  async unlink(file: string) {
    if (this.failUnlink) throw Object.assign(new Error('EROFS: read-only file system'), { code: 'EROFS' });
    await this.inner.unlink(file);
  }
  syncDir(dir: string) {
    return this.inner.syncDir(dir);
  }
}

describe('a CBT journal that cannot be written', () => {
  it('removes the state (the next attach starts anew, honestly) and lets the writes go on', async () => {
    const io = new FailingIo();
    const d = disk();
    await attach(d, io);
    io.okWrites = io.writes; // every journal write from now on fails
    await blkdevWrite(d.part0, 0, Buffer.alloc(4096, 1));
    await blkdevWrite(d.part0, 8192, Buffer.alloc(4096, 2));
    const info = await cbtInfo(d.part0);
    expect(info.persistenceError).toMatch(/could not be written \(ENOSPC.*the state files were removed/);
    expect(await io.readFile(STATE)).toBeNull();
    expect(await io.readFile(JOURNAL)).toBeNull();
    await take(d.part0, [d.part0]);
    // The map in memory stays exact for this run.
    expect(await changedExtents(d.part0, { since: 0, generationId: info.generationId })).toMatchObject({ kind: 'extents', extents: [{ sector: 0, sectors: 8 }, { sector: 16, sectors: 8 }] });
    await expect(detachFilter(d.part0, 'cbt')).rejects.toThrow(/next attach will start a new generation/);
  });

  it('refuses writes with EIO when the stale state cannot even be removed', async () => {
    const io = new FailingIo();
    const d = disk();
    await attach(d, io);
    io.okWrites = io.writes;
    io.failUnlink = true;
    const bio = Bio.write(d.part0, 0, Buffer.alloc(4096, 1));
    await expect(submitBioWait(bio)).rejects.toThrow(/nor removed \(.*EROFS.*writes are refused/);
    expect(bio.status).toBe(BlkStatus.IOERR);
    expect(await io.readFile(STATE)).not.toBeNull();
  });
});
