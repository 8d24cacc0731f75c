// Run by crash.test.ts: one backup or prune of a deterministic disk, killed with SIGKILL at a
// named step (or by the parent at a random moment). Imports the package as a user would.
import { createDiskSync, MemoryBackend, blkdevWrite } from '@blkfilter/bio';
import { backupPoint, prune } from '../dist/index.js';

export const CLUSTER = 65536;

/** The disk at point k: every cluster filled; points 2.. rewrite a few clusters each. */
export function content(k, size) {
  const clusters = size / CLUSTER;
  const b = Buffer.alloc(size);
  for (let c = 0; c < clusters; c++) b.fill((c * 7 + 1) & 0xff || 1, c * CLUSTER, (c + 1) * CLUSTER);
  for (let j = 2; j <= k; j++) for (const c of changed(j, clusters)) b.fill((j * 16 + c) & 0xff || 3, c * CLUSTER, (c + 1) * CLUSTER);
  return b;
}

function changed(j, clusters) {
  return [(j * 3) % clusters, (j * 3 + 10) % clusters, (50 + j) % clusters];
}

/** A source for point k, with a CBT take that knows what changed since any earlier point. */
export function source(k, size, name = 'crashdisk') {
  const disk = createDiskSync({ name: `${name}-${process.pid}-${k}-${Math.random().toString(36).slice(2)}`, backend: new MemoryBackend({ sizeBytes: size }), scanPartitions: false });
  const clusters = size / CLUSTER;
  return {
    disk,
    ready: blkdevWrite(disk.part0, 0, content(k, size)),
    source: {
      name,
      image: disk.part0,
      cbt: {
        generationId: 'gen-crash',
        snapNumber: k,
        changedSince: async ({ since }) => {
          const set = new Set();
          for (let j = since + 1; j <= k; j++) for (const c of changed(j, clusters)) set.add(c);
          const extents = [...set].sort((a, b) => a - b).map((c) => ({ sector: (c * CLUSTER) / 512, sectors: CLUSTER / 512 }));
          return { kind: 'extents', generationId: 'gen-crash', since, snapNumber: k, snapshotId: null, blockSize: CLUSTER, extents };
        },
      },
    },
  };
}

if (process.argv[1]?.endsWith('crash-child.fixture.mjs')) {
  const [dir, action, arg, killAt, sizeArg] = process.argv.slice(2);
  const size = Number(sizeArg);
  const onStep = (step) => {
    if (step === killAt) process.kill(process.pid, 'SIGKILL');
  };
  if (action === 'backup') {
    const s = source(Number(arg), size);
    await s.ready;
    process.stdout.write('ready\n');
    await backupPoint({ dir, sources: [s.source], onStep });
  } else {
    process.stdout.write('ready\n');
    await prune(dir, { keepLast: Number(arg), onStep });
  }
  process.stdout.write('done\n');
}
