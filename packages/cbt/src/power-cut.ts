import type { CbtStateHandle, CbtStateIo } from './state-io.js';

/**
 * One counter for every recorded operation (state files and device alike), so a crash point is
 * one number: everything recorded before it happened, nothing after.
 */
export class OpClock {
  now = 0;
  tick(): number {
    return ++this.now;
  }
}

interface Inode {
  readonly id: number;
  /** Writes in order: the op number, where, what. */
  readonly writes: Array<{ readonly seq: number; readonly offset: number; readonly data: Buffer }>;
  /** Op numbers of completed syncs of this inode. */
  readonly syncs: number[];
}

type NameOp =
  | { readonly seq: number; readonly kind: 'link'; readonly name: string; readonly inode: number }
  | { readonly seq: number; readonly kind: 'unlink'; readonly name: string };

/** A pseudo-random source for {@link RecordingStateIo.crashImage} (e.g. a seeded generator). */
export type Chance = () => number;

/**
 * A {@link CbtStateIo} in memory that records every write, sync, rename and removal with the
 * shared {@link OpClock}, in the manner of dm-log-writes: {@link crashImage} rebuilds the files
 * a power cut at any op could have left (what was synced before it, any subset of the 512-byte
 * sectors written after it, and directory changes up to the last directory sync plus an
 * in-order prefix of later ones).
 */
export class RecordingStateIo implements CbtStateIo {
  private readonly clock: OpClock;
  private readonly inodes: Inode[] = [];
  private readonly names = new Map<string, number>();
  private readonly nameOps: NameOp[] = [];
  private readonly dirSyncs: number[] = [];

  constructor(clock: OpClock, initial: ReadonlyMap<string, Buffer> = new Map()) {
    this.clock = clock;
    for (const [name, data] of initial) {
      const ino = this.newInode();
      ino.writes.push({ seq: 0, offset: 0, data: Buffer.from(data) });
      ino.syncs.push(0);
      this.names.set(name, ino.id);
      this.nameOps.push({ seq: 0, kind: 'link', name, inode: ino.id });
    }
    this.dirSyncs.push(0);
  }

  private newInode(): Inode {
    const ino: Inode = { id: this.inodes.length, writes: [], syncs: [] };
    this.inodes.push(ino);
    return ino;
  }

  /** The inode's bytes with the writes `include` keeps: all of a write, some of its sectors, or none. */
  private content(ino: Inode, include: (w: Inode['writes'][number]) => 'all' | readonly boolean[] | null): Buffer {
    let out = Buffer.alloc(0);
    for (const w of ino.writes) {
      const mask = include(w);
      if (mask === null) continue;
      const end = w.offset + w.data.length;
      if (end > out.length) {
        // A file grows by its size as soon as a write lands; sectors never written read as zeros.
        const grown = Buffer.alloc(end);
        out.copy(grown);
        out = grown;
      }
      if (mask === 'all') {
        w.data.copy(out, w.offset);
        continue;
      }
      for (let i = 0, k = 0; i < w.data.length; i += 512, k++) if (mask[k] === true) w.data.copy(out, w.offset + i, i, Math.min(i + 512, w.data.length));
    }
    return out;
  }

  async readFile(file: string): Promise<Buffer | null> {
    const id = this.names.get(file);
    if (id === undefined) return null;
    return this.content(this.inodes[id] as Inode, () => 'all');
  }

  async create(file: string): Promise<CbtStateHandle> {
    const ino = this.newInode();
    this.names.set(file, ino.id);
    this.nameOps.push({ seq: this.clock.tick(), kind: 'link', name: file, inode: ino.id });
    return this.handle(ino);
  }

  async openForWrite(file: string, _options?: { readonly dsync?: boolean }): Promise<CbtStateHandle> {
    const id = this.names.get(file);
    if (id === undefined) throw Object.assign(new Error(`ENOENT: ${file}`), { code: 'ENOENT' });
    return this.handle(this.inodes[id] as Inode);
  }

  private handle(ino: Inode): CbtStateHandle {
    const clock = this.clock;
    return {
      write: async (data, position) => {
        ino.writes.push({ seq: clock.tick(), offset: position, data: Buffer.from(data) });
      },
      sync: async () => {
        ino.syncs.push(clock.tick());
      },
      writeDurable: async (data, position) => {
        ino.writes.push({ seq: clock.tick(), offset: position, data: Buffer.from(data) });
        ino.syncs.push(clock.tick());
      },
      close: async () => {},
    };
  }

  async rename(from: string, to: string): Promise<void> {
    const id = this.names.get(from);
    if (id === undefined) throw Object.assign(new Error(`ENOENT: ${from}`), { code: 'ENOENT' });
    const seq = this.clock.tick();
    this.names.delete(from);
    this.names.set(to, id);
    this.nameOps.push({ seq, kind: 'unlink', name: from }, { seq, kind: 'link', name: to, inode: id });
  }

  async unlink(file: string): Promise<void> {
    if (!this.names.has(file)) return;
    this.names.delete(file);
    this.nameOps.push({ seq: this.clock.tick(), kind: 'unlink', name: file });
  }

  async syncDir(_dir: string): Promise<void> {
    this.dirSyncs.push(this.clock.tick());
  }

  /**
   * The files a power cut just before op `cut` could leave, chosen with `chance`: directory
   * changes synced before the cut, then a random in-order prefix of the later ones; each file's
   * writes synced before the cut, then any subset of the later writes' sectors.
   */
  crashImage(cut: number, chance: Chance): Map<string, Buffer> {
    const lastDirSync = Math.max(...this.dirSyncs.filter((s) => s < cut));
    const before = this.nameOps.filter((o) => o.seq < cut);
    const durable = before.filter((o) => o.seq <= lastDirSync);
    const pending = before.filter((o) => o.seq > lastDirSync);
    // Keep a rename's unlink and link together: cut only between ops of different numbers.
    let keep = Math.floor(chance() * (pending.length + 1));
    while (keep > 0 && keep < pending.length && (pending[keep] as NameOp).seq === (pending[keep - 1] as NameOp).seq) keep++;
    const names = new Map<string, number>();
    for (const o of [...durable, ...pending.slice(0, keep)]) {
      if (o.kind === 'link') names.set(o.name, o.inode);
      else names.delete(o.name);
    }
    const out = new Map<string, Buffer>();
    for (const [name, id] of names) {
      const ino = this.inodes[id] as Inode;
      const lastSync = Math.max(-1, ...ino.syncs.filter((s) => s < cut));
      out.set(
        name,
        this.content(ino, (w) => {
          if (w.seq >= cut) return null;
          if (w.seq <= lastSync) return 'all';
          const mask: boolean[] = [];
          for (let i = 0; i < w.data.length; i += 512) mask.push(chance() < 0.5);
          return mask;
        }),
      );
    }
    return out;
  }

  /** Every file and its current content (for a clean comparison or a copy). */
  files(): Map<string, Buffer> {
    const out = new Map<string, Buffer>();
    for (const [name, id] of this.names) out.set(name, this.content(this.inodes[id] as Inode, () => 'all'));
    return out;
  }
}
