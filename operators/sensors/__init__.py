"""Sensors: the health checks of a served model and the Hugging Face Space runtime."""
