"""The lora-deploy engine: plain Python, no Airflow import (dags -> operators -> include, never backwards).

One package per concern, each depending only on the ones listed before it:

- ``errors``: every engine error, grouped by stage;
- ``store``: the content-addressed artifact store, hashing, file placement;
- ``config``: config/models.yaml's schema (pydantic sections), the loader, the pools it declares;
- ``source``: where adapters come from (local dir, SSH box, Vast.ai), transfers, the download stage;
- ``merge``: adapter inspection, the streaming merge, backends, merged tensors on demand;
- ``gguf``: the pinned llama.cpp toolchain, conversion (plain or fused), quantization, tokenizer, fidelity;
- ``lmstudio``: the versioned models tree, the deployments ledger, install/promote/rollback;
- ``health``: smoke and live checks of a served model;
- ``hub``: the Hugging Face model repo and Space;
- ``plan``, ``notify``, ``trigger``, ``deployments``: the deploy plan, Slack texts, the REST trigger client,
  the Deployments page's data;
- ``cli``: every command-line entry point.

docs/architecture.md has the tree and the rules (enforced by tests/test_architecture.py).
"""
