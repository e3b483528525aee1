"""LoRA merging: adapter inspection, the streaming merge (numpy, constant memory), backends, fused edits."""
