"""Texts published to the Hugging Face Hub: the model card of the GGUF repo and the files of its Gradio Space.

The card is built with ``huggingface_hub.ModelCard`` / ``ModelCardData`` (imported inside functions so that
importing this module stays cheap at DAG-parse time). The Space files come from ``include/hub/space_template/``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from string import Template
from typing import Any

from include.merge.base_model import is_hub_model_id
from include.units import format_bytes

TEMPLATE_DIR = Path(__file__).with_name("space_template")
GRADIO_VERSION = "6.31.0"
CARD_TAGS = ["gguf", "lora", "llama.cpp", "lora-deploy"]
def _cell(value: Any) -> str:
    """A value made safe for one Markdown table cell / inline code span."""
    text = re.sub(r"\s+", " ", str(value)).replace("|", "\\|").replace("`", "'")
    return re.sub(r"//[^/@\s]+@", "//", text)  # drop user:password@ from URLs


def model_card_text(*, model: str, version: str, repo_id: str, files: list[dict], card: dict) -> str:
    """README.md of the model repo: YAML metadata (base_model, tags) and a Markdown body.

    ``files`` items: ``{"name", "quant", "bytes", "sha256"}`` plus, when measured, ``bits_per_weight``,
    ``perplexity``, ``perplexity_f16`` and ``ppl_ratio``. ``card``: ``base_model``, ``adapter_source``,
    ``adapter_version``, ``adapter_time``, an optional ``health`` dict (``latency_s``, ``tokens_per_s``) and an
    optional ``converted`` record (``llama_cpp``, ``fidelity`` with ``max_abs_diff`` / ``mean_kl``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    base_model = str(card.get("base_model") or "")
    data = ModelCardData(
        base_model=base_model if base_model and is_hub_model_id(base_model) else None,
        tags=list(CARD_TAGS),
        pipeline_tag="text-generation",
    )
    adapter_version = card.get("adapter_version") or version
    source = _cell(card.get("adapter_source") or "unknown")
    lines = [
        f"# {_cell(model)} (GGUF)",
        "",
        (f"GGUF builds of `{_cell(model)}`: the LoRA adapter `{source}` (version `{_cell(adapter_version)}`) merged "
         f"into `{_cell(base_model or 'unknown')}`, converted and quantized with llama.cpp by lora-deploy."),
        "",
        "## Files",
        "",
        "| File | Quant | Size | Bits/weight | Perplexity | PPL vs f16 | SHA256 |",
        "|---|---|---|---|---|---|---|",
        *(_file_row(f) for f in files),
        "",
    ]
    if any(f.get("perplexity") is not None for f in files):
        f16 = next((f.get("perplexity_f16") for f in files if f.get("perplexity_f16") is not None), None)
        lines += [f"Perplexity measured by the quality gate on its evaluation text (f16: {_number(f16, 3)}); "
                  "bits per weight are the GGUF's real tensor sizes.", ""]
    else:
        lines += ["Bits per weight are the GGUF's real tensor sizes; the perplexity gate did not run.", ""]
    lines += [
        "## Adapter",
        "",
        f"- Base model: `{_cell(base_model or 'unknown')}`",
        f"- Adapter source: `{source}`",
        f"- Adapter version: `{_cell(adapter_version)}`",
    ]
    if card.get("adapter_time"):
        lines.append(f"- Adapter time: `{_cell(card['adapter_time'])}`")
    converted = card.get("converted") or {}
    if converted.get("llama_cpp"):
        lines.append(f"- llama.cpp: `{_cell(converted['llama_cpp'])}`")
    fidelity = converted.get("fidelity") or {}
    if fidelity:
        lines.append(f"- Conversion fidelity vs the merged model: max |logit diff| "
                     f"{_number(fidelity.get('max_abs_diff'), 4)}, mean KL {_number(fidelity.get('mean_kl'), 5)}")
    health = card.get("health") or {}
    if health:
        lines += ["", "## Health check", "", "| Latency (s) | Tokens/s |", "|---|---|",
                  f"| {_number(health.get('latency_s'))} | {_number(health.get('tokens_per_s'))} |"]
    first = files[0]["name"] if files else "MODEL.gguf"
    lines += [
        "", "## Usage", "",
        "llama.cpp:", "", "```bash", f"llama-cli --hf-repo {repo_id} --hf-file {first} -p \"Hello\"", "```", "",
        "llama-cpp-python:", "", "```python", "from llama_cpp import Llama", "",
        f"llm = Llama.from_pretrained(repo_id={repo_id!r}, filename={first!r})", "```", "",
        "LM Studio: search for the repo id in the model browser, or `lms get` it.", "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _file_row(f: dict) -> str:
    ratio = f.get("ppl_ratio")
    return (f"| [{_cell(f['name'])}](./{_cell(f['name'])}) | {_cell(f['quant'])} | {format_bytes(int(f['bytes']))} "
            f"| {_number(f.get('bits_per_weight'))} | {_number(f.get('perplexity'), 3)} "
            f"| {'n/a' if ratio is None else f'x{float(ratio):.3f}'} | `{_cell(f['sha256'])}` |")


def _number(value: Any, digits: int = 2) -> str:
    return f"{float(value):.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def space_files(*, model: str, model_repo: str, hardware: str, endpoint: str | None = None) -> dict[str, bytes]:
    """The Space's files rendered from ``include/hub/space_template/``: app.py, requirements.txt and README.md.

    README.md front matter carries sdk, sdk_version, app_file and suggested_hardware; string values are
    inserted JSON-quoted so that no value can break the YAML.
    """
    base = (endpoint or "https://huggingface.co").rstrip("/")
    values = {
        "title": json.dumps(f"{model} chat"[:70]),
        "short_description": json.dumps(f"Chat with {model} (GGUF, llama.cpp)"[:60]),
        "gradio_version": json.dumps(GRADIO_VERSION),
        "hardware": json.dumps(hardware),
        "model_repo": json.dumps(model_repo),
        "model_name": _cell(model),
        "model_repo_plain": _cell(model_repo),
        "model_url": f"{base}/{model_repo}",
    }
    readme = Template((TEMPLATE_DIR / "README.md").read_text(encoding="utf-8")).substitute(values)
    return {
        "app.py": (TEMPLATE_DIR / "app.py").read_bytes(),
        "requirements.txt": (TEMPLATE_DIR / "requirements.txt").read_bytes(),
        "README.md": readme.encode("utf-8"),
    }
