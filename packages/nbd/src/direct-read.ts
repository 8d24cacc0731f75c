import net from 'node:net';

/** Who reads a socket adopted by {@link adoptSocket}. */
export interface DirectReadSink {
  /**
   * The buffer the next read lands in, from its first byte. Called once when the socket is
   * adopted and again after every read. Whatever it returns stays the socket's until the next
   * read has landed, so it must not be reused elsewhere before then.
   */
  nextReadBuffer(): Uint8Array;
  /** `n` bytes landed at the start of `buf`, the buffer `nextReadBuffer` returned last. Must not throw. */
  readDone(n: number, buf: Uint8Array): void;
}

/**
 * Moves an accepted socket (from a server with `pauseOnConnect`) to a new `net.Socket` in
 * Node's user-buffer read mode (`onread`): every read lands in a buffer the sink chooses, so
 * a WRITE's payload goes from the kernel into its own buffer, with no 64 KiB chunk allocated
 * and copied per read (decision 0014). Node offers `onread` only to sockets it creates from
 * options; an accepted socket gets it by handing its handle over, as `net.Socket({ handle })`
 * allows. The old socket is destroyed without its handle, which also drops it from its
 * server's connection count.
 *
 * Returns null, the socket untouched, when it has no handle (already closed).
 */
export function adoptSocket(socket: net.Socket, sink: DirectReadSink): net.Socket | null {
  const old = socket as net.Socket & { _handle: unknown };
  const handle = old._handle;
  if (handle === null || handle === undefined || socket.destroyed) return null;
  old._handle = null;
  old.destroy();
  return new net.Socket({
    handle,
    readable: true,
    writable: true,
    onread: {
      buffer: () => sink.nextReadBuffer(),
      callback: (n: number, buf: Uint8Array): boolean => {
        sink.readDone(n, buf);
        return true;
      },
    },
  } as net.SocketConstructorOpts);
}
