"""Health checks of a served model: the smoke server of a GGUF and the live OpenAI-compatible endpoint."""
