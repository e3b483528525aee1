"""Health checks of a served model: ``endpoint`` (an OpenAI-compatible endpoint: listing, chat, figures) and
``smoke`` (the ephemeral llama.cpp server of a GGUF, file checks, free resources)."""
