import type { Disk } from '@blkfilter/bio';
import type { BackupSource } from './repository.js';

export declare const CLUSTER: number;
export declare function content(k: number, size: number): Buffer;
export declare function source(k: number, size: number, name?: string): { disk: Disk; ready: Promise<void>; source: BackupSource };
