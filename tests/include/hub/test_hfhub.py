"""include/hub/publish.py against the in-memory Hub stand-in, with the real huggingface_hub client."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError

from include.errors import ConfigError, PublishError
from include.hub.model_card import TEMPLATE_DIR
from include.hub.publish import HubTarget, publish_model, version_tag
from include.store.hashing import sha256_file
from include.units import format_bytes
from tests.stand_ins.hf_hub import HubStandIn

MODEL = "majora"
CARD = {
    "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
    "adapter_source": "vastai://12345678/workspace/out/majora/checkpoint-1200",
    "adapter_version": "checkpoint-1200",
    "health": {"latency_s": 1.234, "tokens_per_s": 42.5},
}


@pytest.fixture
def make_ggufs(tmp_path: Path) -> Callable[..., list[dict]]:
    """Factory of fake GGUF files (binary, so they go through LFS) with their records."""

    def make(quants: dict[str, int] | None = None, salt: bytes = b"") -> list[dict]:
        records = []
        for quant, size in (quants or {"Q4_K_M": 3000, "Q8_0": 5000}).items():
            path = tmp_path / f"{quant}{salt.hex()}.gguf"
            path.write_bytes(b"GGUF\x03\x00\x00\x00" + salt + quant.encode() * (size // len(quant)))
            records.append({"quant": quant, "path": str(path), "bytes": path.stat().st_size,
                            "sha256": sha256_file(path)})
        return records

    return make


def target_for(hub: HubStandIn, *, private: bool = False, space: bool = False, **kwargs: object) -> HubTarget:
    """A HubTarget in the stand-in user's namespace."""
    return HubTarget(repo_id=f"{hub.user}/{MODEL}-GGUF", space_id=f"{hub.user}/{MODEL}-chat" if space else None,
                     private=private, token=hub.token, endpoint=hub.url, **kwargs)  # type: ignore[arg-type]


def front_matter(text: str) -> dict:
    """The YAML metadata block of a README."""
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, text[:200]
    return yaml.safe_load(match.group(1))


def load_space_app() -> ModuleType:
    """The Space's app.py as a module (gradio / llama_cpp are only imported inside its functions)."""
    spec = importlib.util.spec_from_file_location("space_app", TEMPLATE_DIR / "app.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_publish_uploads_ggufs_through_lfs_in_one_commit_with_card_and_tag(hub, make_ggufs):
    ggufs = make_ggufs()
    target = target_for(hub)

    record = publish_model(model=MODEL, version="checkpoint-1200", target=target, ggufs=ggufs, card=CARD)

    repo = hub.repo(target.repo_id)
    names = [f"{MODEL}-Q4_K_M.gguf", f"{MODEL}-Q8_0.gguf"]
    assert record == {"repo_id": target.repo_id, "repo_url": f"{hub.url}/{target.repo_id}",
                      "version": "checkpoint-1200", "commit": repo.head.oid, "tag": "v-checkpoint-1200",
                      "revision": "v-checkpoint-1200", "main_moved": True, "files": names,
                      "space_id": None, "space_url": None, "space_action": None}
    assert len(repo.commits) == 2  # the Hub's initial commit + exactly one publish commit
    assert repo.private is False
    for name, gguf in zip(names, ggufs, strict=True):
        assert repo.files[name] == Path(gguf["path"]).read_bytes()
        assert repo.head.files[name].lfs, f"{name} was not uploaded through LFS"
    assert sum(1 for method, path in hub.requests if method == "PUT" and path.startswith("/lfs-upload/")) == 2
    assert repo.tags == {"v-checkpoint-1200": repo.head.oid}
    assert "checkpoint-1200" in repo.head.title

    readme = repo.files["README.md"].decode()
    meta = front_matter(readme)
    assert meta["base_model"] == CARD["base_model"]
    assert {"gguf", "lora", "llama.cpp"} <= set(meta["tags"])
    for name, gguf in zip(names, ggufs, strict=True):
        row = next(line for line in readme.splitlines() if line.startswith(f"| [{name}]"))
        assert gguf["sha256"] in row and gguf["quant"] in row and f"| {format_bytes(gguf['bytes'])} |" in row
    assert CARD["adapter_source"] in readme and "checkpoint-1200" in readme
    assert "| 1.23 | 42.50 |" in readme


def test_republishing_the_same_version_is_idempotent(hub, make_ggufs):
    ggufs = make_ggufs()
    target = target_for(hub)
    first = publish_model(model=MODEL, version="7", target=target, ggufs=ggufs, card=CARD)

    again = publish_model(model=MODEL, version="7", target=target, ggufs=ggufs, card=CARD)

    assert again == {**first, "main_moved": False}
    assert [r for r in hub.responses if r[:2] == ("POST", "/api/repos/create")] == [
        ("POST", "/api/repos/create", 200), ("POST", "/api/repos/create", 409)]
    assert len(hub.repo(target.repo_id).commits) == 2
    assert hub.repo(target.repo_id).tags == {"v-7": first["commit"]}


def test_new_version_adds_a_commit_removes_stale_quants_and_keeps_old_tags(hub, make_ggufs):
    target = target_for(hub)
    v1 = publish_model(model=MODEL, version="1", target=target, ggufs=make_ggufs(), card=CARD)

    v2_files = make_ggufs({"Q4_K_M": 4000}, salt=b"v2")
    v2 = publish_model(model=MODEL, version="2", target=target, ggufs=v2_files, card=CARD)

    repo = hub.repo(target.repo_id)
    assert v2["commit"] != v1["commit"] and v2["files"] == [f"{MODEL}-Q4_K_M.gguf"]
    assert sorted(p for p in repo.files if p.endswith(".gguf")) == [f"{MODEL}-Q4_K_M.gguf"]
    assert repo.tags == {"v-1": v1["commit"], "v-2": v2["commit"]}
    assert f"{MODEL}-Q8_0.gguf" in repo.resolve("v-1").files  # the old version stays reachable by its tag


def test_same_version_with_new_content_moves_its_tag(hub, make_ggufs):
    target = target_for(hub)
    first = publish_model(model=MODEL, version="3", target=target, ggufs=make_ggufs(), card=CARD)

    second = publish_model(model=MODEL, version="3", target=target, ggufs=make_ggufs(salt=b"x"), card=CARD)

    assert second["commit"] != first["commit"]
    assert hub.repo(target.repo_id).tags == {"v-3": second["commit"]}


def test_public_space_gets_app_and_variables_but_no_secret(hub, make_ggufs):
    target = target_for(hub, space=True, space_hardware="cpu-upgrade")

    record = publish_model(model=MODEL, version="1", target=target, ggufs=make_ggufs(), card=CARD)

    space = hub.repo(str(target.space_id), "space")
    assert record["space_id"] == target.space_id
    assert record["space_url"] == f"{hub.url}/spaces/{target.space_id}"
    assert record["space_action"] == "created"
    assert space.sdk == "gradio" and space.hardware == "cpu-upgrade" and space.private is False
    assert {k: v["value"] for k, v in space.variables.items()} == {
        "MODEL_REPO": target.repo_id, "MODEL_FILE": f"{MODEL}-Q4_K_M.gguf", "MODEL_REVISION": record["commit"],
        "SYSTEM_PROMPT": "You are a helpful assistant."}
    assert space.secrets == {}
    assert space.files["app.py"] == (TEMPLATE_DIR / "app.py").read_bytes()
    requirements = space.files["requirements.txt"].decode().splitlines()
    assert all("==" in line for line in requirements if line and not line.startswith("#"))
    meta = front_matter(space.files["README.md"].decode())
    assert (meta["sdk"], meta["app_file"], meta["suggested_hardware"]) == ("gradio", "app.py", "cpu-upgrade")
    assert meta["models"] == [target.repo_id] and re.fullmatch(r"\d+\.\d+\.\d+", meta["sdk_version"])
    assert space.stage == "BUILDING"


def test_private_target_makes_private_repos_and_sets_the_hf_token_secret(hub, make_ggufs):
    target = target_for(hub, private=True, space=True, space_token=hub.read_token)

    publish_model(model=MODEL, version="1", target=target, ggufs=make_ggufs(), card=CARD)

    space = hub.repo(str(target.space_id), "space")
    assert hub.repo(target.repo_id).private and space.private
    assert {k: v["value"] for k, v in space.secrets.items()} == {"HF_TOKEN": hub.read_token}


def test_republishing_to_a_space_only_changes_what_changed(hub, make_ggufs):
    target = target_for(hub, space=True)
    publish_model(model=MODEL, version="1", target=target, ggufs=make_ggufs(), card=CARD)
    before = len(hub.requests)

    publish_model(model=MODEL, version="1", target=target, ggufs=make_ggufs(), card=CARD)

    variable_posts = [r for r in hub.requests[before:] if r == ("POST", f"/api/spaces/{target.space_id}/variables")]
    assert variable_posts == []  # unchanged variables are not re-set (each change restarts the Space)
    assert len(hub.repo(str(target.space_id), "space").commits) == 2


def test_space_app_downloads_the_published_model(hub, make_ggufs, tmp_path):
    ggufs = make_ggufs()
    target = target_for(hub, private=True, space=True)
    publish_model(model=MODEL, version="1", target=target, ggufs=ggufs, card=CARD)
    space = hub.repo(str(target.space_id), "space")
    env = {k: v["value"] for k, v in {**space.variables, **space.secrets}.items()}
    app = load_space_app()

    settings = app.read_settings(env)
    path = app.download_model(settings, endpoint=hub.url, cache_dir=str(tmp_path / "cache"))

    assert Path(path).read_bytes() == Path(ggufs[0]["path"]).read_bytes()
    assert hub.token not in repr(settings)
    anonymous = app.read_settings({k: v for k, v in env.items() if k != "HF_TOKEN"})
    with pytest.raises(RepositoryNotFoundError):
        app.download_model(anonymous, endpoint=hub.url, cache_dir=str(tmp_path / "cache2"))


def test_space_app_turns_gradio_history_into_chat_messages():
    app = load_space_app()
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        ["legacy q", "legacy a"],
        {"role": "assistant", "content": {"path": "image.png"}},  # non-text content is skipped
    ]

    messages = app.to_messages("next?", history, system_prompt="be brief")

    assert messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "legacy q"},
                        {"role": "assistant", "content": "legacy a"}, {"role": "user", "content": "next?"}]
    with pytest.raises(RuntimeError, match="MODEL_FILE"):
        app.read_settings({"MODEL_REPO": "a/b"})


def test_bad_token_is_a_publish_error_naming_the_connection(hub, make_ggufs):
    target = HubTarget(repo_id=f"{hub.user}/x", space_id=None, private=False, token="hf_not_valid_123",
                       endpoint=hub.url)

    with pytest.raises(PublishError) as caught:
        publish_model(model=MODEL, version="1", target=target, ggufs=make_ggufs(), card=CARD)

    text = str(caught.value)
    assert "HTTP 401" in text and "Invalid credentials" in text and "huggingface_default" in text
    assert "hf_not_valid_123" not in text
    assert hub.repos == {}


def test_read_only_token_is_a_publish_error_asking_for_write_scope(hub, make_ggufs):
    target = HubTarget(repo_id=f"{hub.user}/x", space_id=None, private=False, token=hub.read_token,
                       endpoint=hub.url)

    with pytest.raises(PublishError, match=r"HTTP 403.*Fix: the token lacks write access"):
        publish_model(model=MODEL, version="1", target=target, ggufs=make_ggufs(), card=CARD)


def test_unreachable_endpoint_is_a_retryable_publish_error_after_bounded_retries(hub, make_ggufs):
    target = HubTarget(repo_id=f"{hub.user}/x", space_id=None, private=False, token=hub.token,
                       endpoint="http://127.0.0.1:9", max_retries=2)
    waits: list[float] = []

    with pytest.raises(PublishError, match="reachable") as caught:
        publish_model(model=MODEL, version="1", target=target, ggufs=make_ggufs(), card=CARD, sleep=waits.append)
    assert caught.value.retryable and waits == [1.0, 2.0]


def test_token_never_in_logs_record_files_or_repr(hub, make_ggufs, caplog):
    caplog.set_level(logging.DEBUG)
    target = target_for(hub, private=True, space=True)

    record = publish_model(model=MODEL, version="1", target=target, ggufs=make_ggufs(), card=CARD)

    assert "publishing 2 GGUF(s)" in caplog.text  # the engine's own progress lines were captured
    assert hub.token not in caplog.text
    assert hub.token not in json.dumps(record)
    assert hub.token not in repr(target) and "***" in repr(target)
    for repo in hub.repos.values():
        for commit in repo.commits:
            for path, blob in commit.files.items():
                assert hub.token.encode() not in blob.content, f"token in {repo.repo_id}/{path}"
        assert all(hub.token not in v["value"] for v in repo.variables.values())


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        ({"repo_id": "no-namespace"}, ConfigError, "hf.repo_id 'no-namespace'"),
        ({"space_id": "a/b/c"}, ConfigError, "hf.space_id 'a/b/c'"),
        ({"space_hardware": "GPU Please"}, ConfigError, "space_hardware"),
        ({"token": ""}, PublishError, "no Hugging Face token"),
    ],
)
def test_bad_target_fails_before_any_request(hub, make_ggufs, change, error, pattern):
    fields = {"repo_id": f"{hub.user}/m", "space_id": None, "private": False, "token": hub.token,
              "endpoint": hub.url, **change}

    with pytest.raises(error, match=re.escape(pattern)):
        publish_model(model=MODEL, version="1", target=HubTarget(**fields), ggufs=make_ggufs(), card=CARD)
    assert hub.requests == []


@pytest.mark.parametrize(
    ("corrupt", "pattern"),
    [
        (lambda g: g.update(bytes=g["bytes"] + 1), "bytes, its record says"),
        (lambda g: g.update(sha256="0" * 64), "has sha256"),
        (lambda g: g.update(path="/nonexistent/x.gguf"), "does not exist"),
        (lambda g: g.update(quant="Q4 K M"), "quant 'Q4 K M'"),
    ],
)
def test_bad_gguf_records_fail_before_any_request(hub, make_ggufs, corrupt, pattern):
    ggufs = make_ggufs()
    corrupt(ggufs[1])

    with pytest.raises(PublishError, match=re.escape(pattern)):
        publish_model(model=MODEL, version="1", target=target_for(hub), ggufs=ggufs, card=CARD)
    assert hub.requests == []


def test_local_base_model_is_kept_out_of_the_card_metadata(hub, make_ggufs, tmp_path):
    card = {**CARD, "base_model": str(tmp_path)}

    publish_model(model=MODEL, version="1", target=target_for(hub), ggufs=make_ggufs(), card=card)

    readme = hub.repo(f"{hub.user}/{MODEL}-GGUF").files["README.md"].decode()
    assert "base_model" not in front_matter(readme)  # the Hub rejects a path as base_model
    assert str(tmp_path) in readme


@pytest.mark.parametrize(
    ("version", "tag"),
    [
        ("checkpoint-1200", "v-checkpoint-1200"),
        ("2024-06-01T03:00:00+00:00", "v-2024-06-01T03-00-00+00-00"),
        ("a b/c~d^e", "v-a-b-c-d-e"),
        ("x..y.", "v-x.y"),
        ("release.lock", "v-release-lock"),
    ],
)
def test_version_tag_is_a_valid_git_tag(version, tag):
    assert version_tag(version) == tag


def test_long_versions_get_distinct_short_tags():
    first, second = version_tag("x" * 300 + "1"), version_tag("x" * 300 + "2")

    assert first != second and len(first) <= 100 and len(second) <= 100


def test_stand_in_space_runtime_walks_its_build_stages(hub, make_ggufs):
    hub.space_build_stages = ["BUILDING", "RUNTIME_ERROR"]
    target = target_for(hub, space=True)
    publish_model(model=MODEL, version="1", target=target, ggufs=make_ggufs(), card=CARD)
    api = HfApi(endpoint=hub.url, token=hub.token)

    stages = [api.get_space_runtime(str(target.space_id)).stage for _ in range(3)]
    restarted = api.restart_space(str(target.space_id)).stage

    assert (stages, restarted) == (["BUILDING", "RUNTIME_ERROR", "RUNTIME_ERROR"], "BUILDING")


def test_stand_in_rejects_card_metadata_the_hub_rejects(hub):
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(f"{hub.user}/card")

    with pytest.raises(ValueError, match="not a valid model id"):
        api.upload_file(path_or_fileobj=b"---\nbase_model: /local/path\n---\n", path_in_repo="README.md",
                        repo_id=f"{hub.user}/card")
    assert len(hub.repo(f"{hub.user}/card").commits) == 1
