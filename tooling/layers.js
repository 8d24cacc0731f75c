// The layer picture of ARCHITECTURE.md as data: a workspace may import only workspaces on a
// lower layer (arrows point down), and only through their public entry points.
/** @type {Record<string, number>} */
export const LAYERS = {
  '@blkfilter/bio': 0,
  '@blkfilter/registry': 1,
  '@blkfilter/cbt': 2,
  '@blkfilter/snapshot': 2,
  '@blkfilter/direct-io': 3,
  '@blkfilter/nbd': 3,
  // Beside nbd and direct-io, so it can import neither (ARCHITECTURE.md, "Wave 2 additions").
  '@blkfilter/backup': 3,
  '@blkfilter/cli': 4,
  '@blkfilter/demo': 5,
  '@blkfilter/harness': 5,
  '@blkfilter/release-check': 5,
};

/** Folder (relative to the repository root) of each workspace named in LAYERS. */
export const FOLDERS = {
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
