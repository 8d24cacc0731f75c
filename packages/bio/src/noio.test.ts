import { afterEach, describe, expect, it } from 'vitest';
import { Bio } from './bio.js';
import { MemoryBackend } from './backends/memory.js';
import { createDiskSync, type Disk } from './device.js';
import { bioNeedsNoio, inNoioScope, memallocNoioRestore, memallocNoioSave, withNoio } from './noio.js';
import { ReqFlag } from './op.js';

const disks: Disk[] = [];
afterEach(async () => {
  for (const d of disks.splice(0)) await d.remove();
});

describe('no-I/O scope', () => {
  it('nests and restores', () => {
    expect(inNoioScope()).toBe(false);
    const outer = memallocNoioSave();
    const inner = memallocNoioSave();
    expect(inNoioScope()).toBe(true);
    memallocNoioRestore(inner);
    expect(inNoioScope()).toBe(true);
    memallocNoioRestore(outer);
    expect(inNoioScope()).toBe(false);
    expect(withNoio(() => inNoioScope())).toBe(true);
    expect(() => withNoio(() => { throw new Error('x'); })).toThrow('x');
    expect(inNoioScope()).toBe(false);
  });

  it('follows swap bios and swap devices', () => {
    const d = createDiskSync({ name: 'noio0', backend: new MemoryBackend({ sizeBytes: 1 << 20 }) });
    disks.push(d);
    const plain = Bio.write(d.part0, 0, Buffer.alloc(512));
    expect(bioNeedsNoio(plain)).toBe(false);
    expect(bioNeedsNoio(Bio.write(d.part0, 0, Buffer.alloc(512), ReqFlag.SWAP))).toBe(true);
    expect(withNoio(() => bioNeedsNoio(plain))).toBe(true);
    d.part0.swap = true;
    expect(bioNeedsNoio(plain)).toBe(true);
  });
});
