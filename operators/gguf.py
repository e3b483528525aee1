"""GGUFQuantizeOperator: convert the merged model to GGUF with the pinned llama.cpp and quantize it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context

from include.artifacts import ArtifactStore, StageResult
from include.errors import GGUFError
from include.toolchain import LlamaCppToolchain, pinned_toolchain
from operators._engine import as_bool, engine_errors


class GGUFQuantizeOperator(BaseOperator):
    """Convert a merged model (the merge record) to an f16 GGUF, then quantize it to each requested type.

    Every output is read back and checked: GGUF magic, tensor count equal to the f16's, and the requested
    type really used for most weights (llama.cpp silently falls back on odd row sizes).

    :param model: the model's name in config/models.yaml.
    :param merged: the merge record (``path``, ``sha256``). (templated)
    :param quant_types: llama.cpp types, e.g. ``["Q8_0", "Q4_K_M"]``. (templated)
    :param artifact_root: root of the artifact store. (templated)
    :param outtype: the converter's output type (f16, bf16, f32).
    :param min_type_fraction: share of weights that must have the requested type.
    :param llama_cpp_dir: a llama.cpp checkout to use instead of the pinned one. (templated)
    :param force: convert and quantize again even if the outputs exist. (templated)

    Returns ``{"llama_cpp", "base": {...}, "files": [{"quant", "path", "bytes", "sha256", "bits_per_weight",
    "weights_by_type", "reused"}]}``.
    """

    template_fields: Sequence[str] = ("merged", "quant_types", "artifact_root", "llama_cpp_dir", "force")
    ui_color = "#fff3e0"

    def __init__(
        self,
        *,
        model: str,
        merged: Any,
        quant_types: Any,
        artifact_root: str,
        outtype: str = "f16",
        min_type_fraction: float = 0.5,
        llama_cpp_dir: str | None = None,
        force: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.merged = merged
        self.quant_types = quant_types
        self.artifact_root = artifact_root
        self.outtype = outtype
        self.min_type_fraction = min_type_fraction
        self.llama_cpp_dir = llama_cpp_dir
        self.force = force

    def execute(self, context: Context) -> dict[str, Any]:
        """Check the types, convert once, quantize per type, validate every file."""
        from include import gguf

        with engine_errors(self.model):
            types = self._checked_types(gguf.known_quant_types())
            toolchain = self._toolchain()
            store = ArtifactStore(self.artifact_root)
            force = as_bool(self.force)

            metadata = {"general.name": self.model, "general.version": str(self.merged.get("adapter_version", ""))}

            def convert(tmp: Path) -> dict[str, Any]:
                summary = gguf.convert_to_gguf(Path(self.merged["path"]), tmp / f"model-{self.outtype}.gguf",
                                               toolchain=toolchain, outtype=self.outtype, metadata=metadata)
                return {"gguf": summary.as_record()}

            base = store.build(self.model, "gguf", {"merged": self.merged["sha256"], "outtype": self.outtype,
                                                    "metadata": metadata, "llama_cpp": toolchain.version},
                               convert, force=force)
            base_file = Path(_file_record(self.outtype.upper(), base)["path"])
            files = []
            for quant in types:
                if quant == self.outtype.upper():
                    files.append(_file_record(quant, base))
                    continue

                def quantize(tmp: Path, quant: str = quant) -> dict[str, Any]:
                    summary = gguf.quantize_gguf(base_file, tmp / f"model-{quant}.gguf", quant)
                    gguf.check_quant_used(summary, quant, min_fraction=self.min_type_fraction)
                    if summary.tensor_count != base.manifest["gguf"]["tensor_count"]:
                        raise GGUFError(f"{quant}: {summary.tensor_count} tensors, the {self.outtype} GGUF has "
                                        f"{base.manifest['gguf']['tensor_count']}",
                                        fix="report this llama.cpp quantizer bug; try another quant type")
                    return {"gguf": summary.as_record()}

                files.append(_file_record(quant, store.build(
                    self.model, "gguf", {"base": base.manifest["sha256"], "quant": quant,
                                         "llama_cpp": toolchain.version}, quantize, force=force)))
        return {"llama_cpp": toolchain.version, "base": _file_record(self.outtype.upper(), base), "files": files,
                "reused": base.reused and all(f["reused"] for f in files)}

    def _checked_types(self, known: dict[str, int]) -> list[str]:
        requested = self.quant_types if isinstance(self.quant_types, list) else [self.quant_types]
        types = [str(t).strip().upper() for t in requested]
        unknown = [t for t in types if t not in known]
        if not types or unknown:
            raise GGUFError(f"quantization type(s) {unknown or types!r} unknown to llama.cpp",
                            fix=f"use types from {sorted(known)} in quantize.types or the run's quant_types")
        return types

    def _toolchain(self) -> LlamaCppToolchain:
        toolchain = (LlamaCppToolchain(Path(self.llama_cpp_dir), version=f"llama.cpp checkout {self.llama_cpp_dir}")
                     if self.llama_cpp_dir else pinned_toolchain())
        try:
            toolchain.check()
        except Exception as err:
            raise GGUFError(str(err), fix="run the setup script again, or fix settings.llama_cpp_dir") from err
        return toolchain


def _file_record(quant: str, result: StageResult) -> dict[str, Any]:
    gguf = result.manifest["gguf"]
    path = result.path / Path(gguf["path"]).name
    return {"quant": quant, "path": str(path), "bytes": gguf["bytes"], "sha256": gguf["sha256"],
            "bits_per_weight": gguf["bits_per_weight"], "weights_by_type": gguf["weights_by_type"],
            "reused": result.reused}
