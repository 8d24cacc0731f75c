import { createDisk, FileBackend, InvalidArgumentError, MemoryBackend, type BlockBackend, type Disk } from '@blkfilter/bio';
import { createNbdServer, type NbdListenOptions, type NbdServer, type NbdServerAddress } from './server.js';

/** What `nbd-serve` was asked to do (see {@link parseServeArgs}). */
export interface ServeArgs {
  /** A raw image file to export (FileBackend). */
  readonly file: string | null;
  /** Or a sparse memory device of this many bytes. */
  readonly memoryBytes: number | null;
  /** Export name (default `""`, what socket-activating clients ask for). */
  readonly name: string;
  readonly description: string | null;
  readonly writable: boolean;
  readonly logicalBlockSize: 512 | 4096;
  /** Open the file with O_DIRECT. */
  readonly direct: boolean;
  readonly host: string;
  readonly port: number;
  readonly unix: string | null;
  readonly verbose: boolean;
}

/** Usage text of `nbd-serve`. */
export const SERVE_USAGE = `usage: nbd-serve (--file IMAGE | --memory BYTES) [options]
  --file PATH            export a raw image file
  --memory BYTES         export a sparse in-memory device
  --name NAME            export name (default "")
  --description TEXT     export description
  --writable, -w         allow writes (default read-only)
  --logical-block-size N 512 (default) or 4096
  --direct               open the file with O_DIRECT
  --host HOST            TCP address (default 127.0.0.1)
  --port N               TCP port (default 10809, 0 = any)
  --unix PATH            listen on a unix socket instead
  --verbose, -v          log connections to stderr
Started by systemd-style socket activation (LISTEN_PID/LISTEN_FDS=1), it serves fd 3,
so \`nbdinfo -- [ node nbd-serve.js --file disk.raw ]\` works.`;

/** Parses `nbd-serve` arguments; throws `InvalidArgumentError` with the usage for bad ones. */
export function parseServeArgs(argv: readonly string[]): ServeArgs {
  let file: string | null = null;
  let memoryBytes: number | null = null;
  let name = '';
  let description: string | null = null;
  let writable = false;
  let logicalBlockSize: 512 | 4096 = 512;
  let direct = false;
  let host = '127.0.0.1';
  let port = 10809;
  let unix: string | null = null;
  let verbose = false;
  const bad = (why: string): never => {
    throw new InvalidArgumentError(`nbd-serve: ${why}\n${SERVE_USAGE}`);
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    const value = (): string => {
      const v = argv[++i];
      if (v === undefined) bad(`${arg} needs a value`);
      return v as string;
    };
    switch (arg) {
      case '--file':
        file = value();
        break;
      case '--memory': {
        const n = Number(value());
        if (!Number.isSafeInteger(n) || n <= 0 || n % 512 !== 0) bad('--memory takes a positive multiple of 512 bytes');
        memoryBytes = n;
        break;
      }
      case '--name':
        name = value();
        break;
      case '--description':
        description = value();
        break;
      case '--writable':
      case '-w':
        writable = true;
        break;
      case '--logical-block-size': {
        const n = Number(value());
        if (n !== 512 && n !== 4096) bad('--logical-block-size is 512 or 4096');
        logicalBlockSize = n as 512 | 4096;
        break;
      }
      case '--direct':
        direct = true;
        break;
      case '--host':
        host = value();
        break;
      case '--port': {
        const n = Number(value());
        if (!Number.isInteger(n) || n < 0 || n > 65535) bad('--port takes 0..65535');
        port = n;
        break;
      }
      case '--unix':
        unix = value();
        break;
      case '--verbose':
      case '-v':
        verbose = true;
        break;
      default:
        bad(`unknown argument ${JSON.stringify(arg)}`);
    }
  }
  if ((file === null) === (memoryBytes === null)) bad('give exactly one of --file and --memory');
  return { file, memoryBytes, name, description, writable, logicalBlockSize, direct, host, port, unix, verbose };
}

/** A running `nbd-serve`. */
export interface ServeHandle {
  readonly server: NbdServer;
  readonly disk: Disk;
  readonly address: NbdServerAddress;
  /** True when it serves a socket inherited by socket activation. */
  readonly socketActivated: boolean;
  /** Closes the server (in-flight requests finish) and removes the disk. */
  close(): Promise<void>;
}

/** True when this process was started by systemd-style socket activation with one socket. */
export function isSocketActivated(env: NodeJS.ProcessEnv = process.env): boolean {
  return env.LISTEN_PID === String(process.pid) && env.LISTEN_FDS === '1';
}

/**
 * Runs the `nbd-serve` program in this process: exports one raw file (or memory device) as a
 * disk named `nbd-serve` over NBD. Listens on fd 3 when socket-activated, else on the TCP port
 * or unix socket asked for. Resolves once listening.
 */
export async function serveMain(argv: readonly string[], env: NodeJS.ProcessEnv = process.env): Promise<ServeHandle> {
  const args = parseServeArgs(argv);
  let backend: BlockBackend;
  if (args.file !== null) {
    backend = await FileBackend.open(args.file, { readOnly: !args.writable, direct: args.direct });
  } else {
    backend = new MemoryBackend({ sizeBytes: args.memoryBytes as number });
  }
  const disk = await createDisk({
    name: `nbd-serve-${process.pid}`,
    backend,
    logicalBlockSize: args.logicalBlockSize,
    scanPartitions: false,
  });
  const log = args.verbose ? (level: string, message: string) => process.stderr.write(`[${level}] ${message}\n`) : undefined;
  const server = createNbdServer({
    exports: {
      [args.name]: { device: disk.part0, writable: args.writable, ...(args.description !== null ? { description: args.description } : {}) },
    },
    ...(log !== undefined ? { log } : {}),
  });
  const socketActivated = isSocketActivated(env);
  const listen: NbdListenOptions = socketActivated ? { fd: 3 } : args.unix !== null ? { path: args.unix } : { host: args.host, port: args.port };
  let address: NbdServerAddress;
  try {
    address = await server.listen(listen);
  } catch (err) {
    await disk.remove();
    throw err;
  }
  return {
    server,
    disk,
    address,
    socketActivated,
    async close() {
      await server.close();
      await disk.remove();
    },
  };
}
