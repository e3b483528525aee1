"""Hooks: the only code that reads Airflow connections, one module per external system.

- ``training_box``: :class:`TrainingBoxHook`, the SSH provider's ``SSHHook`` with lora-deploy's secure defaults;
- ``vastai``: :class:`VastAIHook`, the Vast.ai API key and URL -> an engine ``VastAIClient``;
- ``huggingface``: :class:`HuggingFaceHook`, the Hub token and endpoint (sync, and async for triggers);
- ``slack``: the slack provider's webhook hook, plus the existence check the notifier needs.

Operators, sensors and triggers name a conn id and build the hook from it (``tests/test_architecture.py``
fails on a ``get_connection`` anywhere else).
"""
