"""Read and validate a peft LoRA adapter without torch: its config, its tensors, the base it was trained on.

The adapter is turned into one :class:`TensorEdit` per base tensor it changes, with peft's semantics:

- ``M.lora_A/B.weight``: ``W += scale * B @ A`` (transposed with ``fan_in_fan_out``), ``scale`` from
  ``r``/``lora_alpha`` or the module's ``rank_pattern``/``alpha_pattern`` entry (``alpha/sqrt(r)`` with
  ``use_rslora``);
- ``M.lora_magnitude_vector``: DoRA, the merged rows are rescaled to the learned magnitude;
- ``M.lora_B.bias`` (``lora_bias``): ``bias += scale * lora_B.bias``;
- ``M.lora_embedding_A/B``: embedding LoRA, ``W += scale * (B @ A).T``;
- any other tensor (``modules_to_save``, biases trained with ``bias="all"``, the embedding copies peft
  saves as ``M.base_layer.weight``) replaces the base tensor of that name before any LoRA delta.

LoRA variants that change the merge math in other ways are refused instead of merged wrongly.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from include.errors import MergeError, SafetensorsFormatError, UnsupportedAdapterError
from include.merge.safetensors_io import NUMPY_DTYPES, TensorInfo, read_header

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_ADAPTER = r"(?:\.[^.]+)?"  # an optional adapter-name segment (``.default``) some savers keep
LORA_AB = re.compile(rf"^(?P<module>.+)\.lora_(?P<ab>[AB]){_ADAPTER}\.weight$")
LORA_BIAS = re.compile(rf"^(?P<module>.+)\.lora_B{_ADAPTER}\.bias$")
MAGNITUDE = re.compile(rf"^(?P<module>.+)\.lora_magnitude_vector{_ADAPTER}(?:\.weight)?$")
EMBEDDING = re.compile(rf"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB]){_ADAPTER}$")
BASE_LAYER = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")
# Adapter features that change the merge math in ways not implemented here (config key -> what it is).
UNSUPPORTED = {
    "target_parameters": "LoRA on parameters", "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication", "alora_invocation_tokens": "activated LoRA",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing", "kasa_config": "KaSA", "use_qalora": "QA-LoRA",
}
BNB_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit", "-bnb-8bit")


@dataclass(frozen=True)
class LowRank:
    """A low-rank delta ``scale * B @ A`` on a weight; ``transpose`` for fan_in_fan_out and embeddings.

    ``magnitude`` (DoRA) rescales each output feature of ``W + delta`` to the learned norm.
    """

    module: str
    a: TensorInfo
    b: TensorInfo
    scale: float
    transpose: bool
    magnitude: TensorInfo | None = None
    embedding: bool = False

    @property
    def out_shape(self) -> tuple[int, int]:
        """The shape of the base weight this delta fits, as stored."""
        out_features, in_features = self.b.shape[0], self.a.shape[1]
        return (in_features, out_features) if self.transpose else (out_features, in_features)


@dataclass(frozen=True)
class TensorEdit:
    """How one base tensor changes: an optional replacement, then a low-rank delta or a scaled vector added."""

    key: str
    replacement: TensorInfo | None = None
    low_rank: LowRank | None = None
    add: TensorInfo | None = None  # lora_bias: bias += add_scale * lora_B.bias
    add_scale: float = 1.0


@dataclass(frozen=True)
class AdapterInfo:
    """A validated LoRA adapter: config, default rank, recorded base model and per-tensor edits."""

    config: dict[str, Any]
    r: int
    base_model_name_or_path: str | None
    edits: dict[str, TensorEdit]
    features: list[str] = field(default_factory=list)

    @property
    def low_rank(self) -> list[LowRank]:
        """The low-rank deltas, in key order."""
        return [e.low_rank for _, e in sorted(self.edits.items()) if e.low_rank is not None]


def _unsupported(adapter_dir: Path, feature: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(
        f"adapter {str(adapter_dir)!r} uses {feature}, which the streaming merge does not support "
        "(merging anyway would be silently wrong)",
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


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern that matches the end of ``module`` at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_config(adapter_dir: Path, config: dict[str, Any]) -> tuple[int, float]:
    """Raise MergeError for non-LoRA types and unsupported variants; return the default ``(r, lora_alpha)``."""
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
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise MergeError(f"adapter {str(adapter_dir)!r} has r={r!r}, lora_alpha={alpha!r}",
                         fix="r must be a positive integer and lora_alpha a number")
    return r, float(alpha)


def _classify(tensors: dict[str, TensorInfo]) -> dict[str, dict[str, TensorInfo]]:
    """Group adapter tensors by (module, role); roles: A, B, bias, magnitude, emb_A, emb_B, replace:<key>."""
    groups: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        name = key.removeprefix(PREFIX)
        if m := LORA_AB.match(name):
            groups.setdefault(m["module"], {})[m["ab"]] = info
        elif m := LORA_BIAS.match(name):
            groups.setdefault(m["module"], {})["bias"] = info
        elif m := MAGNITUDE.match(name):
            groups.setdefault(m["module"], {})["magnitude"] = info
        elif m := EMBEDDING.match(name):
            groups.setdefault(m["module"], {})[f"emb_{m['ab']}"] = info
        elif m := BASE_LAYER.match(name):
            groups.setdefault("", {})[f"replace:{m['module']}.{m['param']}"] = info
        elif "lora_" in name:
            raise UnsupportedAdapterError(f"adapter tensor {key!r} is not a LoRA tensor this merge knows",
                                          fix="merge this adapter with the peft backend (merge.backend: peft)")
        else:
            groups.setdefault("", {})[f"replace:{name}"] = info
    return groups


def _low_rank(adapter_dir: Path, config: dict[str, Any], module: str, parts: dict[str, TensorInfo],
              default: tuple[int, float]) -> LowRank:
    embedding = "emb_A" in parts or "emb_B" in parts
    a_key, b_key = ("emb_A", "emb_B") if embedding else ("A", "B")
    if a_key not in parts or b_key not in parts:
        have = sorted(parts)
        raise MergeError(f"adapter {str(adapter_dir)!r}: module {module!r} has {have} but not both LoRA A and B",
                         fix="download the adapter again (its weights are incomplete)")
    a, b = parts[a_key], parts[b_key]
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise _unsupported(adapter_dir, f"LoRA on a non-linear layer ({module!r}, A shape {list(a.shape)})")
    r = pattern_value(config.get("rank_pattern") or {}, module, default[0])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, default[1])
    if a.shape[0] != r or b.shape[1] != r:
        raise MergeError(
            f"module {module!r}: A {list(a.shape)} / B {list(b.shape)} do not have rank r={r} "
            "(from r / rank_pattern in adapter_config.json)",
            fix="the adapter's weights and adapter_config.json disagree; use the matching pair",
        )
    for info in (a, b, parts.get("magnitude"), parts.get("bias")):
        if info is not None and info.dtype not in NUMPY_DTYPES:
            raise MergeError(f"adapter tensor {info.name!r} is {info.dtype!r}; expected F32, F16 or BF16")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    transpose = embedding or bool(config.get("fan_in_fan_out"))
    return LowRank(module, a, b, scale, transpose, parts.get("magnitude"), embedding)


def inspect_adapter(adapter_dir: Path) -> AdapterInfo:
    """Validate a peft adapter dir as LoRA and map its tensors to per-base-tensor edits (no tensor data read)."""
    adapter_dir = Path(adapter_dir)
    config = _read_adapter_config(adapter_dir)
    default = check_config(adapter_dir, config)
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
    groups = _classify(tensors)
    replacements = {role.removeprefix("replace:"): info for role, info in groups.pop("", {}).items()}
    edits: dict[str, TensorEdit] = {key: TensorEdit(key, replacement=info) for key, info in replacements.items()}
    features: set[str] = {"replaced tensors"} if replacements else set()
    for module, parts in sorted(groups.items()):
        low_rank = _low_rank(adapter_dir, config, module, parts, default)
        key = f"{module}.weight"
        edits[key] = TensorEdit(key, replacement=replacements.get(key), low_rank=low_rank)
        features.add("embedding LoRA" if low_rank.embedding else "LoRA")
        if low_rank.magnitude is not None:
            features.add("DoRA")
        if "bias" in parts:
            bias_key = f"{module}.bias"
            edits[bias_key] = TensorEdit(bias_key, replacement=replacements.get(bias_key), add=parts["bias"],
                                         add_scale=low_rank.scale)
            features.add("LoRA bias")
    if not any(e.low_rank for e in edits.values()):
        raise MergeError(f"adapter {str(adapter_dir)!r} holds no LoRA weights", fix="save the trained adapter again")
    base_name = config.get("base_model_name_or_path")
    return AdapterInfo(config, default[0], str(base_name) if base_name else None, edits, sorted(features))


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
