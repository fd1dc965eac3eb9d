#!/usr/bin/env python3
"""Import cycles between the library's modules (non-test code), the CI check of the layering.

    python3 scripts/module_cycles.py [SRC_DIR]      # default: src

Reads every `.rs` file under SRC_DIR, maps it to its module path (`src/durable/journal.rs` is
`durable::journal`), and collects the modules each one names: `use crate::…` (with nested
`{…}` groups), `super::…`, and inline `crate::a::b` paths. Test code is left out: a
`#[cfg(test)]` item (`mod tests { … }` or `mod tests;`) and its braces are skipped.

An edge A -> B means A names B (or an item inside B). Names re-exported by `lib.rs` count as their module. A module naming one of its own
ancestors does not count (a child may use its parent: `impl Limiter` in `limiter::reserve`),
nor does a module naming itself. Every strongly connected component of more than one module
is a cycle. Prints each with one edge per line, then `cycles: N`; exits 1 when N > 0.
"""
import os
import re
import sys

SRC = sys.argv[1] if len(sys.argv) > 1 else "src"


def module_of(path):
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] in ("lib", "main", "mod"):
        rel = rel[:-1]
    return tuple(rel)


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return re.sub(r"//[^\n]*", "", text)


def strip_tests(text):
    """Drop `#[cfg(test)]` items: a block in braces or a declaration ending in `;`."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        j = m.end()
        while j < len(text) and text[j] not in "{;":
            j += 1
        if j < len(text) and text[j] == "{":
            depth = 0
            while j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
                if depth == 0:
                    break
        else:
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def expand(tree):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]."""
    tree = tree.strip()
    brace = tree.find("{")
    if brace < 0:
        return [tree.split(" as ")[0].strip()]
    head, body = tree[:brace], tree[brace + 1 : tree.rfind("}")]
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        cur += ch
    parts.append(cur)
    return [head + p for part in parts if part.strip() for p in expand(part)]


def absolute(module, path):
    segs = [s for s in path.split("::") if s]
    if not segs:
        return None
    if segs[0] == "crate":
        return segs[1:]
    base = list(module)
    if segs[0] == "self":
        segs = segs[1:]
    elif segs[0] == "super":
        while segs and segs[0] == "super":
            base = base[:-1]
            segs = segs[1:]
    else:
        return None
    return base + segs


def main():
    files = {}
    for root, _, names in os.walk(SRC):
        for name in names:
            if name.endswith(".rs") and "bin" not in os.path.relpath(root, SRC).split(os.sep):
                path = os.path.join(root, name)
                files[module_of(path)] = strip_tests(strip_comments(open(path).read()))
    modules = set(files)
    # `crate::Limiter` names the module the root re-exports it from.
    reexports = {}
    for m in re.finditer(r"\bpub use\s+([^;]*);", files.get((), "")):
        for path in expand(m.group(1)):
            segs = path.split("::")
            reexports[segs[-1].strip()] = tuple(segs[:-1])
    edges = {}
    for module, text in files.items():
        targets = set()
        for m in re.finditer(r"\buse\s+((?:crate|super|self)::[^;]*);", text, flags=re.S):
            for path in expand(m.group(1)):
                targets.add(tuple(absolute(module, path) or ()))
        for m in re.finditer(r"\b((?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*)+)", text):
            targets.add(tuple(absolute(module, m.group(1)) or ()))
        for target in targets:
            if len(target) >= 1 and target[0] in reexports:
                target = reexports[target[0]] + tuple(target[1:])
            # The longest module prefix of the named path.
            hit = None
            for k in range(len(target), 0, -1):
                if tuple(target[:k]) in modules:
                    hit = tuple(target[:k])
                    break
            if hit is None or hit == module or module[: len(hit)] == hit:
                continue
            edges.setdefault(module, set()).add(hit)
    cycles = sccs(modules, edges)
    for n, comp in enumerate(cycles, 1):
        print(f"cycle {n}: {', '.join(sorted('::'.join(m) for m in comp))}")
        for a in sorted(comp):
            for b in sorted(edges.get(a, ())):
                if b in comp:
                    print(f"    {'::'.join(a)} -> {'::'.join(b)}")
    print(f"cycles: {len(cycles)}")
    return 1 if cycles else 0


def sccs(nodes, edges):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    sys.exit(main())
