#!/usr/bin/env node
// The `blkfilter` command. A committed file (not dist/), so that npm links it at install even
// before the package is built; it runs the built program.
import { main } from '../dist/cli.js';

process.exitCode = await main(process.argv);
