"""Start a deploy from a training job: a client of Airflow's REST API (a run with conf, or an asset event).

``python -m include.trigger`` is the same command as ``lora-deploy-trigger`` (:mod:`include.cli.trigger`).
"""
