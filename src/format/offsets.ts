/**
 * Three number spaces that must not mix: guest offsets (bytes of the
 * virtual disk), host offsets (bytes of the image file or data file) and
 * cluster indices (host offset / cluster size, what refcounts are kept by).
 * Branded so that the type checker refuses one where another is meant;
 * they are plain numbers at run time.
 */

export type GuestOffset = number & { readonly __guest: unique symbol };
export type HostOffset = number & { readonly __host: unique symbol };
export type ClusterIndex = number & { readonly __cluster: unique symbol };

export const guest = (n: number): GuestOffset => n as GuestOffset;
export const host = (n: number): HostOffset => n as HostOffset;
export const cluster = (n: number): ClusterIndex => n as ClusterIndex;

/** The cluster holding host byte `h`. */
export function clusterOf(h: HostOffset, clusterSize: number): ClusterIndex {
  return Math.floor(h / clusterSize) as ClusterIndex;
}

/** The first host byte of cluster `c`. */
export function hostOf(c: ClusterIndex, clusterSize: number): HostOffset {
  return (c * clusterSize) as HostOffset;
}
