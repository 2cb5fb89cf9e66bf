"""The import layering of docs/architecture.md, checked on the source with ``ast``.

Each library package may import only the project packages listed for it; no library module
imports Hydra or OmegaConf (only the entry points turn config into objects), nothing imports
``transformers`` (our top-level ``tokenizers/`` shadows its dependency), and nobody writes
``import eval`` (which shadows the builtin).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("gen", "samplers", "tokenizers", "eval", "distill")

# module prefix -> project module prefixes it may import (itself always allowed).
ALLOWED: dict[str, tuple[str, ...]] = {
    "gen.utils": (),
    "gen.nn": ("gen.utils",),
    "gen.paths": ("gen.utils",),
    "gen.models": ("gen.nn", "gen.utils", "gen.paths"),
    "gen.objectives": ("gen.paths", "gen.models", "gen.nn", "gen.utils"),
    "gen.ema": ("gen.utils",),
    "gen.snapshot": ("gen.utils",),
    "gen.averaging": ("gen.ema", "gen.snapshot", "gen.utils"),
    "gen.data": ("gen.utils",),
    "gen.train": ("gen.objectives", "gen.ema", "gen.data", "gen.utils", "gen.paths", "gen.models", "gen.nn",
                  "gen.snapshot"),
    "tokenizers": ("gen.nn", "gen.utils", "gen.data"),
    "samplers": ("gen.paths", "gen.utils"),
    "eval": ("samplers", "tokenizers", "gen.models", "gen.paths", "gen.data", "gen.utils", "gen.nn", "gen.snapshot"),
    "distill": ("gen", "samplers", "tokenizers"),
}
FORBIDDEN_EXTERNAL = ("hydra", "omegaconf", "transformers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the package
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, node.lineno))
    return found


def _rule_for(module: str) -> str | None:
    best = None
    for prefix in ALLOWED:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return best


def _library_files() -> list[Path]:
    files = []
    for pkg in PROJECT:
        files += sorted((ROOT / pkg).rglob("*.py"))
    return files


def _is_project(name: str) -> bool:
    return name.split(".")[0] in PROJECT


def _violations() -> list[str]:
    bad = []
    for path in _library_files():
        module = _module_name(path)
        rule = _rule_for(module)
        for name, line in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if name.split(".")[0] in FORBIDDEN_EXTERNAL:
                bad.append(f"{where} imports {name} (library code must not)")
            if name == "eval":
                bad.append(f"{where} uses 'import eval' (write 'from eval import x')")
            if not _is_project(name) or rule is None:
                continue
            own = rule
            allowed = ALLOWED[rule]
            if name == own or name.startswith(own + ".") or any(name == a or name.startswith(a + ".") for a in allowed):
                continue
            # A package's __init__ may be imported by a submodule-only rule ("gen" itself is empty).
            if name == "gen":
                continue
            bad.append(f"{where}: {module} may not import {name}")
    return bad


def test_every_library_module_has_a_layer() -> None:
    missing = [str(p.relative_to(ROOT)) for p in _library_files() if _rule_for(_module_name(p)) is None
               and _module_name(p) != "gen"]
    assert not missing, f"modules outside every layer rule (add them to ALLOWED): {missing}"


def test_import_layering() -> None:
    bad = _violations()
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_gen_never_imports_samplers() -> None:
    """Samplers sit above the library core: no module of ``gen`` may import them (the pipeline that joins the
    two lives beside the entry points)."""
    for prefix, allowed in ALLOWED.items():
        if prefix.startswith("gen"):
            assert not any(a == "samplers" or a.startswith("samplers.") for a in allowed), prefix
    assert not any(b for b in _violations() if "gen/" in b and "samplers" in b)


def test_checker_catches_a_violation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself must flag a forbidden edge (guards against a checker that passes everything)."""
    fake_root = tmp_path
    (fake_root / "samplers").mkdir()
    (fake_root / "samplers" / "bad.py").write_text("from gen.objectives import x\nimport hydra\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    bad = _violations()
    assert any("may not import gen.objectives" in b for b in bad)
    assert any("imports hydra" in b for b in bad)


def test_every_package_is_checked() -> None:
    """Every top-level Python package of the repository is a checked layer (a new one must join PROJECT)."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench", "scripts"}
    assert packages <= set(PROJECT), f"packages outside the layering rules: {sorted(packages - set(PROJECT))}"


def test_pipeline_only_reexports_checked_layers() -> None:
    """pipeline.py (beside the entry points) defines nothing: the sampler spec and solver call live in samplers.spec,
    the generator in eval.generator, the snapshot loader in gen.snapshot, all checked above."""
    tree = ast.parse((ROOT / "pipeline.py").read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    assert not defined, f"pipeline.py defines {defined}; put them in a checked package"
    sources = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module != "__future__"}
    assert sources and all(_is_project(m) for m in sources), sources


def test_tokenizers_never_import_training() -> None:
    """Tokenizer training lives in gen.train; the tokenizers package stays below it."""
    for path in sorted((ROOT / "tokenizers").rglob("*.py")):
        assert not [n for n, _ in _imports(path) if n.startswith("gen.train")], path
