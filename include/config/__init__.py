"""config/models.yaml: the typed schema (pydantic sections), the loader and the Airflow pools it declares."""
