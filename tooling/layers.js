// The layer picture of ARCHITECTURE.md as data: a workspace may import only workspaces on a
// lower layer (arrows point down), and only through their public entry points.
/** @type {Record<string, number>} */
export const LAYERS = {
  // Beneath bio: the system calls Node.js lacks, as a native addon (lseek SEEK_DATA/SEEK_HOLE).
  '@blkfilter/native': 0,
  '@blkfilter/bio': 1,
  '@blkfilter/registry': 2,
  '@blkfilter/cbt': 3,
  '@blkfilter/snapshot': 3,
  '@blkfilter/direct-io': 4,
  '@blkfilter/nbd': 4,
  // Beside nbd and direct-io, so it can import neither (ARCHITECTURE.md, "Wave 2 additions").
  '@blkfilter/backup': 4,
  '@blkfilter/cli': 5,
  '@blkfilter/demo': 6,
  '@blkfilter/harness': 6,
  '@blkfilter/release-check': 6,
};

/** Folder (relative to the repository root) of each workspace named in LAYERS. */
export const FOLDERS = {
  '@blkfilter/native': 'packages/native',
  '@blkfilter/bio': 'packages/bio',
  '@blkfilter/registry': 'packages/registry',
  '@blkfilter/cbt': 'packages/cbt',
  '@blkfilter/snapshot': 'packages/snapshot',
  '@blkfilter/direct-io': 'packages/direct-io',
  '@blkfilter/nbd': 'packages/nbd',
  '@blkfilter/backup': 'packages/backup',
  '@blkfilter/cli': 'packages/cli',
  '@blkfilter/demo': 'apps/demo',
  '@blkfilter/harness': 'apps/harness',
  '@blkfilter/release-check': 'apps/release-check',
};

/** Public subpaths a workspace exports (everything else is internal). */
export const PUBLIC_SUBPATHS = new Set(['', '/testing', '/package.json']);

/**
 * The names `from` may not import: every workspace on its own layer or above, except itself.
 * @param {string} from
 * @returns {string[]}
 */
export function forbiddenFor(from) {
  const mine = LAYERS[from];
  if (mine === undefined) throw new Error(`unknown workspace ${from}: add it to tooling/layers.js`);
  return Object.keys(LAYERS).filter((name) => name !== from && (LAYERS[name] ?? 0) >= mine);
}
