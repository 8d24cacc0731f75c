import type { Bench } from 'tinybench';
import type { CaseResult } from './bench-util.js';

/** File backend cases: filled in when the file backend lands. */
export async function runFileCases(_makeBench: () => Bench, _quick: boolean): Promise<CaseResult[]> {
  return [];
}
