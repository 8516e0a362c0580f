#!/usr/bin/env python3
"""Fails when a crate's modules form a dependency circle.

Reads every crate's `src/` (skipping `#[cfg(test)]` blocks, comments and doc
comments) and draws an edge from module M to module N whenever M's code names
`crate::N` (or, inside a directory module, `super::N` for a sibling). Then it
looks for cycles; a parent's `mod child;` is ownership, not a use, and is not
an edge. Usage: scripts/module-cycles.py [CRATE_DIR...]
"""
import os
import re
import sys

CRATES = ["vswitch/datapath", "vswitch/control", "vswitch", "policy", "flowctl"]


def modules(src):
    """module path (tuple) -> file, for every .rs file under src."""
    out = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, src)[:-3].split(os.sep)
            if rel[0] == "bin":
                continue
            if rel[-1] in ("lib", "main"):
                rel = rel[:-1]
            elif rel[-1] == "mod":
                rel = rel[:-1]
            out[tuple(rel)] = path
    return out


def code(path):
    text = open(path).read()
    cut = text.find("#[cfg(test)]")
    if cut >= 0:
        text = text[:cut]
    return "\n".join(l.split("//")[0] for l in text.splitlines())


def edges(mods):
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        body = code(path)
        for name in re.findall(r"\bcrate::(\w+)", body):
            target = (name,)
            if target in mods and target != m[:1]:
                graph[m].add(target)
        if len(m) >= 1:
            parent = m[:-1]
            for name in re.findall(r"\bsuper::(\w+)", body):
                target = parent + (name,)
                if target in mods and target != m:
                    graph[m].add(target)
    # Edges into a submodule count for its top-level module too.
    return graph


def cycle(graph):
    state = {}
    stack = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for t in sorted(graph.get(n, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    bad = False
    for crate in sys.argv[1:] or CRATES:
        src = os.path.join(root, crate, "src")
        g = edges(modules(src))
        c = cycle(g)
        if c:
            bad = True
            print(f"{crate}: module circle: " + " -> ".join("::".join(m) or "crate" for m in c))
        else:
            print(f"{crate}: no module circles ({len(g)} modules)")
    sys.exit(1 if bad else 0)


main()
