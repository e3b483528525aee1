"""Extra links shown on task instances (Hugging Face repo and Space)."""
