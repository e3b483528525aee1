"""The lora-deploy engine: plain Python, no Airflow import (see docs and DESIGN: dags -> operators -> include)."""
