/** The format layer's public face: every on-disk codec and constant, for the package's `format` export. */

export * from './bytes.ts';
export * from './features.ts';
export * from './limits.ts';
export * from './header.ts';
export * from './l1.ts';
export * from './l2.ts';
export * from './refcount.ts';
export * from './snapshot.ts';
export * from './bitmaps.ts';
