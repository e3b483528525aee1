"""The fidelity gate: a converted GGUF must compute what the merged model computes.

Two checks, both with real models:

- :func:`compare_logits` runs the merged Hugging Face model (transformers, CPU, float32, one decoder layer at
  a time: :mod:`include.gguf.reference`) and the f16 GGUF (llama.cpp through llama-cpp-python) on the SAME
  token ids (the HF tokenizer's, so the check is about weights, not tokenizers) and compares the logits per
  position: max |difference| and KL(softmax_hf || softmax_gguf), both in float64.
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
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from include.errors import GGUFError
from include.gguf.mmap_llama import mmap_llama_class

if TYPE_CHECKING:
    from include.config.sections import FidelitySettings

log = logging.getLogger(__name__)
PROGRESS_S = 15.0  # seconds between progress lines of a perplexity run

N_THREADS = 2  # fixed: the figures must not depend on the worker's core count
ROW_BLOCK = 16  # logits rows per float64 block (16 x 152k vocab x 8 bytes = 19 MB)
DEFAULT_EVAL_RESOURCE = "eval.txt"


@dataclass(frozen=True)
class EvalText:
    """The perplexity gate's evaluation text and where it comes from (derived from a ``FidelitySettings``)."""

    text: str
    source: str


def default_eval_text() -> str:
    """The built-in evaluation text (package data ``include/data/eval.txt``)."""
    return (Path(__file__).resolve().parents[1] / "data" / DEFAULT_EVAL_RESOURCE).read_text(encoding="utf-8")


def fidelity_settings(fidelity: FidelitySettings | Mapping[str, Any] | None) -> FidelitySettings | None:
    """A model's ``fidelity`` section, validated (a mapping such as ``model_dump()`` is accepted); None when
    absent or disabled. The section is the one source of the gate's settings and their defaults."""
    from include.config.sections import FidelitySettings

    if fidelity is None:
        return None
    if isinstance(fidelity, Mapping):
        from pydantic import ValidationError

        try:
            fidelity = FidelitySettings.model_validate(dict(fidelity))
        except ValidationError as err:
            raise GGUFError(f"invalid fidelity settings: {err}",
                            fix="correct the `fidelity:` section of config/models.yaml") from None
    return fidelity if fidelity.enabled else None


def evaluation_text(fidelity: FidelitySettings) -> EvalText:
    """The evaluation text: inline ``eval_text``, else ``eval_file`` (read now, so a missing file fails before any
    model is loaded), else the built-in text."""
    if fidelity.eval_text is not None:
        return EvalText(fidelity.eval_text, "fidelity.eval_text")
    if fidelity.eval_file is not None:
        try:
            return EvalText(Path(fidelity.eval_file).read_text(encoding="utf-8"), fidelity.eval_file)
        except (OSError, UnicodeDecodeError) as err:
            raise GGUFError(f"cannot read fidelity.eval_file {fidelity.eval_file!r}: {err}",
                            fix="point fidelity.eval_file at a UTF-8 text file readable by the worker, "
                                "or remove it to use the built-in text") from err
    return EvalText(default_eval_text(), f"built-in include/data/{DEFAULT_EVAL_RESOURCE}")


def max_ratio_for(fidelity: FidelitySettings, quant: str) -> float:
    """The configured max perplexity ratio (quant / f16) of ``quant``, else the table's ``default`` entry (the
    section merges the user's entries over the built-in table, so ``default`` is always there)."""
    table = fidelity.max_ppl_ratio
    return float(table.get(quant.upper(), table["default"]))


@contextmanager
def _llama(gguf_path: Path, n_ctx: int) -> Iterator[Any]:
    """A llama.cpp context with all logits kept, weights through mmap only; closed (memory freed) on exit."""
    path = Path(gguf_path)
    if not path.is_file():
        raise GGUFError(f"GGUF {str(path)!r} does not exist", fix="run the convert/quantize stage first")
    llm = mmap_llama_class()(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
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


def _row_blocks(count: int) -> Iterator[slice]:
    """Blocks of ``ROW_BLOCK`` rows: float64 work on logits stays ~ROW_BLOCK x vocab x 8 bytes per array.

    Every figure is computed row by row (max, log-softmax, KL), so blocking does not change any bit.
    """
    for start in range(0, count, ROW_BLOCK):
        yield slice(start, min(start + ROW_BLOCK, count))


def _hf_logits(merged_dir: Path, prompts: Sequence[str], fused_adapter: Path | None = None
               ) -> tuple[list[list[int]], list[Any]]:
    """Token ids (HF tokenizer, with its special tokens) and float64 logits of each prompt.

    The logits are transformers' float32 logits, computed one decoder layer at a time from the safetensors
    (:func:`include.gguf.reference.streamed_logits`), so memory is bounded by a layer, not by the model. With
    ``fused_adapter``, ``merged_dir`` is the base model and the adapter's edited tensors are their merged values
    (:func:`include.merge.fused.merged_tensor`, what the fused conversion wrote), computed as they are loaded.
    """
    from transformers import AutoTokenizer

    from include.gguf.reference import streamed_logits

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = [[int(t) for t in tokenizer(prompt)["input_ids"]] for prompt in prompts]
    try:
        return ids, streamed_logits(merged_dir, ids, fused_adapter)
    finally:
        gc.collect()


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
            diff, kl = 0.0, np.empty(len(tokens))
            for rows in _row_blocks(len(tokens)):
                got = np.asarray(llm.scores[rows], dtype=np.float64)
                diff = max(diff, float(np.abs(got - ref[rows]).max()))
                log_p, log_q = _log_softmax(ref[rows]), _log_softmax(got)
                kl[rows] = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
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
    started = last = time.monotonic()
    with _llama(gguf_path, n_ctx) as llm:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        bos = llm.token_bos()
        prefix = [bos] if bos is not None and bos >= 0 else []
        step = n_ctx - len(prefix)
        for start in range(0, len(tokens), step):
            if time.monotonic() - last >= PROGRESS_S:  # a 7B f16 takes ~2 min on 2 cores, a 70B ~20
                last = time.monotonic()
                log.info("perplexity of %s: %d of %d tokens in %.0f s", Path(gguf_path).name, start, len(tokens),
                         last - started)
            chunk = prefix + tokens[start:start + step]
            if len(chunk) < 2:
                continue
            llm.reset()
            llm.eval(chunk)
            targets = np.array(chunk[1:])
            nll = np.empty(len(targets))
            for rows in _row_blocks(len(targets)):
                log_q = _log_softmax(llm.scores[rows])
                nll[rows] = -log_q[np.arange(len(log_q)), targets[rows]]
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
