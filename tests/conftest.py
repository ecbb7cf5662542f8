from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from erasekit.testing import make_checkpoint


@pytest.fixture(autouse=True)
def _isolated_user_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches the real user's cache or config."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.delenv("ERASEKIT_DEBUG", raising=False)


def ckpt_path(root: Path, layout: str, name: str = "base") -> Path:
    if layout.startswith(("diffusers", "transformers")):
        return root / name
    return root / f"{name}.ckpt" if layout.startswith("ckpt") else root / f"{name}.safetensors"


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of the file), ignoring erasekit's undo journal."""
    path = Path(path)
    files = (
        [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file() and ".erasekit" not in p.parts]
    )
    return {
        str(p.relative_to(path) if path.is_dir() else p.name): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


@pytest.fixture
def sd1(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny SD1.x single-file checkpoint and an edited copy (FFN of layer 1 changed)."""
    base = make_checkpoint(tmp_path / "base.safetensors", "single-sd1", "F16")
    edited = make_checkpoint(tmp_path / "edited.safetensors", "single-sd1", "F16", edit_layers=[1])
    return base, edited


@pytest.fixture
def sd1_patch(tmp_path: Path, sd1: tuple[Path, Path]) -> Path:
    from erasekit.checkpoints.diff import diff_checkpoints

    out = tmp_path / "edit.erasepatch"
    diff_checkpoints(*sd1, output=out, title="layer-1 edit")
    return out
