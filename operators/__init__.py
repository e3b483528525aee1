"""The Airflow layer: one module per operator/sensor; each is thin over the engine in ``include``."""
