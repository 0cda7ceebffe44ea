"""The documentation, checked: every relative link and image in the Markdown pages points at a file (and a
heading, where it names one) that exists, the README stays a page a newcomer reads (under 300 lines), and its
model zoo lists every registered block family and every transformers class amer imports.

Each checker also runs on a deliberately broken page (negative control), so a checker that accepts
everything fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_pages() -> list[Path]:
    pages = [REPO / "README.md", REPO / "ARCHITECTURE.md", REPO / "checkpoints" / "README.md",
             *sorted((REPO / "docs").rglob("*.md"))]
    return [p for p in pages if p.is_file()]


def without_code(text: str) -> str:
    """The page with fenced blocks and code spans blanked (a link written inside code is not a link)."""
    text = FENCE.sub(lambda m: "\n" * m[0].count("\n"), text)
    return CODE_SPAN.sub(lambda m: "x" * len(m[0]), text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: link syntax and code marks dropped, lower case, punctuation other than
    '-' and '_' removed, spaces to '-'."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(text):
        s = slug(m[2])
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(pages: list[Path], root: Path = REPO) -> list[str]:
    """``page: target (why)`` for every relative link or image that points nowhere."""
    bad = []
    for page in pages:
        text = without_code(page.read_text())
        targets = [m[2] for m in LINK.finditer(text)] + [m[1] for m in REF_DEF.finditer(text)]
        for target in targets:
            if not target or SCHEME.match(target) or target.startswith("//"):
                continue  # a web address, checked by nobody here
            path, _, anchor = target.partition("#")
            path = unquote(path.split("?")[0])
            dest = page if not path else (root / path.lstrip("/") if path.startswith("/") else page.parent / path)
            where = f"{page.relative_to(root) if page.is_relative_to(root) else page}: {target}"
            if not dest.exists():
                bad.append(f"{where} (no such file)")
            elif not dest.resolve().is_relative_to(root.resolve()):
                bad.append(f"{where} (outside the repository)")
            elif anchor and dest.suffix == ".md" and dest.is_file() and anchor not in anchors(dest):
                bad.append(f"{where} (no heading '{anchor}')")
    return bad


def test_every_relative_link_and_image_points_at_a_file() -> None:
    pages = doc_pages()
    assert REPO / "README.md" in pages and len(pages) >= 10, [str(p) for p in pages]
    assert broken_links(pages) == []


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# A page\n\n## Its part\n")
    (tmp_path / "img.png").write_bytes(b"")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n\nFine: [a](docs/there.md), [b](docs/there.md#its-part), ![c](img.png), [d](#top), "
        "[e](https://example.org/x), [f](docs/).\n"
        "Broken: [g](docs/missing.md), ![h](missing.png), [i](docs/there.md#nowhere), [j](#nothing), "
        "[k](../outside.md).\n\n[ref]: docs/gone.md\n\n"
        "Not links: `[l](docs/missing.md)`\n\n```bash\n[m](missing.md)\n```\n")
    (tmp_path.parent / "outside.md").write_text("# Outside\n")
    found = broken_links([page], root=tmp_path)
    assert [f.split(": ", 1)[1] for f in found] == [
        "docs/missing.md (no such file)", "missing.png (no such file)", "docs/there.md#nowhere (no heading 'nowhere')",
        "#nothing (no heading 'nothing')", "../outside.md (outside the repository)", "docs/gone.md (no such file)"]


def test_anchors_follow_github() -> None:
    assert slug("Presets (`patterns/*.toml`)") == "presets-patternstoml"
    assert slug("TPU / XLA (torch_xla)") == "tpu--xla-torch_xla"
    assert slug("Memory and speed: fused LM head, activation checkpointing, compilation") == \
        "memory-and-speed-fused-lm-head-activation-checkpointing-compilation"
    assert slug("See [the zoo](x.md)") == "see-the-zoo"


def test_the_readme_is_under_300_lines() -> None:
    n = len((REPO / "README.md").read_text().splitlines())
    assert n < README_MAX_LINES, f"README.md has {n} lines; move reference material into docs/"


def zoo_gaps(readme: str, letters: list[str], classes: list[str]) -> list[str]:
    """Families and importable classes without a row in the README's model zoo section."""
    m = re.search(r"^## Model zoo\n(.*?)(?=^## )", readme, re.S | re.M)
    if m is None:
        return ["README.md has no '## Model zoo' section"]
    section = m[1]
    rows = {c.strip().strip("`") for line in section.splitlines() if line.startswith("|")
            for c in line.strip("|").split("|")[:1]}
    return [f"family {x}" for x in letters if x not in rows] + [f"class {c}" for c in classes if c not in rows]


def test_the_model_zoo_lists_every_family_and_importable_class() -> None:
    from amer.families import letters as family_letters
    from amer.interop import supported_classes

    letters = list(family_letters())
    classes = supported_classes()
    assert set(letters) >= {"A", "M", "E", "R"} and "LlamaForCausalLM" in classes
    readme = (REPO / "README.md").read_text()
    assert zoo_gaps(readme, letters, classes) == []
    # negative control: a zoo without the R row and without one class is caught, and so is a missing section
    cut = "\n".join(line for line in readme.splitlines()
                    if not line.startswith(("| `R` |", "| `Mamba2ForCausalLM` |"))) + "\n"
    assert zoo_gaps(cut, letters, classes) == ["family R", "class Mamba2ForCausalLM"]
    assert zoo_gaps(readme.replace("## Model zoo", "## Zoo"), letters, classes) == [
        "README.md has no '## Model zoo' section"]
