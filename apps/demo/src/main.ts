// `npm run demo`: the job blkfilter is for, end to end, with no arguments. Where the machine
// allows a kernel filesystem (root, /dev/fuse, loop devices, nbdfuse, e2fsprogs) the story runs
// on a real ext4 with real files (fs-story.ts); otherwise one line says which prerequisite is
// missing and the raw-image story runs (raw-story.ts; `--raw` asks for it). Ends with "all
// checks passed", or exits non-zero.
import { fsStory, fsStoryPrerequisites } from './fs-story.js';
import { rawStory } from './raw-story.js';
import { failureCount, say } from './story.js';

async function main(argv: readonly string[]): Promise<void> {
  const unknown = argv.filter((a) => a !== '--raw');
  if (unknown.length > 0) {
    console.error(`usage: npm run demo [-- --raw]   (unknown: ${unknown.join(' ')})`);
    process.exitCode = 2;
    return;
  }
  const pre = fsStoryPrerequisites();
  if (argv.includes('--raw')) {
    say('the raw-image story (--raw)');
    await rawStory();
  } else if (pre.ok) {
    say(`the ext4 story: this machine can mount a kernel filesystem on a blkfilter device (${pre.method})`);
    await fsStory(pre.method);
  } else {
    say(`the raw-image story: no kernel filesystem here, because ${pre.reason}`);
    await rawStory();
  }
  const failures = failureCount();
  say(failures === 0 ? 'all checks passed' : `${failures} check(s) FAILED`);
  if (failures > 0) process.exitCode = 1;
}

main(process.argv.slice(2)).catch((err: unknown) => {
  console.error(err);
  say('FAILED: the story stopped on an error (above)');
  process.exitCode = 1;
});
