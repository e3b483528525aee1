"""Gradio chat UI for a GGUF model on a Hugging Face Space (written by lora-deploy).

At start it downloads ``MODEL_FILE`` from the model repo ``MODEL_REPO`` (at ``MODEL_REVISION`` when set,
with the ``HF_TOKEN`` secret for private repos) and serves it with llama-cpp-python on the CPU.
Optional variables: ``N_CTX`` (default 4096), ``MAX_TOKENS`` (default 512), ``SYSTEM_PROMPT``; ``MODEL_PATH``
(a local GGUF, used instead of downloading: for running the app offline).
gradio and llama_cpp are imported inside functions, so the helpers can be imported without them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("lora-deploy-space")


@dataclass(frozen=True)
class Settings:
    """What the app needs, read from the Space's variables and secrets."""

    model_repo: str
    model_file: str
    revision: str | None
    token: str | None
    n_ctx: int
    max_tokens: int
    system_prompt: str | None
    model_path: str | None = None

    def __repr__(self) -> str:
        return f"Settings(model_repo={self.model_repo!r}, model_file={self.model_file!r}, revision={self.revision!r})"


def read_settings(env: Mapping[str, str]) -> Settings:
    """Settings from an environment mapping; a clear error names the missing Space variable."""
    missing = [] if env.get("MODEL_PATH") else [key for key in ("MODEL_REPO", "MODEL_FILE") if not env.get(key)]
    if missing:
        raise RuntimeError(f"Space variable(s) {', '.join(missing)} not set: set them in the Space settings.")
    return Settings(
        model_repo=env.get("MODEL_REPO") or "local",
        model_file=env.get("MODEL_FILE") or os.path.basename(env.get("MODEL_PATH") or ""),
        revision=env.get("MODEL_REVISION") or None,
        token=env.get("HF_TOKEN") or None,
        n_ctx=int(env.get("N_CTX") or 4096),
        max_tokens=int(env.get("MAX_TOKENS") or 512),
        system_prompt=env.get("SYSTEM_PROMPT") or None,
        model_path=env.get("MODEL_PATH") or None,
    )


def download_model(settings: Settings, *, endpoint: str | None = None, cache_dir: str | None = None) -> str:
    """Local path of the GGUF: ``MODEL_PATH``, else downloaded from the Hub (cached across restarts)."""
    if settings.model_path:
        if not os.path.isfile(settings.model_path):
            raise RuntimeError(f"MODEL_PATH {settings.model_path!r} is not a file")
        return settings.model_path
    from huggingface_hub import hf_hub_download

    log.info("downloading %s from %s @ %s", settings.model_file, settings.model_repo, settings.revision or "main")
    return hf_hub_download(
        repo_id=settings.model_repo,
        filename=settings.model_file,
        revision=settings.revision,
        token=settings.token,
        endpoint=endpoint,
        cache_dir=cache_dir,
    )


def _text(content: Any) -> str:
    """Text of a Gradio message content: a string, a list of parts or a dict with ``text``."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return ""


def to_messages(message: str, history: list[Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """OpenAI-style messages for llama.cpp from Gradio's history (messages or legacy pairs) and the new message."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for item in history:
        if isinstance(item, dict) and item.get("role") in ("user", "assistant"):
            text = _text(item.get("content"))
            if text:
                messages.append({"role": item["role"], "content": text})
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            for role, content in zip(("user", "assistant"), item, strict=True):
                if _text(content):
                    messages.append({"role": role, "content": _text(content)})
    messages.append({"role": "user", "content": message})
    return messages


def stream_reply(llm: Any, messages: list[dict[str, str]], max_tokens: int) -> Iterator[str]:
    """Yield the growing answer while llama.cpp streams chat-completion chunks."""
    answer = ""
    for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens, stream=True):
        answer += chunk["choices"][0].get("delta", {}).get("content") or ""
        yield answer


def make_responder(llm: Any, settings: Settings) -> Any:
    """The chat function the UI calls: ``respond(message, history)`` yields the growing answer."""

    def respond(message: str, history: list[Any]) -> Iterator[str]:
        yield from stream_reply(llm, to_messages(message, history, settings.system_prompt), settings.max_tokens)

    return respond


def build_app(llm: Any, settings: Settings) -> Any:
    """The Gradio ChatInterface around a loaded ``llama_cpp.Llama``."""
    import gradio as gr

    return gr.ChatInterface(
        make_responder(llm, settings),
        title=f"{settings.model_repo} ({settings.model_file})",
        description="GGUF model served with llama.cpp on CPU, published by lora-deploy.",
    )


def main() -> None:
    """Download the model, load it and launch the chat UI."""
    from llama_cpp import Llama

    logging.basicConfig(level=logging.INFO)
    settings = read_settings(os.environ)
    path = download_model(settings)
    llm = Llama(model_path=path, n_ctx=settings.n_ctx, n_threads=os.cpu_count() or 2, verbose=False)
    build_app(llm, settings).launch()


if __name__ == "__main__":
    main()
