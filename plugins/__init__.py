"""Airflow plugins of lora-deploy (the Deployments view and operator extra links come with later issues)."""
