import { fork, type ChildProcess } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { blkdevWrite, createDisk, FileBackend } from '@blkfilter/bio';
import { attachFilter, detachFilter } from '@blkfilter/registry';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { cbtInfo, changedExtents } from './filter.js';
import { cleanupDisks, cleanupTmpDirs, registerTestFilters, take, TAKER, tmpDir, trackDisk } from './test-util.js';
import { CbtGenerationReason } from './types.js';

const CHILD = fileURLToPath(new URL('./crash-child.fixture.mjs', import.meta.url));

beforeAll(registerTestFilters);
afterEach(cleanupDisks);
afterAll(async () => {
  await cleanupDisks();
  await cleanupTmpDirs();
});

function nextMessage(child: ChildProcess, type: string): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const onMessage = (m: unknown) => {
      const msg = m as Record<string, unknown>;
      if (msg.type !== type) return;
      child.off('message', onMessage);
      child.off('exit', onExit);
      resolve(msg);
    };
    const onExit = (code: number | null) => reject(new Error(`child exited (${code}) before "${type}"`));
    child.on('message', onMessage);
    child.once('exit', onExit);
  });
}

async function openDisk(image: string, name: string) {
  return trackDisk(await createDisk({ name, backend: await FileBackend.open(image), scanPartitions: false }));
}

describe('a process killed while tracking', () => {
  it('resumes the same generation at the next attach, and reports every block the killed process changed', async () => {
    const dir = await tmpDir();
    const image = path.join(dir, 'disk.raw');
    await (await FileBackend.open(image, { create: { sizeBytes: 16 << 20 } })).close();

    // A first, clean life: a take and a clean detach leave a resumable state file.
    const d1 = await openDisk(image, `crashA${process.pid}`);
    await attachFilter(d1.part0, 'cbt');
    await attachFilter(d1.part0, TAKER);
    await blkdevWrite(d1.part0, 0, Buffer.alloc(4096, 1));
    await take(d1.part0, [d1.part0]);
    const g1 = (await cbtInfo(d1.part0)).generationId;
    await cleanupDisks();

    // The child resumes it, writes, and is killed mid-write.
    const child = fork(CHILD, [image], { execArgv: [], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    const exited = new Promise<NodeJS.Signals | null>((r) => child.once('exit', (_code, signal) => r(signal)));
    try {
      const attached = await nextMessage(child, 'attached');
      expect(attached).toMatchObject({ generationId: g1, generationReason: CbtGenerationReason.RESUMED });
      await nextMessage(child, 'writing');
    } finally {
      child.kill('SIGKILL');
    }
    expect(await exited).toBe('SIGKILL');

    const d2 = await openDisk(image, `crashB${process.pid}`);
    await attachFilter(d2.part0, 'cbt');
    await attachFilter(d2.part0, TAKER);
    const info = await cbtInfo(d2.part0);
    expect(info).toMatchObject({ generationId: g1, generationReason: CbtGenerationReason.RESUMED_AFTER_CRASH });
    await take(d2.part0, [d2.part0]);
    const r = await changedExtents(d2.part0, { since: 1, generationId: g1 });
    if (r.kind !== 'extents') throw new Error(`expected extents after the crash, got ${r.reason}: ${r.message}`);
    // Every 64 KiB block that differs from the image at take 1 (block 0 began with 4 KiB of 1s,
    // the rest zeros) is reported: the child's writes survived its kill, and so did their marks.
    const atTake1 = Buffer.alloc(16 << 20);
    atTake1.fill(1, 0, 4096);
    const now = await fs.readFile(image);
    const reported = new Set<number>();
    for (const e of r.extents) for (let b = e.sector / 128; b < (e.sector + e.sectors) / 128; b++) reported.add(b);
    let changed = 0;
    for (let b = 0; b < 256; b++) {
      if (now.subarray(b * 65536, (b + 1) * 65536).equals(atTake1.subarray(b * 65536, (b + 1) * 65536))) continue;
      changed++;
      expect(reported.has(b), `block ${b} changed after take 1 but is not reported`).toBe(true);
    }
    expect(changed).toBeGreaterThan(20);
    await detachFilter(d2.part0, 'cbt');
    await fs.rm(dir, { recursive: true, force: true });
  });
});
