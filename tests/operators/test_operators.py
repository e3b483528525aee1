"""The Airflow layer: declarative constructors, templated fields, and engine errors mapped to Airflow's."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

from include.errors import ConfigError, HealthError
from operators.common import as_bool, engine_errors
from operators.operators.download import VastAIDownloadOperator
from operators.operators.gguf import GGUFConvertOperator, GGUFQuantizeOperator
from operators.operators.gguf_asset import GGUFCollectOperator
from operators.operators.hf_space import HFSpaceDeployOperator
from operators.operators.lmstudio import LMStudioDeployOperator
from operators.operators.merge import MergeOperator
from operators.operators.plan import DeployPlanOperator
from operators.operators.promote import LMStudioPromoteOperator, LMStudioRollbackOperator
from operators.sensors.health import HealthCheckSensor
from operators.sensors.hf_space import HFSpaceRuntimeSensor

NOWHERE = "/nonexistent/lora-deploy"


def all_operators():
    """One instance of each operator, built with paths that do not exist (constructors must do no I/O)."""
    return [
        DeployPlanOperator(task_id="plan", model="m", artifact_root=NOWHERE, source={"kind": "local", "path": NOWHERE},
                           base_model=NOWHERE),
        VastAIDownloadOperator(task_id="download", model="m", artifact_root=NOWHERE, source_kind="local",
                               source_path=NOWHERE),
        MergeOperator(task_id="merge", model="m", adapter={}, base_model=NOWHERE, artifact_root=NOWHERE),
        GGUFConvertOperator(task_id="convert", model="m", merged={}, adapter={}, quant_types=["Q8_0"],
                            artifact_root=NOWHERE, settings={}),
        GGUFQuantizeOperator(task_id="quantize", model="m", converted={}, quant_type="Q8_0", artifact_root=NOWHERE,
                             settings={}),
        GGUFCollectOperator(task_id="ggufs", model="m", converted={}, quantized=[], adapter={}),
        LMStudioDeployOperator(task_id="install", model="m", ggufs={}, adapter={}, artifact_root=NOWHERE, settings={}),
        HealthCheckSensor(task_id="smoke", model="m", installed={}, phase="smoke", settings={}, artifact_root=NOWHERE),
        LMStudioPromoteOperator(task_id="promote", model="m", artifact_root=NOWHERE, settings={}),
        LMStudioRollbackOperator(task_id="rollback", model="m", artifact_root=NOWHERE, settings={}),
        HFSpaceDeployOperator(task_id="publish", model="m", ggufs={}, adapter={}, settings=None),
        HFSpaceRuntimeSensor(task_id="space_ready", model="m", published={}, settings=None),
    ]


@pytest.mark.parametrize("operator", all_operators(), ids=lambda op: type(op).__name__)
def test_templated_fields_are_attributes_and_documented(operator):
    assert operator.template_fields, f"{type(operator).__name__} declares no template_fields"
    for name in operator.template_fields:
        assert hasattr(operator, name), f"{type(operator).__name__}.{name} is templated but not set"
        assert f":param {name}:" in (type(operator).__doc__ or ""), f"{type(operator).__name__} documents no {name}"


def test_non_retryable_engine_errors_fail_at_once_with_the_model_named():
    with pytest.raises(AirflowFailException, match=r"model 'majora': bad value\. Fix: do this"), \
            engine_errors("majora"):
        raise ConfigError("bad value", fix="do this")


def test_retryable_engine_errors_are_left_to_the_retry_policy():
    with pytest.raises(HealthError, match="model 'majora'"), engine_errors("majora"):
        raise HealthError("endpoint down")


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), ("True", True), ("false", False),
                                                 ("False", False), ("", False), (None, False)])
def test_rendered_force_flags_are_read_as_booleans(value, expected):
    assert as_bool(value) is expected
