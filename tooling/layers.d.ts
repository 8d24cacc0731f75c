export declare const LAYERS: Record<string, number>;
export declare const FOLDERS: Record<string, string>;
export declare const PUBLIC_SUBPATHS: Set<string>;
export declare function forbiddenFor(from: string): string[];
