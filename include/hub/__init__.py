"""The Hugging Face Hub: the GGUF model repo (commits, tags, card) and its Gradio Space."""
