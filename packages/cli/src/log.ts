import fs from 'node:fs';

/** Log levels, least to most severe. */
export const LogLevel = { debug: 10, info: 20, warn: 30, error: 40 } as const;
/** One of the keys of {@link LogLevel}. */
export type LogLevelName = keyof typeof LogLevel;

/** Options of {@link createLogger}. */
export interface LoggerOptions {
  /** Lines below this level are dropped (default `info`). */
  readonly level?: LogLevelName;
  /** `text`: `blkfilter: [level] message`; `json`: one object per line (`time`, `level`, `msg`, fields). */
  readonly format?: 'text' | 'json';
  /** Append to this file instead of stderr; {@link Logger.reopen} reopens it (after logrotate). */
  readonly file?: string;
}

/** The daemon's logger: one line per event. */
export interface Logger {
  log(level: LogLevelName, msg: string, fields?: Record<string, unknown>): void;
  /** Reopens the log file (SIGHUP), so a rotated file is let go. */
  reopen(): void;
  close(): void;
}

/** Parses `--log-level`; throws with the accepted values. */
export function parseLogLevel(v: string): LogLevelName {
  if (Object.hasOwn(LogLevel, v)) return v as LogLevelName;
  throw new Error(`--log-level ${v}: expected one of ${Object.keys(LogLevel).join(', ')}`);
}

/** A logger writing to stderr or a file, in text or JSON lines. */
export function createLogger(options: LoggerOptions = {}): Logger {
  const min = LogLevel[options.level ?? 'info'];
  const json = options.format === 'json';
  let fd = options.file !== undefined ? fs.openSync(options.file, 'a', 0o640) : 2;
  return {
    log(level, msg, fields) {
      if (LogLevel[level] < min) return;
      const line = json ? JSON.stringify({ time: new Date().toISOString(), level, msg, ...fields }) : `blkfilter: ${level === 'info' ? '' : `[${level}] `}${msg}`;
      try {
        fs.writeSync(fd, `${line}\n`);
      } catch {
        // A closed stderr (EPIPE) must not take the daemon down.
      }
    },
    reopen() {
      if (options.file === undefined) return;
      const next = fs.openSync(options.file, 'a', 0o640);
      const old = fd;
      fd = next;
      fs.closeSync(old);
    },
    close() {
      if (fd !== 2) fs.closeSync(fd);
      fd = 2;
    },
  };
}
