"""vstore's import graph, read from the source: which module imports which, its circles, and imports against the layers.

The layers, lowest first (README "Architecture"); a module may import its own
layer and those below, never one above::

    errors, sizes            what everything shares
    io, uri, owner           I/O engines and concurrency, member URIs, who owns storage
    stack                    the block-device interface and the layers that need no RAID
    backends                 member devices: local files, memory, NFS, iSCSI
    raid                     layouts and their kernels
    consistency              on-member metadata, journal, write-intent bitmap
    ops                      rebuild, move, scrub and what they share
    pool                     a pool: its members, stack, consistency, volumes, commands
    fuse_mount               the FUSE front end and the mount daemon
    testing                  fault devices, crash simulation, torture, test servers
    cli                      the command line

Every import counts: at module level, inside a function, under TYPE_CHECKING, and
a module named in a ``"module:function"`` string; importing ``a.b.c`` from outside ``a.b``
also runs ``a.b``'s ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOTS = ("vstore", "backends", "fuse_mount")

LAYERS: tuple[tuple[str, ...], ...] = (
    ("vstore", "vstore.errors", "vstore.sizes"),
    ("vstore.io", "vstore.uri", "vstore.owner", "vstore.cluster"),
    ("vstore.stack",),
    ("backends",),
    ("vstore.raid",),
    ("vstore.consistency",),
    ("vstore.ops",),
    ("vstore.pool",),
    ("fuse_mount",),
    ("vstore.testing",),
    ("vstore.cli",),
)


def modules(base: Path) -> dict[str, Path]:
    """Every module of the three packages under base, by dotted name."""
    out: dict[str, Path] = {}
    for root in ROOTS:
        for p in sorted((base / root).rglob("*.py")):
            parts = list(p.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def graph(base: Path) -> dict[str, set[str]]:
    """module -> the modules it imports (within the three packages)."""
    mods = modules(base)
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = pkg.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    mod = ".".join(parts + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod
                           for a in node.names]
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and ":" in node.value and node.value.split(":")[0] in mods):
                targets = [node.value.split(":")[0]]  # "module:function", loaded by name
            for t in targets:
                r = _resolve(t, mods)
                if r is None:
                    continue
                found.add(r)
                # Importing a.b.c from outside a.b runs a.b's __init__ (and a's) first.
                found.update(p for p in _parents(r) if p in mods and not name.startswith(p + ".")
                             and p != name)
        found.discard(name)
        edges[name] = found
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        # Iterative Tarjan (the graph is small, but recursion limits are not ours to set).
        work = [(v, iter(sorted(edges[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            advanced = False
            for w in it:
                if w not in edges:
                    continue
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    advanced = True
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    group.append(w)
                    if w == node:
                        break
                if len(group) > 1:
                    out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    """The index in LAYERS of the module's layer (the longest matching prefix)."""
    best, rank = -1, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, rank = len(n), i
    if rank < 0:
        raise ValueError(f"{module} is in no layer")
    return rank


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports of a module from a higher layer: (importer, imported)."""
    return sorted((a, b) for a, targets in edges.items() for b in targets
                  if layer_of(b) > layer_of(a))


def main() -> None:
    """Print the circles and upward imports of the tree this file is in."""
    base = Path(__file__).resolve().parents[2]
    edges = graph(base)
    for c in cycles(edges):
        print("circle:", " <-> ".join(c))
    for a, b in upward(edges):
        print(f"upward: {a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})")


if __name__ == "__main__":
    main()
