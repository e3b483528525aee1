"""Generate a peft LoRA adapter (r=16, all linear layers, float32, non-zero B) for a generated base model.

    .venv/bin/python bench/scale/make_adapter.py BASE_DIR OUT_DIR [--seed N] [--rank 16]

The adapter targets q/k/v/o and gate/up/down of every decoder layer (peft's ``all-linear`` for these
architectures), reads the shapes from the base's safetensors headers and writes ``adapter_config.json`` +
``adapter_model.safetensors`` the way ``save_pretrained`` does. A different ``seed`` is a different adapter: the
nightly-runs benchmark deploys one per run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from include.merge.safetensors_io import TensorSpec, list_model_tensors  # noqa: E402
from include.merge.writer import ShardedWriter  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(base: Path, out: Path, *, seed: int = 1, rank: int = 16, alpha: int = 32) -> Path:
    """Write the adapter to ``out`` (replaced if present); returns ``out``."""
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, info in sorted(list_model_tensors(Path(base)).items()):
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in TARGETS:
            rows, cols = info.shape
            shapes[f"base_model.model.{module}.lora_A.weight"] = (rank, cols)
            shapes[f"base_model.model.{module}.lora_B.weight"] = (rows, rank)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = [TensorSpec(name, "F32", dims) for name, dims in shapes.items()]
    with ShardedWriter(tmp, specs, max_shard_bytes=1 << 40, fsync=False) as writer:
        for spec in specs:
            writer.write(spec.name, (rng.standard_normal(spec.shape, dtype=np.float32) * 0.01))
    (tmp / "model.safetensors").rename(tmp / "adapter_model.safetensors")
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(TARGETS), "bias": "none", "base_model_name_or_path": str(base),
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
    }, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    """Command line: generate one adapter."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    print(make_adapter(args.base, args.out, seed=args.seed, rank=args.rank))


if __name__ == "__main__":
    main()
