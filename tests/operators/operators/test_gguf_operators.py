"""GGUFConvertOperator + mapped GGUFQuantizeOperator in a small real DAG (dag.test()), and their failure paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from include.config.sections import FidelitySettings, ImatrixSettings, QuantizeSettings
from include.gguf.toolchain import PINNED_VERSION, ensure_tools
from operators.operators.gguf import GGUFConvertOperator, GGUFQuantizeOperator, validated_types
from tests.gguf_helpers import tiny_gguf


@pytest.fixture(scope="session")
def merged(gguf_root: Path) -> dict[str, Any]:
    """A merge record pointing at the tiny model (a merged model is a plain HF model directory)."""
    tiny_gguf(gguf_root, "f16")  # makes tiny-base
    return {"path": str(gguf_root / "tiny-base"), "sha256": "tiny-base-v1", "adapter_version": "checkpoint-20",
            "base_model": "org/tiny-base"}


def settings(**changes: Any) -> dict[str, Any]:
    """QuantizeSettings as the DAG hands them over (model_dump(mode="json"))."""
    return QuantizeSettings(**changes).model_dump(mode="json")


class _TI:
    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


DAG_FILE = """
from datetime import datetime
from airflow.sdk import DAG
from operators.operators.gguf import GGUFConvertOperator, GGUFQuantizeOperator, quant_types_of

ARGS = {args!r}
with DAG("gguf_mapping_test", schedule=None, start_date=datetime(2026, 1, 1), render_template_as_native_obj=True,
         params={{"quant_types": ARGS["types"], "force": False}}) as dag:
    convert = GGUFConvertOperator(task_id="convert", model="demo", merged=ARGS["merged"], adapter={{"version": "c20"}},
                                  quant_types="{{{{ params.quant_types }}}}", artifact_root=ARGS["root"],
                                  settings=ARGS["settings"], fidelity=ARGS["fidelity"], force="{{{{ params.force }}}}")
    GGUFQuantizeOperator.partial(
        task_id="quantize", model="demo", converted=convert.output, artifact_root=ARGS["root"],
        settings=ARGS["settings"], fidelity=ARGS["fidelity"], force="{{{{ params.force }}}}",
        map_index_template="{{{{ task.quant_type }}}}",
    ).expand(quant_type=quant_types_of(convert))
"""


def test_dag_maps_one_quantize_task_per_type(tmp_path: Path, merged: dict[str, Any], airflow_db: None) -> None:
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    ensure_tools()
    types = ["F16", "Q8_0", "Q4_K_M", "IQ4_XS"]
    quant = settings(types=types, imatrix={"use_builtin_text": True}, output_tensor_type="Q8_0")
    args = {"types": types, "merged": merged, "root": str(tmp_path / "store"), "settings": quant,
            "fidelity": FidelitySettings().model_dump(mode="json")}
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "gguf_mapping_test.py").write_text(DAG_FILE.format(args=args))
    DagBundlesManager().sync_bundles_to_db()
    bag = BundleDagBag(dag_folder=str(dags), bundle_path=dags, bundle_name="dags-folder")
    assert "gguf_mapping_test" in bag.dags, bag.import_errors
    sync_bag_to_db(bag, "dags-folder", None)  # serialized like the dag-processor does, so dag.test() can run it
    dag = bag.dags["gguf_mapping_test"]
    dag_run = dag.test()
    assert str(dag_run.state) == "success"
    tis = sorted((ti for ti in dag_run.get_task_instances() if ti.task_id == "quantize"), key=lambda t: t.map_index)
    assert [ti.rendered_map_index for ti in tis] == ["F16", "Q8_0", "Q4_K_M", "IQ4_XS"]
    records = [ti.xcom_pull(task_ids="quantize", map_indexes=ti.map_index) for ti in tis]
    convert_ti = next(ti for ti in dag_run.get_task_instances() if ti.task_id == "convert")
    converted = convert_ti.xcom_pull(task_ids="convert")
    assert converted["quant_types"] == ["F16", "Q8_0", "Q4_K_M", "IQ4_XS"]
    assert convert_ti.xcom_pull(task_ids="convert", key="quant_types") == converted["quant_types"]
    assert converted["llama_cpp"] == PINNED_VERSION and converted["imatrix"]["sha256"]
    assert converted["tokenizer"]["kind"] == "sentencepiece" and converted["tokenizer"]["comparison"]["equal"]
    assert records[0] == {**converted["base"], "perplexity": None, "perplexity_f16": None, "ppl_ratio": None}
    for record, quant_name, main in zip(records[1:], ["Q8_0", "Q4_K_M", "IQ4_XS"], ["Q8_0", "Q4_K", "IQ4_XS"],
                                        strict=True):
        assert record["quant"] == quant_name and record["llama_cpp"] == PINNED_VERSION
        assert record["type_fraction"] >= 0.5 and record["weights_by_type"][main] > 0
        assert Path(record["path"]).is_file() and record["reused"] is False
        assert record["perplexity_f16"] == converted["fidelity"]["perplexity_f16"]
        assert record["ppl_ratio"] == pytest.approx(record["perplexity"] / record["perplexity_f16"], rel=1e-3)
    assert converted["fidelity"]["passed"] is True and converted["fidelity"]["max_abs_diff"] < 1.0
    assert records[2]["bits_per_weight"] < records[1]["bits_per_weight"] < records[0]["bits_per_weight"]
    assert records[2]["weights_by_type"]["Q8_0"] == 1000 * 256  # output_tensor_type override


def test_rerun_reuses_and_fallback_warn_mode(tmp_path: Path, gguf_root: Path) -> None:
    tiny_gguf(gguf_root, "narrow-f16")
    narrow = {"path": str(gguf_root / "narrow-base"), "sha256": "narrow-v1", "adapter_version": "v1"}
    root = str(tmp_path / "store")
    converted = None
    for attempt in range(2):
        ti = _TI()
        converted = GGUFConvertOperator(task_id="convert", model="narrow", merged=narrow, adapter={},
                                        quant_types=["Q4_K_M"], artifact_root=root,
                                        settings=settings(types=["Q4_K_M"])).execute({"ti": ti})
        assert converted["base"]["reused"] is (attempt == 1)
        assert ti.pushed == {"quant_types": ["Q4_K_M"]}
    quantize = GGUFQuantizeOperator(task_id="quantize", model="narrow", converted=converted, quant_type="Q4_K_M",
                                    artifact_root=root, settings=settings(types=["Q4_K_M"]))
    with pytest.raises(AirflowFailException, match="multiples of 256"):
        quantize.execute({})
    assert not [p for p in (tmp_path / "store" / "narrow" / "gguf").iterdir() if p.name.startswith(".")]
    warn = GGUFQuantizeOperator(task_id="quantize", model="narrow", converted=converted, quant_type="Q4_K_M",
                                artifact_root=root, settings=settings(types=["Q4_K_M"], on_fallback="warn"))
    record = warn.execute({})
    assert record["type_fraction"] < 0.5 and record["reused"] is False
    assert warn.execute({})["reused"] is True


def test_bad_types_fail_fast_naming_the_fix(tmp_path: Path, merged: dict[str, Any]) -> None:
    op = GGUFConvertOperator(task_id="convert", model="demo", merged=merged, adapter={}, quant_types=["Q4_K_XL"],
                             artifact_root=str(tmp_path), settings=settings())
    with pytest.raises(AirflowFailException, match=r"\['Q4_K_XL'\] unknown .*Fix: use types from"):
        op.execute({"ti": _TI()})
    op.quant_types = "['IQ2_XS']"  # a run param asking for an IQ type without calibration
    with pytest.raises(AirflowFailException, match=r"need an importance matrix.*quantize.imatrix"):
        op.execute({"ti": _TI()})
    assert not (tmp_path / "demo").exists()  # failed before anything was written
    assert validated_types("Q8_0, q4_k_m", ImatrixSettings()) == ["Q8_0", "Q4_K_M"]


def test_unknown_bpe_tokenizer_fails_convert_before_converting(tmp_path: Path) -> None:
    from tests.fixtures.tiny_model import make_base_model

    make_base_model(tmp_path / "bpe", tokenizer="bpe")
    record = {"path": str(tmp_path / "bpe"), "sha256": "bpe", "adapter_version": "v1"}
    op = GGUFConvertOperator(task_id="convert", model="bpe", merged=record, adapter={}, quant_types=["Q8_0"],
                             artifact_root=str(tmp_path / "store"), settings=settings())
    with pytest.raises(AirflowFailException, match=r"unknown to this llama.cpp.*quantize.pre_tokenizer"):
        op.execute({"ti": _TI()})
    assert not (tmp_path / "store").exists()


def test_constructors_do_no_io_and_document_templated_fields() -> None:
    ops = [GGUFConvertOperator(task_id="convert", model="m", merged={}, adapter={}, quant_types=["Q8_0"],
                               artifact_root="/nonexistent", settings={}),
           GGUFQuantizeOperator(task_id="quantize", model="m", converted={}, quant_type="Q8_0",
                                artifact_root="/nonexistent", settings={})]
    for op in ops:
        for name in op.template_fields:
            assert hasattr(op, name) and f":param {name}:" in (type(op).__doc__ or "")
