"""The package's shape: one installed name, and imports that point down the layers.

Layers, lowest first (docs/architecture.md): model <- fp8 <- comm <- parallel <- dualpipe <- train <- launcher.
A module may import its own layer and any layer below it, never one above, wherever the import sits
(module top or inside a function). Every import of our code goes through `moeforge.`: a bare `import
model` would load a second copy of the module from whatever `model/` is on sys.path.
"""
import ast
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["model", "fp8", "comm", "parallel", "dualpipe", "train", "launcher"]
PACKAGES = [*LAYERS, "conf"]
RANK = {name: i for i, name in enumerate(LAYERS)}


def imported_packages(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, our top-level package it lands in or "" if none) for every import in path."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                here = path.relative_to(ROOT).parent.parts
                base = here[: len(here) - node.level + 1]
                names = [".".join(["moeforge", *base, *([node.module] if node.module else [])])]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "moeforge":
                out.append((node.lineno, name, parts[1] if len(parts) > 1 else ""))
            elif parts[0] in PACKAGES:
                out.append((node.lineno, name, "BARE"))
    return out


def python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if ".venv" not in p.parts)


def test_imports_point_down():
    """Fails on any import from a higher layer, e.g. model/ importing moeforge.train."""
    bad = []
    for path in python_files(*LAYERS):
        layer = path.relative_to(ROOT).parts[0]
        for line, name, target in imported_packages(path):
            if target in RANK and RANK[target] > RANK[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {name} ({target} is above {layer})")
    assert not bad, "imports that point up:\n" + "\n".join(bad)


def test_no_bare_imports_of_our_packages():
    """`from model.moe import MoE` would find a user's model/ first, or load our module twice."""
    bad = [f"{p.relative_to(ROOT)}:{line}: import {name}"
           for p in [*python_files(*PACKAGES, "tests", "bench"), ROOT / "__init__.py"]
           for line, name, target in imported_packages(p) if target == "BARE"]
    assert not bad, "imports without the moeforge. prefix:\n" + "\n".join(bad)


def test_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a relative and an absolute upward import are both found."""
    fake = tmp_path / "model"
    fake.mkdir()
    (fake / "bad.py").write_text("from moeforge.train.data import x\ndef f():\n    from ..launcher import cli\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = imported_packages(fake / "bad.py")
    assert [t for _, _, t in found] == ["train", "launcher"], found


def test_installed_top_level_is_moeforge_only():
    dist = importlib.metadata.distribution("moeforge")
    assert dist.read_text("top_level.txt").split() == ["moeforge"]
    scripts = [ep for ep in dist.entry_points if ep.group == "console_scripts"]
    assert [(ep.name, ep.value) for ep in scripts] == [("moeforge", "moeforge.launcher.cli:main")]


def test_user_train_py_and_model_dir_do_not_shadow_us(tmp_path):
    """A user's script next to their own train.py and model/ (the commonest names in ML repositories)
    imports moeforge, composes a config, builds the model and runs a forward; and the CLI works there."""
    (tmp_path / "train.py").write_text("raise RuntimeError('the user train.py was imported')\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__init__.py").write_text("raise RuntimeError('the user model/ was imported')\n")
    (tmp_path / "launcher.py").write_text("raise RuntimeError('the user launcher.py was imported')\n")
    (tmp_path / "script.py").write_text(textwrap.dedent("""
        import torch
        from moeforge.launcher.config import load_job_config
        from moeforge.model.transformer import Transformer
        from moeforge.train import loop  # noqa: F401  (the trainer and everything it imports)

        cfg = load_job_config(["model=tiny"])
        model = Transformer(cfg.model)
        model.init_weights(seed=0)
        logits, _ = model(torch.zeros(1, 8, dtype=torch.long))
        print("ok", tuple(logits.shape))
    """))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
    moeforge = Path(sys.executable).with_name("moeforge")  # the console script pip installed
    r = subprocess.run([str(moeforge), "plan", "model=tiny"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
