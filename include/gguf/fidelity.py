"""The fidelity gate: a converted GGUF must compute what the merged model computes.

Two checks, both with real models:

- :func:`compare_logits` runs the merged Hugging Face model (transformers, CPU, float32) and the f16
  GGUF (llama.cpp through llama-cpp-python) on the SAME token ids (the HF tokenizer's, so the check is
  about weights, not tokenizers) and compares the logits per position: max |difference| and
  KL(softmax_hf || softmax_gguf), both in float64.
- :func:`perplexity` scores an evaluation text with a GGUF (its own vocabulary) in ``n_ctx`` chunks;
  :func:`check_perplexity` compares a quant's perplexity with the f16 GGUF's against a per-type ratio.

Failures raise :class:`GGUFError` (not retryable: the same file fails the same way) with the figures,
the config key and the fix. Heavy libraries are imported inside the functions; every llama.cpp context
is closed before returning so an Airflow worker's memory stays bounded.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from include.errors import GGUFError

log = logging.getLogger(__name__)

N_THREADS = 2  # fixed: the figures must not depend on the worker's core count
DEFAULT_EVAL_RESOURCE = "eval.txt"


@dataclass(frozen=True)
class FidelityConfig:
    """Parsed ``fidelity:`` settings of one model (see :class:`include.config.FidelitySettings`)."""

    enabled: bool
    mode: str
    prompts: tuple[str, ...]
    max_abs_diff: float
    max_kl: float
    eval_text: str
    n_ctx: int
    max_ppl_ratio: Mapping[str, float] = field(default_factory=dict)
    eval_source: str = "built-in include/data/eval.txt"


def default_eval_text() -> str:
    """The built-in evaluation text (package data ``include/data/eval.txt``)."""
    return (Path(__file__).resolve().parents[1] / "data" / DEFAULT_EVAL_RESOURCE).read_text(encoding="utf-8")


def fidelity_settings(fidelity: Any) -> FidelityConfig | None:
    """Parse a model's ``fidelity`` settings (a dict or FidelitySettings); None when absent or disabled.

    The evaluation text is read here (inline ``eval_text``, ``eval_file``, or the built-in text), so a
    missing file fails before any model is loaded.
    """
    from include.config.sections import FidelitySettings

    if fidelity is None:
        return None
    if isinstance(fidelity, Mapping):
        from pydantic import ValidationError

        try:
            fidelity = FidelitySettings(**fidelity)
        except ValidationError as err:
            raise GGUFError(f"invalid fidelity settings: {err}",
                            fix="correct the `fidelity:` section of config/models.yaml") from None
    if not fidelity.enabled:
        return None
    if fidelity.eval_text is not None:
        text, source = fidelity.eval_text, "fidelity.eval_text"
    elif fidelity.eval_file is not None:
        try:
            text, source = Path(fidelity.eval_file).read_text(encoding="utf-8"), fidelity.eval_file
        except (OSError, UnicodeDecodeError) as err:
            raise GGUFError(f"cannot read fidelity.eval_file {fidelity.eval_file!r}: {err}",
                            fix="point fidelity.eval_file at a UTF-8 text file readable by the worker, "
                                "or remove it to use the built-in text") from err
    else:
        text, source = default_eval_text(), "built-in include/data/eval.txt"
    return FidelityConfig(
        enabled=True, mode=fidelity.mode, prompts=tuple(fidelity.prompts), max_abs_diff=fidelity.max_abs_logit_diff,
        max_kl=fidelity.max_kl, eval_text=text, n_ctx=fidelity.n_ctx, max_ppl_ratio=dict(fidelity.max_ppl_ratio),
        eval_source=source,
    )


def max_ratio_for(config: FidelityConfig, quant: str) -> float:
    """The configured max perplexity ratio (quant / f16) of ``quant``, else the ``default`` entry."""
    table = config.max_ppl_ratio
    return float(table.get(quant.upper(), table.get("default", 1.5)))


@contextmanager
def _llama(gguf_path: Path, n_ctx: int) -> Iterator[Any]:
    """A llama.cpp context with all logits kept; closed (memory freed) on exit."""
    from llama_cpp import Llama

    path = Path(gguf_path)
    if not path.is_file():
        raise GGUFError(f"GGUF {str(path)!r} does not exist", fix="run the convert/quantize stage first")
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                n_threads=N_THREADS, n_threads_batch=N_THREADS, verbose=False)
    try:
        yield llm
    finally:
        llm.close()
        del llm


def _log_softmax(rows: Any) -> Any:
    import numpy as np

    rows = np.asarray(rows, dtype=np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _hf_logits(merged_dir: Path, prompts: Sequence[str], fused_adapter: Path | None = None
               ) -> tuple[list[list[int]], list[Any]]:
    """Token ids (HF tokenizer, with its special tokens) and float64 logits of each prompt.

    With ``fused_adapter``, ``merged_dir`` is the base model and the adapter's edited tensors are set to their
    merged values (:func:`include.merge.fused.merged_tensor`, what the fused conversion wrote) after loading.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    model.eval()
    if fused_adapter is not None:
        _apply_merge(model, merged_dir, fused_adapter)
    ids, logits = [], []
    try:
        with torch.inference_mode():
            for prompt in prompts:
                tokens = [int(t) for t in tokenizer(prompt)["input_ids"]]
                out = model(torch.tensor([tokens])).logits[0]
                ids.append(tokens)
                logits.append(out.to(torch.float64).numpy())
    finally:
        del model
        gc.collect()
    return ids, logits


def _apply_merge(model: Any, base_dir: Path, adapter_dir: Path) -> None:
    import torch

    from include.merge.fused import check_fusable, merged_tensor

    adapter, base = check_fusable(base_dir, adapter_dir)
    state = model.state_dict()
    with torch.no_grad():
        for key, edit in adapter.edits.items():
            if key not in state:
                raise GGUFError(f"the HF model of {str(base_dir)!r} has no tensor {key!r} the adapter edits",
                                fix="use merge.backend: streaming")
            state[key].copy_(merged_tensor(base[key], edit).to(state[key].dtype))


def compare_logits(merged_dir: Path, gguf_path: Path, *, prompts: Sequence[str], max_abs_diff: float,
                   max_kl: float, mode: str = "fail", fused_adapter: Path | None = None) -> dict:
    """Compare the merged HF model's logits with the GGUF's on ``prompts``; GGUFError when over a threshold.

    Returns ``{"max_abs_diff", "mean_kl", "max_kl", "prompts", "tokens", "passed", "worst_prompt"}``.
    With ``mode="warn"`` a failure is logged and returned with ``passed: False`` instead of raised.
    ``fused_adapter``: ``merged_dir`` is the base and this adapter is merged in memory (merge.backend fused).
    """
    import numpy as np

    merged_dir, gguf_path = Path(merged_dir), Path(gguf_path)
    if not prompts:
        raise GGUFError("no fidelity prompts to compare", fix="set fidelity.prompts to a list of texts")
    ids, hf_logits = _hf_logits(merged_dir, prompts, fused_adapter)
    n_ctx = max(16, max(len(t) for t in ids))
    kls: list[float] = []
    per_prompt: list[dict[str, Any]] = []
    with _llama(gguf_path, n_ctx) as llm:
        n_vocab = llm.n_vocab()
        for prompt, tokens, ref in zip(prompts, ids, hf_logits, strict=True):
            if ref.shape[-1] != n_vocab:
                raise GGUFError(f"{str(gguf_path)!r} has {n_vocab} logits per token but the merged model "
                                f"{str(merged_dir)!r} has {ref.shape[-1]}",
                                fix="the GGUF was not converted from this model: re-run the conversion")
            llm.reset()
            llm.eval(tokens)
            got = np.array(llm.scores[: len(tokens)], dtype=np.float64)
            diff = float(np.abs(got - ref).max())
            log_p, log_q = _log_softmax(ref), _log_softmax(got)
            kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
            kls.extend(float(k) for k in kl)
            per_prompt.append({"prompt": prompt, "tokens": len(tokens), "max_abs_diff": diff,
                               "max_kl": float(kl.max())})
    worst_prompt = max(per_prompt, key=lambda p: (p["max_kl"] / max_kl, p["max_abs_diff"] / max_abs_diff))
    record = {
        "max_abs_diff": round(max(p["max_abs_diff"] for p in per_prompt), 6),
        "mean_kl": round(float(np.mean(kls)), 9),
        "max_kl": round(max(p["max_kl"] for p in per_prompt), 9),
        "prompts": len(prompts), "tokens": sum(len(t) for t in ids), "worst_prompt": worst_prompt["prompt"],
        "max_abs_diff_limit": max_abs_diff, "max_kl_limit": max_kl,
    }
    record["passed"] = record["max_abs_diff"] <= max_abs_diff and record["max_kl"] <= max_kl
    log.info("fidelity logits %s vs %s: max |diff| %.4g (limit %g), KL mean %.3g max %.3g (limit %g) over %d "
             "tokens", merged_dir.name, gguf_path.name, record["max_abs_diff"], max_abs_diff, record["mean_kl"],
             record["max_kl"], max_kl, record["tokens"])
    if not record["passed"]:
        _fail(GGUFError(
            f"the GGUF {str(gguf_path)!r} does not compute what the merged model computes: max |logit diff| "
            f"{record['max_abs_diff']:.4g} (limit fidelity.max_abs_logit_diff={max_abs_diff:g}), max KL "
            f"{record['max_kl']:.4g} nats (limit fidelity.max_kl={max_kl:g}), mean KL {record['mean_kl']:.3g}, "
            f"worst prompt {record['worst_prompt']!r}",
            fix="a tensor was converted wrongly or the file is corrupt: re-run the conversion with the pinned "
                "toolchain and compare again; if the model is known-good and the figures are expected (e.g. a "
                "bf16 model with large activations), raise fidelity.max_abs_logit_diff / fidelity.max_kl, or set "
                "fidelity.mode: warn",
        ), mode)
    return record


def perplexity(gguf_path: Path, text: str, *, n_ctx: int = 256) -> float:
    """Perplexity of ``text`` under the GGUF: tokens from its own vocab, ``n_ctx`` chunks, exp(mean NLL).

    Each chunk starts with BOS (when the vocab has one) followed by the next ``n_ctx - 1`` text tokens;
    every text token after the first of its chunk is scored. Deterministic (fixed threads, no sampling).
    """
    import numpy as np

    total_nll, scored = 0.0, 0
    with _llama(gguf_path, n_ctx) as llm:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        bos = llm.token_bos()
        prefix = [bos] if bos is not None and bos >= 0 else []
        step = n_ctx - len(prefix)
        for start in range(0, len(tokens), step):
            chunk = prefix + tokens[start:start + step]
            if len(chunk) < 2:
                continue
            llm.reset()
            llm.eval(chunk)
            log_q = _log_softmax(np.array(llm.scores[: len(chunk) - 1], dtype=np.float64))
            targets = np.array(chunk[1:])
            nll = -log_q[np.arange(len(targets)), targets]
            total_nll += float(nll.sum())
            scored += len(targets)
    if scored == 0:
        raise GGUFError(f"the evaluation text gives no tokens to score with {str(gguf_path)!r}",
                        fix="use a longer fidelity.eval_text / fidelity.eval_file")
    ppl = math.exp(total_nll / scored)
    log.info("perplexity of %s: %.4f over %d tokens (n_ctx %d)", Path(gguf_path).name, ppl, scored, n_ctx)
    return ppl


def check_perplexity(quant: str, ppl: float, ppl_f16: float, *, max_ratio: float, mode: str = "fail") -> dict:
    """GGUFError when ``ppl / ppl_f16 > max_ratio``; ``{"ppl", "ppl_f16", "ratio", "max_ratio", "passed"}``."""
    if not (ppl > 0 and ppl_f16 > 0) or math.isnan(ppl) or math.isnan(ppl_f16):
        raise GGUFError(f"perplexity of {quant} is not a positive number ({ppl!r} vs f16 {ppl_f16!r})",
                        fix="the GGUF produces NaN/inf logits: re-create it from the f16 GGUF")
    ratio = ppl / ppl_f16
    record = {"quant": quant, "ppl": round(ppl, 6), "ppl_f16": round(ppl_f16, 6), "ratio": round(ratio, 6),
              "max_ratio": max_ratio, "passed": ratio <= max_ratio}
    if not record["passed"]:
        _fail(GGUFError(
            f"{quant} is too far from f16: perplexity {ppl:.4f} vs {ppl_f16:.4f} for f16, ratio {ratio:.4f} > "
            f"limit fidelity.max_ppl_ratio.{quant.upper()}={max_ratio:g}",
            fix=f"use a larger quant type than {quant} (e.g. Q5_K_M, Q6_K, Q8_0), add an importance matrix "
                f"(quantize.imatrix), or raise fidelity.max_ppl_ratio.{quant.upper()} if this loss is acceptable "
                "(fidelity.mode: warn keeps the file with a warning)",
        ), mode)
    else:
        log.info("%s perplexity ratio vs f16 %.4f (limit %g)", quant, ratio, max_ratio)
    return record


def _fail(error: GGUFError, mode: str) -> None:
    if mode == "warn":
        log.warning("fidelity.mode=warn, keeping the file: %s", error)
        return
    raise error
