"""Read and validate a peft LoRA adapter without torch: its config, its A/B tensors, the base it was trained on.

Only plain LoRA (``r``, ``lora_alpha``, ``use_rslora``, ``fan_in_fan_out`` on linear layers) is accepted;
adapter features that change the merge math and are not implemented yet raise MergeError instead of
producing a silently wrong merge.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from include.errors import MergeError
from include.safetensors_io import NUMPY_DTYPES, SafetensorsFormatError, TensorInfo, read_header

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# Adapter features this merge does not implement yet (config key -> what it is); the peft LoRA variants
# (fields tagged is_lora_variant in peft 0.21) change the merge math, so they are refused too.
UNSUPPORTED = {
    "use_dora": "DoRA", "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
    "lora_bias": "LoRA bias", "modules_to_save": "fully trained modules", "target_parameters": "LoRA on parameters",
    "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
    "use_qalora": "QA-LoRA",
}
BNB_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit", "-bnb-8bit")


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: its base weight key, the A/B tensors and the merge scale."""

    module: str
    base_key: str
    a: TensorInfo
    b: TensorInfo
    scale: float
    fan_in_fan_out: bool


@dataclass(frozen=True)
class AdapterInfo:
    """A validated plain-LoRA adapter: its config, rank, recorded base model and modules."""

    config: dict[str, Any]
    r: int
    base_model_name_or_path: str | None
    modules: list[LoraModule]


def _unsupported(adapter_dir: Path, feature: str) -> MergeError:
    return MergeError(
        f"adapter {str(adapter_dir)!r} uses {feature}, which the streaming merge does not support yet "
        "(a later release adds it; merging anyway would be silently wrong)",
        fix="merge this adapter with the peft backend (merge.backend: peft), or retrain without this feature",
    )


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise MergeError(
            f"no {ADAPTER_CONFIG} in {str(adapter_dir)!r}",
            fix="point the source at a peft checkpoint dir saved with save_pretrained "
            "(it holds adapter_config.json and adapter_model.safetensors)",
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MergeError(f"{str(path)!r} is not valid JSON: {e}", fix="download the adapter again") from e
    if not isinstance(config, dict):
        raise MergeError(f"{str(path)!r} holds {type(config).__name__}, not a JSON object")
    return config


def inspect_adapter(adapter_dir: Path) -> AdapterInfo:
    """Validate a peft adapter dir as plain LoRA and pair its A/B tensors per module (no tensor data read)."""
    adapter_dir = Path(adapter_dir)
    config = _read_adapter_config(adapter_dir)
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise MergeError(
            f"adapter {str(adapter_dir)!r} has peft_type {peft_type!r}; only LORA adapters are supported",
            fix="train a LoRA adapter (peft LoraConfig), or merge this one with peft's merge_and_unload",
        )
    for key, feature in UNSUPPORTED.items():
        if config.get(key):
            raise _unsupported(adapter_dir, f"{feature} ({key} = {config[key]!r})")
    if config.get("init_lora_weights") == "mica":
        raise _unsupported(adapter_dir, "the MiCA variant (init_lora_weights = 'mica')")
    if config.get("bias", "none") not in (None, "none"):
        raise _unsupported(adapter_dir, f"trained biases (bias = {config['bias']!r})")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise MergeError(f"adapter {str(adapter_dir)!r} has r={r!r}, lora_alpha={alpha!r}",
                         fix="r must be a positive integer and lora_alpha a number")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))

    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise MergeError(
            f"no {ADAPTER_WEIGHTS} in {str(adapter_dir)!r}",
            fix="save the adapter with save_pretrained(safe_serialization=True) (the default); "
            "*.bin adapters are not read",
        )
    try:
        tensors, _ = read_header(weights)
    except SafetensorsFormatError as e:
        raise MergeError(f"adapter weights unreadable: {e.detail}", fix=e.fix or "download the adapter again") from e
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        name = key.removeprefix("base_model.model.")
        match = LORA_KEY.match(name)
        if match is None:
            feature = ("embedding LoRA" if "lora_embedding_" in name else "DoRA" if "lora_magnitude_vector" in name
                       else "trained biases" if name.endswith(".bias") else "non-LoRA weights (modules_to_save?)")
            raise _unsupported(adapter_dir, f"{feature}: tensor {key!r}")
        pairs.setdefault(match["module"], {})[match["ab"]] = info
    modules = []
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise MergeError(f"adapter {str(adapter_dir)!r}: module {module!r} has lora_{next(iter(ab))} only",
                             fix="download the adapter again (its weights are incomplete)")
        a, b = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise _unsupported(adapter_dir, f"LoRA on a non-linear layer ({module!r}, lora_A shape {list(a.shape)})")
        if a.shape[0] != r or b.shape[1] != r:
            raise MergeError(
                f"module {module!r}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not have rank r={r}",
                fix="the adapter's weights and adapter_config.json disagree (rank_pattern?); use the matching pair",
            )
        for info in (a, b):
            if info.dtype not in NUMPY_DTYPES:
                raise MergeError(f"adapter tensor {info.name!r} is {info.dtype!r}; expected F32, F16 or BF16")
        modules.append(LoraModule(module, f"{module}.weight", a, b, scale, fan_in_fan_out))
    if not modules:
        raise MergeError(f"adapter {str(adapter_dir)!r} holds no LoRA weights", fix="save the trained adapter again")
    base_name = config.get("base_model_name_or_path")
    return AdapterInfo(config, r, str(base_name) if base_name else None, modules)


def _model_name(spec: str) -> str:
    """The model's name from a repo id, a path or a Hugging Face cache snapshot path; lower case."""
    parts = [p for p in re.split(r"[/\\]", spec.strip()) if p]
    for part in parts:
        if part.startswith("models--"):  # HF cache: models--org--name/snapshots/<hash>
            return part.split("--")[-1].lower()
    name = parts[-1].lower() if parts else ""
    for suffix in BNB_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def same_base(recorded: str, expected: str) -> bool:
    """Whether an adapter's recorded base and the configured base name the same model.

    Rule: equal strings (ignoring surrounding space and trailing slashes), or equal model names, where
    the name is the last path component / repo name (the ``name`` of a ``models--org--name`` cache
    path), compared case-insensitively, with bitsandbytes suffixes (``-bnb-4bit``, ``-unsloth-bnb-4bit``,
    ``-bnb-8bit``) dropped. So ``Qwen/Qwen2.5-7B``, ``unsloth/qwen2.5-7b-bnb-4bit`` and
    ``/models/Qwen2.5-7B`` all match, while ``Qwen/Qwen2.5-7B-Instruct`` does not.
    """
    if recorded.strip().rstrip("/\\") == expected.strip().rstrip("/\\"):
        return True
    name = _model_name(recorded)
    return bool(name) and name == _model_name(expected)


def check_expected_base(recorded: str | None, expected: str, adapter_dir: Path) -> None:
    """Raise MergeError when the adapter's recorded base does not match ``expected`` (see :func:`same_base`)."""
    if not recorded:
        log.warning("adapter %s records no base_model_name_or_path; cannot check it is %r", adapter_dir, expected)
        return
    if not same_base(recorded, expected):
        raise MergeError(
            f"adapter {str(adapter_dir)!r} was trained on base {recorded!r} (adapter_config.json "
            f"base_model_name_or_path), but the configured base model is {expected!r}",
            fix="set base_model to the adapter's base model, or fix base_model_name_or_path in "
            "adapter_config.json if only its location changed",
        )
