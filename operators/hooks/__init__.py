"""Hooks: the only code that reads Airflow connections (training box over SSH, Vast.ai, Hugging Face Hub)."""
