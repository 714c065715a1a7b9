/**
 * `info`: the facts `qemu-img info` reports, with its JSON field names.
 * Key order follows QEMU 7.2's output so that diffs against it stay small.
 */

import { AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2 } from '../format/features.ts';
import { BME_FLAG_AUTO, BME_FLAG_IN_USE } from '../format/bitmaps.ts';
import { snapshotExact, type SnapshotEntry } from '../format/snapshot.ts';
import { Qcow2Layer } from './qcow2-layer.ts';
import { RawLayer } from './raw-layer.ts';
import { combinePath } from './open.ts';
import type { Layer } from './layer.ts';

/** A snapshot as `qemu-img info` shows it; a 64-bit value past 2^53 is a bigint (exact), as QEMU prints int64s. */
export interface SnapshotInfo {
  icount?: number | bigint;
  'vm-clock-nsec': number;
  name: string;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number | bigint;
  id: string;
  'vm-state-size': number | bigint;
}

/** QEMU's int64 view of a stored 64-bit value, as a number where that is exact. */
function int64(v: bigint): number | bigint {
  const s = BigInt.asIntN(64, v);
  return s >= BigInt(Number.MIN_SAFE_INTEGER) && s <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(s) : s;
}

export interface Qcow2SpecificInfo {
  compat: '0.10' | '1.1';
  'compression-type': 'zlib' | 'zstd';
  'lazy-refcounts'?: boolean;
  bitmaps?: { flags: string[]; name: string; granularity: number }[];
  'refcount-bits': number;
  'data-file'?: string;
  'data-file-raw'?: boolean;
  corrupt?: boolean;
  'extended-l2'?: boolean;
}

export interface ImageInfo {
  'backing-filename-format'?: string;
  snapshots?: SnapshotInfo[];
  'virtual-size': number;
  filename: string;
  'cluster-size'?: number;
  format: string;
  'actual-size'?: number;
  'format-specific'?: { type: 'qcow2'; data: Qcow2SpecificInfo };
  'full-backing-filename'?: string;
  'backing-filename'?: string;
  'dirty-flag': boolean;
}

export function snapshotInfo(s: SnapshotEntry): SnapshotInfo {
  const x = snapshotExact(s);
  const o: SnapshotInfo = {
    'vm-clock-nsec': Number(x.vmClockNsec % 1_000_000_000n),
    name: s.name,
    'date-sec': s.dateSec,
    'date-nsec': s.dateNsec,
    'vm-clock-sec': int64(x.vmClockNsec / 1_000_000_000n),
    id: s.id,
    'vm-state-size': int64(x.vmStateSize),
  };
  return x.icount !== undefined ? { icount: int64(x.icount), ...o } : o;
}

export async function imageInfo(layer: Layer): Promise<ImageInfo> {
  if (layer instanceof RawLayer) {
    const actual = await layer.dev.allocatedBytes();
    return {
      'virtual-size': layer.size,
      filename: layer.filename,
      format: 'raw',
      ...(actual !== undefined ? { 'actual-size': actual } : {}),
      'dirty-flag': false,
    };
  }
  const q = layer as Qcow2Layer;
  const h = q.header;
  const p = q.parsed;
  // Assigned key by key in QEMU's output order.
  const info = {} as ImageInfo;
  if (p.backingFormat !== undefined) info['backing-filename-format'] = p.backingFormat;
  if (q.snapshots.length > 0) info.snapshots = q.snapshots.map(snapshotInfo);
  info['virtual-size'] = q.size;
  info.filename = q.filename;
  info['cluster-size'] = q.geometry.clusterSize;
  info.format = 'qcow2';
  const actual = await q.dev.allocatedBytes();
  if (actual !== undefined) info['actual-size'] = actual;
  const d: Qcow2SpecificInfo = {
    compat: h.version === 2 ? '0.10' : '1.1',
    'compression-type': h.compressionType === 1 ? 'zstd' : 'zlib',
    'refcount-bits': q.geometry.refcountBits,
  };
  if (h.version === 3) {
    // Built in QEMU's key order; refcount-bits is assigned again below to keep its place.
    const spec = {
      compat: d.compat,
      'compression-type': d['compression-type'],
      'lazy-refcounts': (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n,
    } as Qcow2SpecificInfo;
    const bitmaps = await q.bitmapDirectory();
    if (bitmaps.length > 0) {
      spec.bitmaps = bitmaps.map((b) => ({
        flags: [...(b.flags & BME_FLAG_IN_USE ? ['in-use'] : []), ...(b.flags & BME_FLAG_AUTO ? ['auto'] : [])],
        name: b.name,
        granularity: 2 ** b.granularityBits,
      }));
    }
    spec['refcount-bits'] = d['refcount-bits'];
    if (p.dataFile !== undefined) {
      spec['data-file'] = p.dataFile;
      spec['data-file-raw'] = (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
    }
    spec.corrupt = (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
    spec['extended-l2'] = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    info['format-specific'] = { type: 'qcow2', data: spec };
  } else {
    info['format-specific'] = { type: 'qcow2', data: d };
  }
  if (p.backingFile !== undefined) {
    info['full-backing-filename'] = combinePath(q.filename, p.backingFile);
    info['backing-filename'] = p.backingFile;
  }
  // v2 has no dirty bit; QEMU reports false.
  info['dirty-flag'] = (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
  return info;
}

/** QEMU's JSON pretty printer: four-space indent, empty arrays split over two lines. */
export function qemuJson(v: unknown, indent = 0): string {
  const pad = ' '.repeat(indent + 4);
  const end = ' '.repeat(indent);
  if (Array.isArray(v)) {
    if (v.length === 0) return `[\n${end}]`;
    return `[\n${v.map((x) => pad + qemuJson(x, indent + 4)).join(',\n')}\n${end}]`;
  }
  if (v !== null && typeof v === 'object') {
    const keys = Object.entries(v).filter(([, x]) => x !== undefined);
    if (keys.length === 0) return '{\n' + end + '}';
    return `{\n${keys.map(([k, x]) => `${pad}${JSON.stringify(k)}: ${qemuJson(x, indent + 4)}`).join(',\n')}\n${end}}`;
  }
  // a 64-bit value past 2^53, printed exactly
  if (typeof v === 'bigint') return v.toString();
  return JSON.stringify(v);
}

/** QEMU's size_to_str(): three significant digits and a binary unit. */
export function sizeToStr(val: number): string {
  const suffixes = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  const scaled = val / (1000 / 1024);
  // frexp exponent: scaled = m * 2^e with m in [0.5, 1)
  const e = scaled === 0 ? 0 : Math.floor(Math.log2(scaled)) + 1;
  const i = Math.max(0, Math.floor((e - 1) / 10));
  const div = 2 ** (i * 10);
  return `${formatG3(val / div)} ${suffixes[i]}B`;
}

/** printf("%0.3g"). */
function formatG3(x: number): string {
  if (x === 0) return '0';
  const exp = Math.floor(Math.log10(Math.abs(x)));
  if (exp < -4 || exp >= 3) {
    const [m, ee] = x.toExponential(2).split('e');
    const mant = m!.replace(/\.?0+$/, '');
    const n = Number(ee);
    return `${mant}e${n < 0 ? '-' : '+'}${String(Math.abs(n)).padStart(2, '0')}`;
  }
  let s = x.toPrecision(3);
  if (s.includes('.')) s = s.replace(/\.?0+$/, '');
  return s;
}

function pad2(n: number | bigint): string {
  return String(n).padStart(2, '0');
}

/** One line of QEMU's snapshot list (bdrv_snapshot_dump), or the heading. */
export function snapshotLine(s?: SnapshotEntry): string {
  if (!s) return `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`;
  const t = new Date(s.dateSec * 1000);
  const date = `${t.getFullYear()}-${pad2(t.getMonth() + 1)}-${pad2(t.getDate())} ${pad2(t.getHours())}:${pad2(t.getMinutes())}:${pad2(t.getSeconds())}`;
  const x = snapshotExact(s);
  const secs = x.vmClockNsec / 1_000_000_000n;
  const clock = `${pad2(secs / 3600n)}:${pad2((secs / 60n) % 60n)}:${pad2(secs % 60n)}.${String((x.vmClockNsec / 1_000_000n) % 1000n).padStart(3, '0')}`;
  const icount = x.icount !== undefined ? String(BigInt.asIntN(64, x.icount)) : '';
  return `${s.id.padEnd(9)} ${s.name.padEnd(16)} ${sizeToStr(s.vmStateSize).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`;
}

/** The human `qemu-img info` text for one image. */
export function formatInfoHuman(info: ImageInfo, snapshots: readonly SnapshotEntry[]): string {
  const lines: string[] = [];
  lines.push(`image: ${info.filename}`);
  lines.push(`file format: ${info.format}`);
  lines.push(`virtual size: ${sizeToStr(info['virtual-size'])} (${info['virtual-size']} bytes)`);
  lines.push(`disk size: ${info['actual-size'] !== undefined ? sizeToStr(info['actual-size']) : 'unavailable'}`);
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${info['cluster-size']}`);
  if (info['backing-filename'] !== undefined) {
    const full = info['full-backing-filename'];
    lines.push(`backing file: ${info['backing-filename']}${full !== undefined && full !== info['backing-filename'] ? ` (actual path: ${full})` : ''}`);
  }
  if (info['backing-filename-format'] !== undefined) lines.push(`backing file format: ${info['backing-filename-format']}`);
  if (info['dirty-flag']) lines.push('cleanly shut down: no');
  if (snapshots.length > 0) {
    lines.push('Snapshot list:');
    lines.push(snapshotLine());
    for (const s of snapshots) lines.push(snapshotLine(s));
  }
  const fs = info['format-specific'];
  if (fs) {
    lines.push('Format specific information:');
    dumpHuman(fs.data, 1, lines);
  }
  return lines.join('\n') + '\n';
}

function dumpHuman(v: unknown, level: number, out: string[]): void {
  const pad = '    '.repeat(level);
  for (const [k, x] of Object.entries(v as object)) {
    if (x === undefined) continue;
    const key = k.replace(/-/g, ' ');
    if (Array.isArray(x)) {
      out.push(`${pad}${key}:`);
      x.forEach((item, i) => {
        if (item !== null && typeof item === 'object') {
          out.push(`${pad}    [${i}]:`);
          dumpHuman(item, level + 2, out);
        } else out.push(`${pad}    [${i}]: ${String(item)}`);
      });
    } else if (x !== null && typeof x === 'object') {
      out.push(`${pad}${key}:`);
      dumpHuman(x, level + 1, out);
    } else out.push(`${pad}${key}: ${String(x)}`);
  }
}
