"""The package's shape: imports flow one way (no module imports one that imports it back), model
families know nothing of checkpoints, quantization, generation, serving or the CLI, and the CLI
answers --help without importing torch; the docs' pictures are small committed PNGs and their links
lead somewhere."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmcli"
MODELS_MAY_IMPORT = ("llmcli.config", "llmcli.errors", "llmcli.models")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The llmcli modules `name` imports anywhere in its file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_there_are_no_import_cycles():
    edges = graph()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(name for name in edges if name in reachable(name))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_model_families_import_only_config_errors_and_each_other():
    bad = {name: sorted(m for m in deps if not m.startswith(MODELS_MAY_IMPORT))
           for name, deps in graph().items() if name.startswith("llmcli.models")}
    assert not any(bad.values()), bad


def test_prune_and_quantize_share_one_measuring_module():
    """What both commands measure (perplexity, decode rounds, agreement) lives in llmcli.measure; neither
    command borrows from the other's module."""
    edges = graph()
    assert "llmcli.quantize.command" not in edges["llmcli.prune.command"]
    assert "llmcli.prune.command" not in edges["llmcli.quantize.command"]
    assert "llmcli.measure" in edges["llmcli.prune.command"] & edges["llmcli.quantize.command"]


def test_package_init_files_import_nothing():
    """So importing one module never drags in a whole package (or cycles through its __init__)."""
    for name, path in modules().items():
        if path.name == "__init__.py" and name != "llmcli":
            tree = ast.parse(path.read_text(encoding="utf-8"))
            assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], path


def test_the_cli_imports_no_torch_for_help():
    code = "import sys, llmcli.cli; sys.exit(int(any(m.split('.')[0] == 'torch' for m in sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


DOCS = [PACKAGE.parent / "README.md", *sorted((PACKAGE.parent / "docs").glob("*.md"))]


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # not in code blocks
    return re.findall(r"\]\(([^)\s]+)\)", text)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_docs_pictures_are_committed_small_pngs(read_png):
    """Every image the README and docs/ show is a file of this repository, a real picture, under 100 KB."""
    pictures = [page.parent / name for page in DOCS
                for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text(encoding="utf-8"))]
    assert len(pictures) >= 3
    for path in pictures:
        assert path.is_file() and path.stat().st_size < 100_000, path
        read_png(path, (400, 300))


def test_the_docs_links_lead_somewhere():
    """Every relative link of the README and docs/ names a file of the repository (and a heading of it)."""
    for page in DOCS:
        for link in _links(page):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            name, _, anchor = link.partition("#")
            target = (page.parent / name) if name else page
            assert target.exists(), (page.name, link)
            if anchor:
                headings = re.findall(r"^#+ (.+)$", target.read_text(encoding="utf-8"), flags=re.M)
                assert anchor in {_anchor(h) for h in headings}, (page.name, link)
