"""Build hook: ship the default model as package data (flight/_models/) in every non-editable build.

Whatever model card in models/ says `default: true` is copied, with every artifact it lists, into the
built package; nothing here names a model file. pyproject.toml holds everything else.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def default_model_files(models_dir: Path = ROOT / "models") -> list[Path]:
    """The default card and the artifacts it lists (an error when there is none, or a file is missing)."""
    for card in sorted(models_dir.glob("*.yaml")):
        raw = yaml.safe_load(card.read_text()) or {}
        if raw.get("default"):
            files = [card] + [models_dir / a["file"] for a in raw.get("artifacts", {}).values()]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise SystemExit(f"default model card {card.name} lists missing artifact(s): {missing}")
            return files
    raise SystemExit(f"no model card with 'default: true' in {models_dir}: cannot ship a default model")


class BuildPyWithModel(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "flight" / "_models"
        dest.mkdir(parents=True, exist_ok=True)
        for f in default_model_files():
            shutil.copy2(f, dest / f.name)


setup(cmdclass={"build_py": BuildPyWithModel})
