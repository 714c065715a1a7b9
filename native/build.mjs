// npm's install step: builds the optional native helper (native/qledger-native.c) with node-gyp
// against the running Node's own headers. Without --nodedir, node-gyp downloads the headers from
// nodejs.org, which an offline machine cannot do and an install may not do (only the npm registry).
// A failed build is not an error: qledger falls back to what Node's fs offers (src/io/native.ts).
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';

// Node's installers (Debian's nodejs, the official tarballs, nvm) put the headers next to the binary
const prefix = dirname(dirname(process.execPath));
const headers = existsSync(join(prefix, 'include', 'node', 'common.gypi')) ? [`--nodedir=${prefix}`] : [];
// npm names its own node-gyp for scripts; otherwise one on the PATH
const gyp = process.env['npm_config_node_gyp'];
const cmd = gyp ? process.execPath : 'node-gyp';
const args = [...(gyp ? [gyp] : []), 'rebuild', ...headers];
const r = spawnSync(cmd, args, { stdio: 'ignore' });
if (r.status !== 0) {
  console.log(`qledger: native helper not built${headers.length ? '' : " (this Node's headers were not found next to it)"}; map falls back to reading file content for holes, and copies go through memory`);
}
