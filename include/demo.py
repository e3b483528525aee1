"""The demo deployment's inputs: a tiny generated base model and a local "training box" with two checkpoints.

Used by ``scripts/demo.sh`` (the main job) and by the tests. Generated once per home directory; a
second call returns at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
# Two adapter versions dated on two days, the second the newest.
CHECKPOINTS = {"checkpoint-10": (1, 1_793_491_200), "checkpoint-20": (2, 1_793_577_600)}


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo's inputs and outputs live under one home."""

    home: Path

    @property
    def base(self) -> Path:
        """The generated base model."""
        return self.home / "demo" / "base"

    @property
    def training_box(self) -> Path:
        """The directory that stands for the training box (holds checkpoint-* dirs)."""
        return self.home / "demo" / "training-box"

    @property
    def lmstudio_models(self) -> Path:
        """The demo's LM Studio models directory."""
        return self.home / "demo" / "lmstudio" / "models"

    @property
    def artifacts(self) -> Path:
        """The artifact store root."""
        return self.home / "artifacts"


def prepare_demo(home: Path) -> DemoPaths:
    """Generate the base model and the checkpoints under ``home`` unless they already exist."""
    paths = DemoPaths(Path(home))
    marker = paths.home / "demo" / ".generated"
    if marker.is_file() and marker.read_text().strip() == GENERATOR_VERSION:
        return paths
    from include.tiny_model import make_base_model, make_lora_adapter

    log.info("generating the demo model under %s", paths.home / "demo")
    make_base_model(paths.base)
    shutil.rmtree(paths.training_box, ignore_errors=True)
    for name, (seed, mtime) in CHECKPOINTS.items():
        checkpoint = make_lora_adapter(paths.base, paths.training_box / name, seed=seed)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": int(name.split("-")[1])}) + "\n")
        os.utime(checkpoint, (mtime, mtime))
    marker.write_text(GENERATOR_VERSION + "\n")
    return paths
