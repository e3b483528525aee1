"""The trigger client's command line turns flags into the run's conf (no secrets on the command line)."""

from __future__ import annotations

from include.cli.trigger import _parser, _payload


def test_run_flags_become_conf():
    args = _parser().parse_args(["run", "majora", "--adapter-version", "checkpoint-300", "--instance-id", "42",
                                 "--dry-run", "--promote"])
    assert _payload(args) == {"adapter_version": "checkpoint-300", "instance_id": "42", "dry_run": True,
                              "promote": True}


def test_asset_events_carry_only_the_adapter_and_instance():
    args = _parser().parse_args(["asset", "majora", "--adapter-version", "checkpoint-300"])
    assert _payload(args) == {"adapter_version": "checkpoint-300"}
