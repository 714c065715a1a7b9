// The API reference (API.md), generated from the declarations tsc emits
// (their TSDoc comments come from the sources): every name the package's
// entry point exports, its comment, its declaration, and its @example, which
// test/api-reference.test.ts runs.
//
//   node tools/api-reference.mjs [DECLARATIONS_DIR]   writes API.md (default dist/)
//
// The declarations are read as text: tsc's output is regular (one
// declaration per statement, members indented by four spaces), and
// TypeScript 7's compiler has no JavaScript API to walk them with.

import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const DECL = /^export (?:declare )?(?:abstract )?(class|function|interface|type|const|enum) ([A-Za-z0-9_$]+)/;

/** name -> { file, as } from the entry point's export statements. */
function exportsOf(dir) {
  const text = readFileSync(join(dir, 'index.d.ts'), 'utf8');
  const out = [];
  for (const m of text.matchAll(/^export (?:type )?\{([^}]*)\} from '([^']+)';$/gm)) {
    for (const part of m[1].split(',').map((x) => x.trim()).filter(Boolean)) {
      const [name, as] = part.replace(/^type /, '').split(/ as /);
      out.push({ name, as: as ?? name, file: m[2] });
    }
  }
  for (const m of text.matchAll(/^export \* from '([^']+)';$/gm)) out.push({ name: '*', as: '*', file: m[1] });
  for (const m of text.matchAll(/^export \* as (\w+) from '([^']+)';$/gm)) out.push({ name: '* as', as: m[1], file: m[2] });
  return out;
}

/** The top-level declarations of a .d.ts file: name -> { kind, doc, code }. */
function declarations(file) {
  const lines = readFileSync(file, 'utf8').split('\n');
  const found = new Map();
  for (let i = 0; i < lines.length; i++) {
    const m = DECL.exec(lines[i]);
    if (!m) continue;
    // its comment: the /** ... */ block ending on the line before
    let doc = '';
    if (lines[i - 1]?.trim().endsWith('*/')) {
      let s = i - 1;
      while (s > 0 && !lines[s].trim().startsWith('/**')) s--;
      doc = lines.slice(s, i).join('\n');
    }
    // its text: to the end of the statement (braces balanced)
    let depth = 0;
    let e = i;
    for (; e < lines.length; e++) {
      for (const ch of lines[e]) depth += ch === '{' ? 1 : ch === '}' ? -1 : 0;
      if (depth <= 0 && /[;}]\s*$/.test(lines[e])) break;
    }
    // private members are not the API: drop them with their comments
    const kept = [];
    for (const l of lines.slice(i, e + 1)) {
      if (!/^\s+private /.test(l)) {
        kept.push(l);
        continue;
      }
      if (kept.at(-1)?.trim().endsWith('*/')) {
        while (kept.length && !kept.at(-1).trim().startsWith('/**')) kept.pop();
        kept.pop();
      }
    }
    const code = kept.join('\n').replace(/\n\s*\n/g, '\n');
    found.set(m[2], { kind: m[1], doc, code });
    i = e;
  }
  return found;
}

/** A declaration a file re-exports from another (export { X } from './y'), followed to where it is declared. */
function reexported(file, name, depth = 0) {
  if (depth > 8) return undefined;
  const text = readFileSync(file, 'utf8');
  for (const m of text.matchAll(/^export (?:type )?\{([^}]*)\} from '([^']+)';$/gm)) {
    const names = m[1].split(',').map((x) => x.trim().replace(/^type /, ''));
    if (!names.includes(name)) continue;
    const next = resolve(dirname(file), m[2].replace(/\.[jt]s$/, '.d.ts'));
    return declarations(next).get(name) ?? reexported(next, name, depth + 1);
  }
  return undefined;
}

/** A TSDoc comment as Markdown: its text, then its @example as a code block. */
function renderDoc(doc) {
  const body = doc
    .split('\n')
    .map((l) => l.replace(/^\s*\/\*\*\s?/, '').replace(/^\s*\*\/\s*$/, '').replace(/^\s*\*\s?/, '').replace(/\s*\*\/\s*$/, ''))
    .join('\n')
    .trim();
  const at = body.indexOf('@example');
  if (at < 0) return { text: body, example: undefined };
  return { text: body.slice(0, at).trim(), example: body.slice(at + '@example'.length).replace(/^\n/, '').replace(/\s+$/, '') };
}

/** Member comments inside a class or interface, dropped from the code and kept as they are. */
function tidy(code) {
  return code.replace(/^(\s*)\/\*\*([^]*?)\*\//gm, (all, indent, inner) => {
    const one = inner.replace(/\s*\n\s*\*\s?/g, ' ').trim();
    return `${indent}/** ${one} */`;
  });
}

export function generate(dir) {
  const entries = exportsOf(dir);
  const sections = [];
  const seen = new Set();
  for (const { name, as, file } of entries) {
    const path = resolve(dir, file.replace(/\.[jt]s$/, '.d.ts'));
    if (name === '* as') {
      sections.push({ name: as, kind: 'namespace', text: `The on-disk codecs (\`${file.replace(/^\.\//, 'src/').replace(/\.js$/, '.ts').replace(/\/index\.ts$/, '/')}\`): headers, L1/L2 entries, refcounts, snapshots, extensions, as pure functions over bytes.`, code: undefined, example: undefined });
      continue;
    }
    const decls = declarations(path);
    const names = name === '*' ? [...decls.keys()] : [name];
    for (const n of names) {
      const d = decls.get(n) ?? reexported(path, n);
      if (!d) throw new Error(`${n}: no declaration in ${path}`);
      const shown = name === '*' ? n : as;
      if (seen.has(shown)) continue;
      seen.add(shown);
      const { text, example } = renderDoc(d.doc);
      const code = n === shown ? d.code : d.code.replace(new RegExp(`\\b${n}\\b`), `${n} /* exported as ${shown} */`);
      sections.push({ name: shown, kind: d.kind, text, code: tidy(code), example });
    }
  }
  let md = '# API reference\n\n';
  md += 'Generated by `node tools/api-reference.mjs` from the declarations tsc emits (the TSDoc comments of the sources); do not edit by hand. `test/api-reference.test.ts` checks it is current and runs every example.\n\n';
  md += "Everything is exported by the package's entry point: `import { … } from 'qledger'`.\n\n";
  for (const s of sections) md += `- [\`${s.name}\`](#${s.name.toLowerCase()}) (${s.kind})\n`;
  for (const s of sections) {
    md += `\n## ${s.name}\n\n`;
    if (s.text) md += `${s.text}\n\n`;
    if (s.code) md += '```ts\n' + s.code + '\n```\n';
    if (s.example) md += '\nExample:\n\n```js\n' + s.example + '\n```\n';
  }
  return md;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const root = join(dirname(fileURLToPath(import.meta.url)), '..');
  writeFileSync(join(root, 'API.md'), generate(resolve(process.argv[2] ?? join(root, 'dist'))));
}
