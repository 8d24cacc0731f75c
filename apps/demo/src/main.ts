// The end-to-end story grows with the project: today, the block layer underneath it all.
// Snapshots, CBT and backups over NBD join as their packages land (see the root README).
import {
  blkdevRead,
  blkdevWrite,
  createDisk,
  enableBioDebug,
  MemoryBackend,
  SECTOR_SIZE,
} from '@blkfilter/bio';

const GiB = 1024 ** 3;

async function main(): Promise<void> {
  const tracker = enableBioDebug({ captureStacks: false });
  // A 16 GiB sparse disk: memory grows with what is written, not with the size.
  const backend = new MemoryBackend({ sizeBytes: 16 * GiB });
  const disk = await createDisk({ name: 'demo0', backend });

  // An MBR with two partitions, written through the block layer like any other data.
  const mbr = Buffer.alloc(SECTOR_SIZE);
  const parts = [
    { type: 0x83, start: 2048, size: 8 * 1024 * 1024 },
    { type: 0x82, start: 2048 + 8 * 1024 * 1024, size: 4 * 1024 * 1024 },
  ];
  parts.forEach((p, i) => {
    const e = 446 + 16 * i;
    mbr[e + 4] = p.type;
    mbr.writeUInt32LE(p.start, e + 8);
    mbr.writeUInt32LE(p.size, e + 12);
  });
  mbr.writeUInt16LE(0xaa55, 510);
  await blkdevWrite(disk.part0, 0, mbr);
  const table = await disk.rescanPartitions();

  // A write to partition 2 lands at its start on the whole disk.
  const p2 = disk.partition(2);
  if (p2 === undefined) throw new Error('partition 2 was not found');
  const message = Buffer.alloc(4096);
  message.write('hello from demo0p2');
  await blkdevWrite(p2, 0, message);
  const back = await blkdevRead(disk.part0, p2.startSect * SECTOR_SIZE, 4096);

  tracker.assertAllCompleted();
  console.log(
    JSON.stringify(
      {
        disk: { name: disk.name, capacitySectors: disk.capacity, logicalBlockSize: disk.limits.logicalBlockSize },
        partitions: table?.partitions.map((p) => ({ partno: p.partno, start: p.start, size: p.size, type: p.type })),
        remapped: back.subarray(0, 18).toString(),
        memoryUsedBytes: backend.allocatedBytes,
        bios: { submitted: tracker.submitted, completed: tracker.completed },
      },
      null,
      2,
    ),
  );
  await disk.remove();
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
