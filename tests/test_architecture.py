"""The tree is the stack: no import circle, no import of a higher layer (vstore.testing.imports reads the graph)."""

from __future__ import annotations

from pathlib import Path

from vstore.testing import imports

ROOT = Path(__file__).resolve().parent.parent


def test_no_import_circle() -> None:
    assert imports.cycles(imports.graph(ROOT)) == []


def test_no_module_imports_a_higher_layer() -> None:
    assert imports.upward(imports.graph(ROOT)) == []


def test_every_module_is_in_a_layer() -> None:
    for name in imports.modules(ROOT):
        imports.layer_of(name)  # raises for a module no layer names


def _tree(tmp: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for root in imports.ROOTS:
        (tmp / root).mkdir(exist_ok=True)
    return tmp


def test_the_reader_finds_circles_of_every_kind(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "vstore/__init__.py": "",
        "vstore/stack/__init__.py": "",
        # a circle through an import inside a function and one under TYPE_CHECKING
        "vstore/stack/a.py": "def f():\n    from vstore.stack import b\n",
        "vstore/stack/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                             "    from vstore.stack.a import f\n",
        # a circle through a package's __init__ and a "module:function" string
        "vstore/raid/__init__.py": "from vstore.raid import c\n",
        "vstore/raid/c.py": "X = 1\n",
        "vstore/pool/__init__.py": "",
        "vstore/pool/d.py": "OPENER = 'vstore.pool.e:open'\n",
        "vstore/pool/e.py": "import vstore.pool.d\n",
    })
    found = imports.cycles(imports.graph(root))
    assert ["vstore.stack.a", "vstore.stack.b"] in found
    assert ["vstore.pool.d", "vstore.pool.e"] in found
    assert not any("vstore.raid" in c for c in found)  # a package importing its own child


def test_the_reader_finds_upward_imports(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "vstore/__init__.py": "",
        "vstore/stack/__init__.py": "",
        "vstore/stack/low.py": "def f():\n    import vstore.pool.high\n",
        "vstore/pool/__init__.py": "",
        "vstore/pool/high.py": "from vstore.stack.low import f\n",
    })
    edges = imports.graph(root)
    assert imports.upward(edges) == [("vstore.stack.low", "vstore.pool"),
                                     ("vstore.stack.low", "vstore.pool.high")]
