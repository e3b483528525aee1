"""GGUF operators: ``convert`` (f16 GGUF, tokenizer checks, fidelity gate, imatrix) and mapped ``quantize``.

The engine calls live in ``include/`` (gguf, tokenizer_check, imatrix, fidelity); these classes only
wire them to the artifact store and XCom. Heavy libraries are imported inside ``execute``.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context

from include.config.sections import FidelitySettings, ImatrixSettings, QuantizeSettings
from include.errors import GGUFError
from include.gguf.quant_types import QUANT_TYPES
from include.gguf.toolchain import LlamaCppToolchain, user_toolchain
from include.plan.stages import convert_stage, quantize_stage
from include.store.artifacts import ArtifactStore, StageResult
from operators.common import as_bool, engine_errors, memory_guard, section, workers_section

log = logging.getLogger(__name__)


def _toolchain(llama_cpp_dir: str | None, llama_cpp_bin_dir: str | None) -> LlamaCppToolchain:
    """The configured (or pinned) toolchain, checked: a ToolchainError (a GGUFError) names what is missing."""
    toolchain = user_toolchain(llama_cpp_dir, llama_cpp_bin_dir)
    toolchain.check()
    return toolchain


def _fidelity(fidelity: FidelitySettings | None) -> tuple[Any, FidelitySettings] | tuple[None, None]:
    """``(include.gguf.fidelity module, the section)`` when the gate is enabled (the module imports lazily)."""
    if fidelity is None or not fidelity.enabled:
        return None, None
    from include.gguf import fidelity as module

    return module, fidelity


def _eval_text(module: Any, fidelity: FidelitySettings) -> str | None:
    """The perplexity gate's evaluation text (read from ``eval_file`` if set), or None when it is blank."""
    text = module.evaluation_text(fidelity).text
    return text if text.strip() else None


def cached_figures(artifact_root: str, model: str, inputs: dict[str, Any], compute: Callable[[], Any],
                   force: bool = False) -> Any:
    """``compute()``'s JSON result, kept in the artifact store (stage ``fidelity``) under ``inputs``.

    The fidelity figures depend only on the files' sha256 and the gate's settings, so a retry or a re-run
    answers from the store instead of evaluating the models again. A gate that fails raises before
    anything is stored, so it fails again the next time.
    """
    store = ArtifactStore(artifact_root)
    result = store.build(model, "fidelity", inputs, lambda tmp: {"figures": compute()}, force=force)
    return result.manifest["figures"]


def cached_perplexity(artifact_root: str, model: str, module: Any, gguf: dict[str, Any], text: str, n_ctx: int,
                      force: bool = False) -> float:
    """The perplexity of one GGUF (``path``, ``sha256``) on ``text``, computed once per file and text."""
    import hashlib

    inputs = {"check": "perplexity", "gguf": gguf["sha256"], "n_ctx": n_ctx,
              "text": hashlib.sha256(text.encode()).hexdigest()}
    return float(cached_figures(artifact_root, model, inputs,
                                lambda: module.perplexity(Path(gguf["path"]), text, n_ctx=n_ctx), force))


def _file_record(quant: str, result: StageResult, toolchain_version: str) -> dict[str, Any]:
    gguf = result.manifest["gguf"]
    return {"quant": quant, "path": str(result.path / Path(gguf["path"]).name), "bytes": gguf["bytes"],
            "sha256": gguf["sha256"], "bits_per_weight": gguf["bits_per_weight"],
            "weights_by_type": gguf["weights_by_type"], "type_fraction": result.manifest.get("type_fraction", 1.0),
            "reused": result.reused, "llama_cpp": toolchain_version,
            **({"shards": [{**shard, "path": str(result.path / Path(shard["path"]).name)} for shard in gguf["shards"]]}
               if gguf.get("shards") else {})}


class _LlamaCppStage(BaseOperator):
    """What convert and quantize share: the model, the store, the quantize/fidelity/workers sections, the toolchain."""

    def __init__(self, *, model: str, artifact_root: str, settings: QuantizeSettings | Mapping[str, Any],
                 workers: Any = None, fidelity: FidelitySettings | Mapping[str, Any] | None = None,
                 llama_cpp_dir: str | None = None, llama_cpp_bin_dir: str | None = None, force: bool | str = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.workers = workers_section(workers, model=model)
        self.artifact_root = artifact_root
        self.settings = section(QuantizeSettings, settings, model=model, name="quantize")
        self.fidelity = None if fidelity is None else section(FidelitySettings, fidelity, model=model, name="fidelity")
        self.llama_cpp_dir = llama_cpp_dir
        self.llama_cpp_bin_dir = llama_cpp_bin_dir
        self.force = force


class GGUFConvertOperator(_LlamaCppStage):
    """Convert the merged model to an f16 GGUF with the pinned (or the user's) llama.cpp, and check it.

    Before converting: the quantization types are validated, the disk space for every output is
    estimated, and the BPE pre-tokenizer hash is computed (unknown -> ``quantize.pre_tokenizer`` or a
    clear failure). After: tokens of fixed texts must be equal in llama.cpp and the HF tokenizer, the
    chat template must be in the GGUF, and (when ``fidelity`` is enabled) the logits must match the
    merged model. An importance matrix is computed when a calibration text is configured.

    :param model: the model's name in config/models.yaml.
    :param merged: the merge record (``path``, ``sha256``, ``adapter_version``). (templated)
    :param adapter: the download record (``version``). (templated)
    :param quant_types: llama.cpp types, e.g. ``["Q8_0", "Q4_K_M"]``, validated here. (templated)
    :param artifact_root: root of the artifact store. (templated)
    :param settings: the model's ``quantize`` section (or its ``model_dump()``).
    :param fidelity: the model's ``fidelity`` section (or its ``model_dump()``); None or ``enabled: false`` skips
        the gate.
    :param llama_cpp_dir: a llama.cpp checkout to use instead of the pinned one.
    :param llama_cpp_bin_dir: a dir with llama-quantize / llama-imatrix to use instead of the pinned build.
    :param force: convert again even if the output exists. (templated)
    :param workers: the model's ``workers`` section (memory budget: see :func:`operators.common.memory_guard`).

    Returns ``{"llama_cpp", "quant_types", "base", "tokenizer", "fidelity", "imatrix"}`` and pushes the
    validated types under XCom key ``quant_types``; expand the quantize task over :func:`quant_types_of`.
    """

    template_fields: Sequence[str] = ("merged", "adapter", "quant_types", "artifact_root", "force")
    ui_color = "#fff3e0"

    def __init__(self, *, merged: Any, adapter: Any, quant_types: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.merged = merged
        self.adapter = adapter
        self.quant_types = quant_types

    def execute(self, context: Context) -> dict[str, Any]:
        """Validate, preflight, convert once (store), check tokenizer and fidelity, compute the imatrix."""
        from include.gguf import imatrix
        from include.gguf import tokenizer as tokenizer_check
        from include.gguf.convert import convert_to_gguf
        from include.gguf.metadata import disk_preflight, gguf_metadata

        s = self.settings
        with engine_errors(self.model), memory_guard(self, context, "convert", lambda: convert_stage(
                Path(self.merged["path"]), self.merged.get("fused_adapter"), s, self.fidelity)):
            types = validated_types(self.quant_types, s.imatrix)
            toolchain = _toolchain(self.llama_cpp_dir, self.llama_cpp_bin_dir)
            store = ArtifactStore(self.artifact_root)
            force = as_bool(self.force)
            merged_dir = Path(self.merged["path"])  # the base model when the merge is fused into the conversion
            fused_adapter = Path(self.merged["fused_adapter"]) if self.merged.get("fused_adapter") else None
            outtype = s.outtype
            calibration = imatrix.calibration_text(s.imatrix.model_dump())
            pre = tokenizer_check.check_pre_tokenizer(merged_dir, toolchain.source_dir, s.pre_tokenizer)
            self.log.info("pre-tokenizer: %s", pre)
            metadata = gguf_metadata(self.model, self.merged, self.adapter or {}, toolchain.version)
            inputs = {"merged": self.merged["sha256"], "outtype": outtype, "metadata": metadata,
                      "llama_cpp": toolchain.version, "pre_tokenizer": pre["name"],
                      "use_temp_file": s.use_temp_file, "split_max_size": s.split_max_size}
            if force or store.lookup(self.model, "gguf", store.key_of(inputs)) is None:
                disk_preflight(merged_dir, Path(self.artifact_root), [t for t in types if t != outtype.upper()],
                                    outtype=outtype, imatrix=calibration is not None)

            hashed: dict[str, str] = {}  # filled by convert(): the store need not read the GGUF again

            def convert(tmp: Path) -> dict[str, Any]:
                check_tokens = s.check_tokenizer
                # The HF side of the token comparison (transformers import, tokenizer load) needs only the
                # merged dir: it runs on this process's thread while the converter subprocess writes the GGUF.
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-tokens") as pool:
                    reference = pool.submit(tokenizer_check.hf_tokenization, merged_dir) if check_tokens else None
                    summary = convert_to_gguf(
                        merged_dir, tmp / f"{self.model}-{outtype.upper()}.gguf", toolchain=toolchain,
                        outtype=outtype, metadata=metadata, pre_tokenizer=pre["name"] if pre["mapped"] else None,
                        use_temp_file=s.use_temp_file, split_max_size=s.split_max_size, fused_adapter=fused_adapter)
                    checks: dict[str, Any] = {"chat_template": tokenizer_check.check_chat_template(summary.metadata,
                                                                                                   merged_dir)}
                    if reference is not None:
                        checks["comparison"] = tokenizer_check.compare_tokenization(
                            summary.path, merged_dir, reference=reference.result())
                        self.log.info("tokenizer comparison: %s", checks["comparison"])
                hashed[Path(summary.path).relative_to(tmp).as_posix()] = summary.sha256
                return {"gguf": summary.as_record(), "tokenizer_checks": checks}

            base = store.build(self.model, "gguf", inputs, convert, force=force, known_sha256=hashed)
            base_record = _file_record(outtype.upper(), base, toolchain.version)
            tokenizer = {**pre, **base.manifest.get("tokenizer_checks", {}),
                         "gguf_pre": base.manifest["gguf"]["metadata"].get("tokenizer.ggml.pre")}
            fidelity = self._fidelity_gate(merged_dir, base_record, force, fused_adapter)
            imatrix_record = None
            if calibration is not None:
                imatrix_record = self._imatrix(store, toolchain, base_record, calibration, force)
        result = {"llama_cpp": toolchain.version, "quant_types": types, "base": base_record, "tokenizer": tokenizer,
                  "fidelity": fidelity, "imatrix": imatrix_record}
        context["ti"].xcom_push(key="quant_types", value=types)
        return result

    def _fidelity_gate(self, merged_dir: Path, base: dict[str, Any], force: bool,
                       fused_adapter: Path | None = None) -> dict[str, Any] | None:
        module, config = _fidelity(self.fidelity)
        if module is None or config is None:
            return None
        text = _eval_text(module, config)  # read first: a missing eval_file fails before any model is loaded
        f16 = Path(base["path"])
        figures = cached_figures(self.artifact_root, self.model, {
            "check": "logits", "merged": self.merged["sha256"], "gguf": base["sha256"], "prompts": list(config.prompts),
            "max_abs_diff": config.max_abs_logit_diff, "max_kl": config.max_kl, "mode": config.mode,
        }, lambda: module.compare_logits(merged_dir, f16, prompts=config.prompts,
                                         max_abs_diff=config.max_abs_logit_diff, max_kl=config.max_kl,
                                         mode=config.mode, fused_adapter=fused_adapter), force)
        self.log.info("fidelity (merged vs f16): %s", figures)
        if text is not None:
            figures = {**figures, "perplexity_f16": cached_perplexity(self.artifact_root, self.model, module, base,
                                                                      text, config.n_ctx, force)}
        return figures

    def _imatrix(self, store: ArtifactStore, toolchain: LlamaCppToolchain, base: dict[str, Any],
                 calibration: tuple[str, str], force: bool) -> dict[str, Any]:
        import hashlib

        from include.gguf import imatrix

        text, source = calibration
        ctx, chunks = self.settings.imatrix.ctx_size, self.settings.imatrix.chunks

        def produce(tmp: Path) -> dict[str, Any]:
            imatrix.compute_imatrix(toolchain, Path(base["path"]), text, tmp / "imatrix.gguf", ctx_size=ctx,
                                    chunks=chunks)
            return {"calibration": source}

        result = store.build(self.model, "imatrix", {
            "base": base["sha256"], "calibration": hashlib.sha256(text.encode()).hexdigest(), "ctx": ctx,
            "chunks": chunks, "llama_cpp": toolchain.version}, produce, force=force)
        entry = next(f for f in result.manifest["files"] if f["name"] == "imatrix.gguf")
        return {"path": str(result.path / "imatrix.gguf"), "sha256": entry["sha256"], "calibration": source,
                "reused": result.reused}


def validated_types(requested: Any, imatrix: ImatrixSettings) -> list[str]:
    """The requested quantization types, normalised and checked; GGUFError naming the bad ones and the fix."""
    if isinstance(requested, str) and requested.strip().startswith("["):
        try:
            requested = ast.literal_eval(requested.strip())  # a rendered list (templates render to str)
        except (ValueError, SyntaxError) as err:
            raise GGUFError(f"cannot read quantization types from {requested!r}",
                            fix="pass a list such as [\"Q8_0\", \"Q4_K_M\"]") from err
    items = requested if isinstance(requested, list | tuple) else str(requested).replace(",", " ").split()
    types = [str(t).strip().upper() for t in items if str(t).strip()]
    unknown = [t for t in types if t not in QUANT_TYPES]
    if not types or unknown:
        raise GGUFError(f"quantization type(s) {unknown or types!r} unknown to the pinned llama.cpp",
                        fix=f"use types from {list(QUANT_TYPES)} in quantize.types or the run's quant_types")
    if len(set(types)) != len(types):
        raise GGUFError(f"duplicate quantization types in {types!r}", fix="list each type once")
    iq = [t for t in types if t.startswith("IQ")]
    if iq and not imatrix.configured:
        raise GGUFError(f"quantization type(s) {iq} need an importance matrix, but no calibration text is configured",
                        fix="set quantize.imatrix.calibration_file (a text file) or quantize.imatrix.use_builtin_text:"
                            " true, or drop the IQ types")
    return types


class GGUFQuantizeOperator(_LlamaCppStage):
    """Quantize the converted f16 GGUF to ONE type (mapped: one task per type, retried alone).

    The output is read back: tensor types counted, real bits per weight computed, and the requested type
    must hold ``quantize.min_type_fraction`` of the matrix weights (else fail, or warn with
    ``quantize.on_fallback: warn``). With the fidelity gate enabled, its perplexity is compared to the f16's.

    :param model: the model's name in config/models.yaml.
    :param converted: the convert record (``base``, ``imatrix``, ``fidelity``). (templated)
    :param quant_type: the one llama.cpp type of this map index, e.g. ``Q4_K_M``. (templated)
    :param artifact_root: root of the artifact store. (templated)
    :param settings: the model's ``quantize`` section (or its ``model_dump()``, as ``partial()`` needs).
    :param fidelity: the model's ``fidelity`` section (or its ``model_dump()``); None or ``enabled: false`` skips it.
    :param llama_cpp_dir: a llama.cpp checkout to use instead of the pinned one.
    :param llama_cpp_bin_dir: a dir with llama-quantize / llama-imatrix to use instead of the pinned build.
    :param force: quantize again even if the output exists. (templated)
    :param workers: the model's ``workers`` section (memory budget: see :func:`operators.common.memory_guard`).

    Returns one file record ``{"quant", "path", "bytes", "sha256", "bits_per_weight", "weights_by_type",
    "type_fraction", "reused", "llama_cpp", "perplexity", "perplexity_f16", "ppl_ratio"}`` (+ ``shards``).
    """

    template_fields: Sequence[str] = ("converted", "quant_type", "artifact_root", "force")
    ui_color = "#ffe0b2"

    def __init__(self, *, converted: Any, quant_type: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.converted = converted
        self.quant_type = quant_type

    def execute(self, context: Context) -> dict[str, Any]:
        """Quantize (or reuse), validate the types used, then the perplexity gate."""
        from include.gguf.quantize import check_quant_used, quantize_gguf

        with engine_errors(self.model), memory_guard(self, context, "quantize", lambda: quantize_stage(
                Path(self.converted["base"]["path"]), str(self.quant_type), self.fidelity)):
            s = self.settings
            quant = validated_types([self.quant_type], s.imatrix)[0]
            base = dict(self.converted["base"])
            if quant == base["quant"]:
                return {**base, "perplexity": None, "perplexity_f16": None, "ppl_ratio": None}
            toolchain = _toolchain(self.llama_cpp_dir, self.llama_cpp_bin_dir)
            imatrix = self.converted.get("imatrix")
            if quant.startswith("IQ") and not imatrix:
                raise GGUFError(f"{quant} needs an importance matrix and the convert task computed none",
                                fix="configure quantize.imatrix.calibration_file or use_builtin_text")
            overrides = {"output_tensor_type": s.output_tensor_type, "token_embedding_type": s.token_embedding_type}
            min_fraction, on_fallback = s.min_type_fraction, s.on_fallback
            fraction: dict[str, float] = {}

            hashed: dict[str, str] = {}  # filled by quantize(): the store need not read the GGUF again

            def quantize(tmp: Path) -> dict[str, Any]:
                summary = quantize_gguf(
                    Path(base["path"]), tmp / f"{self.model}-{quant}.gguf", quant, toolchain=toolchain,
                    imatrix=Path(imatrix["path"]) if imatrix else None,
                    extra_kv={"lora_deploy.quant_type": quant, "lora_deploy.toolchain": toolchain.version},
                    keep_split=bool(base.get("shards")), **overrides)
                fraction["value"] = check_quant_used(summary, quant, min_fraction=min_fraction,
                                                          on_fallback=on_fallback)
                if summary.tensor_count != inspect_count(base["path"]):
                    raise GGUFError(f"{quant}: {summary.tensor_count} tensors, the f16 GGUF has a different count",
                                    fix="report this llama.cpp quantizer bug; try another quant type")
                hashed[Path(summary.path).relative_to(tmp).as_posix()] = summary.sha256
                return {"gguf": summary.as_record(), "type_fraction": round(fraction["value"], 4)}

            result = store_build(self.artifact_root, self.model, {
                "base": base["sha256"], "quant": quant, "llama_cpp": toolchain.version,
                "imatrix": imatrix["sha256"] if imatrix else None, "overrides": overrides,
                "min_type_fraction": min_fraction, "on_fallback": on_fallback}, quantize, as_bool(self.force),
                known_sha256=hashed)
            record = _file_record(quant, result, toolchain.version)
            self.log.info("%s: %.2f bits/weight, types %s", quant, record["bits_per_weight"],
                          record["weights_by_type"])
            return {**record, **self._perplexity(quant, Path(record["path"]), record["sha256"])}

    def _perplexity(self, quant: str, path: Path, sha256: str) -> dict[str, Any]:
        empty = {"perplexity": None, "perplexity_f16": None, "ppl_ratio": None}
        module, config = _fidelity(self.fidelity)
        text = _eval_text(module, config) if module is not None and config is not None else None
        if module is None or config is None or text is None:
            return empty
        n_ctx = config.n_ctx
        force = as_bool(self.force)
        ppl_f16 = (self.converted.get("fidelity") or {}).get("perplexity_f16")
        if ppl_f16 is None:
            ppl_f16 = cached_perplexity(self.artifact_root, self.model, module, self.converted["base"], text, n_ctx,
                                        force)
        ppl = cached_perplexity(self.artifact_root, self.model, module, {"path": str(path), "sha256": sha256},
                                text, n_ctx, force)
        checked = module.check_perplexity(quant, ppl, ppl_f16, max_ratio=module.max_ratio_for(config, quant),
                                          mode=config.mode)
        self.log.info("%s perplexity %.4f vs f16 %.4f (ratio %.4f)", quant, ppl, ppl_f16, checked["ratio"])
        return {"perplexity": ppl, "perplexity_f16": ppl_f16, "ppl_ratio": checked["ratio"]}


def inspect_count(path: str) -> int:
    """Tensor count of a GGUF, over all shards of a split one."""
    from include.gguf.reader import inspect_split

    return inspect_split(Path(path), with_sha256=False).tensor_count


def store_build(root: str, model: str, inputs: dict[str, Any], produce: Any, force: bool,
                known_sha256: dict[str, str] | None = None) -> StageResult:
    """``ArtifactStore(root).build(model, "gguf", inputs, produce)``: content-addressed, manifest last."""
    return ArtifactStore(root).build(model, "gguf", inputs, produce, force=force, known_sha256=known_sha256)


def quant_types_of(convert: GGUFConvertOperator, task_id: str = "quant_types", **task_kwargs: Any) -> Any:
    """A tiny task returning the convert record's validated types: what the mapped quantize task expands over.

    Airflow 3 cannot map over a custom XCom key (``convert.output["quant_types"]`` is the key
    ``quant_types``, and ``expand`` refuses it), so the list must be a task's return value::

        quantize = GGUFQuantizeOperator.partial(...).expand(quant_type=quant_types_of(convert))
    """
    from airflow.sdk import task

    @task(task_id=task_id, **task_kwargs)
    def pick(converted: dict[str, Any]) -> list[str]:
        return list(converted["quant_types"])

    return pick(convert.output)
