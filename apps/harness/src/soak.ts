// `npm run soak -- [--seconds N] [--seed S] [--scenario NAME[,NAME]] [--step N]`: the blkfilter
// soak. Runs random bios, faults, snapshots, CBT and NBD scenarios in turn and checks their
// invariants after every step. Progress goes to stderr, the JSON summary to stdout; exits 0 when
// every invariant held, 1 otherwise (with the scenario, step, seed and the command to replay).
import { InjectedBug } from './soak-context.js';
import { runSoak, SOAK_SCENARIOS, type SoakOptions, type SoakScenario } from './soak-runner.js';

const USAGE = `usage: node --expose-gc dist/soak.js [--seconds N] [--seed S] [--scenario ${Object.keys(SOAK_SCENARIOS).join('|')}[,...]] [--step N]
       [--ops-per-worker N] [--bio-timeout-ms N] [--freeze-timeout-ms N] [--stacks] [--known-bugs] [--stress] [--inject-bug ${Object.values(InjectedBug).join('|')}] [--quiet]`;

/** Parses the command line into {@link SoakOptions}; throws with the usage on a bad argument. */
function parseSoakArgs(argv: readonly string[]): SoakOptions & { quiet: boolean } {
  const out: { -readonly [K in keyof SoakOptions]: SoakOptions[K] } & { quiet: boolean } = { quiet: false };
  const num = (flag: string, v: string | undefined): number => {
    const n = Number(v);
    if (v === undefined || !Number.isFinite(n) || n < 0) throw new Error(`${flag} wants a number >= 0, got ${String(v)}\n${USAGE}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    const [flag, inline] = a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined];
    const value = (): string | undefined => inline ?? argv[++i];
    switch (flag) {
      case '--seconds':
        out.seconds = num(flag, value());
        break;
      case '--seed':
        out.seed = Math.floor(num(flag, value()));
        break;
      case '--step':
        out.step = Math.floor(num(flag, value()));
        break;
      case '--ops-per-worker':
        out.opsPerWorker = Math.max(1, Math.floor(num(flag, value())));
        break;
      case '--bio-timeout-ms':
        out.bioTimeoutMs = num(flag, value());
        break;
      case '--freeze-timeout-ms':
        out.freezeTimeoutMs = num(flag, value());
        break;
      case '--scenario': {
        const list = (value() ?? '').split(',').filter((s) => s !== '');
        const bad = list.filter((s) => !Object.hasOwn(SOAK_SCENARIOS, s));
        if (list.length === 0 || bad.length > 0) throw new Error(`unknown scenario ${bad.join(', ') || '(none)'}\n${USAGE}`);
        out.scenarios = list as SoakScenario[];
        break;
      }
      case '--inject-bug': {
        const v = value();
        if (!(Object.values(InjectedBug) as Array<string | undefined>).includes(v)) throw new Error(`unknown bug ${String(v)}\n${USAGE}`);
        out.injectBug = v as InjectedBug;
        break;
      }
      case '--known-bugs':
        out.knownBugs = true;
        break;
      case '--stress':
        out.stress = true;
        break;
      case '--stacks':
        out.captureStacks = true;
        break;
      case '--quiet':
        out.quiet = true;
        break;
      case '--help':
      case '-h':
        throw new Error(USAGE);
      default:
        throw new Error(`unknown argument ${a}\n${USAGE}`);
    }
  }
  return out;
}

async function main(): Promise<number> {
  let args: ReturnType<typeof parseSoakArgs>;
  try {
    args = parseSoakArgs(process.argv.slice(2));
  } catch (err) {
    console.error((err as Error).message);
    return 2;
  }
  const seed = args.seed ?? Math.floor(Math.random() * 0x7fffffff);
  const seconds = args.seconds ?? 30;
  console.error(`soak: seed ${seed}, ${seconds} s, scenarios ${(args.scenarios ?? Object.keys(SOAK_SCENARIOS)).join(',')}${args.step !== undefined ? `, step ${args.step}` : ''}`);
  if (typeof globalThis.gc !== 'function') console.error('soak: run node with --expose-gc to bound the heap after collection (checking without it)');
  const summary = await runSoak({ ...args, seed, seconds, log: args.quiet ? undefined : (line) => console.error(line) });
  for (const f of summary.failures) {
    console.error(`\nsoak FAILED: scenario ${f.scenario}, step ${f.step}, phase "${f.phase}", seed ${f.seed}\n${f.message}`);
    console.error(`replay (in apps/harness): ${f.replay}`);
  }
  if (summary.knownBugsAvoided.length > 0) console.error(`soak: avoided the triggers of known package bugs (--known-bugs to run them): ${summary.knownBugsAvoided.join(', ')}`);
  const total = Object.values(summary.scenarios).reduce((n, s) => n + s.ops, 0);
  console.error(`soak: ${summary.ok ? 'ok' : 'FAILED'}: ${summary.steps} steps, ${total} ops, ${summary.bios} bios, ${summary.checks} checks in ${summary.seconds} s (seed ${seed})`);
  await new Promise<void>((resolve) => process.stdout.write(`${JSON.stringify(summary, null, 2)}\n`, () => resolve()));
  return summary.ok ? 0 : 1;
}

// Exit explicitly: a leaked socket or timer is reported by the checks, and must not hang CI.
main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(err);
    process.exit(1);
  },
);
