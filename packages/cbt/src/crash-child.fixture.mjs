// Run by crash.test.ts in a child process: attaches CBT to a file-backed disk, reports its
// generation, then writes until it is killed with SIGKILL. Imports the packages by name, as a
// user would (the package is built before its tests run).
import { blkdevWrite, createDisk, FileBackend } from '@blkfilter/bio';
import { attachFilter } from '@blkfilter/registry';
import { cbtInfo, registerCbtFilter } from '@blkfilter/cbt';

const [image] = process.argv.slice(2);
registerCbtFilter();
const disk = await createDisk({ name: 'crash0', backend: await FileBackend.open(image), scanPartitions: false });
await attachFilter(disk.part0, 'cbt'); // default state file: <image>.cbt
const info = await cbtInfo(disk.part0);
process.send?.({ type: 'attached', generationId: info.generationId, generationReason: info.generationReason });
const block = Buffer.alloc(64 * 1024);
for (let i = 0; ; i++) {
  block.fill(i & 0xff);
  await blkdevWrite(disk.part0, (i % 128) * block.length, block);
  if (i === 20) process.send?.({ type: 'writing' });
}
