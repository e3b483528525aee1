"""Which vocab reader llama.cpp's converter will use for a model directory, read from the converter's own source.

``convert_hf_to_gguf.py`` picks a model class by ``config.json``'s architecture, and that class's ``set_vocab()``
picks a vocab reader. Only one reader cares about the BPE pre-tokenizer hash (``_set_vocab_gpt2``, which
aborts on an unknown hash); the others take ``tokenizer.model`` (SentencePiece), a SentencePiece-style
``tokenizer.json`` (``_set_vocab_llama_hf``) or something else, and some architectures require a file.

How the decision is made, and kept honest against a llama.cpp upgrade:

- :func:`set_vocab_of` parses the converter's sources with :mod:`ast`: the class registered for the
  architecture (``@ModelBase.register``), the class whose ``set_vocab`` it inherits, and a *fingerprint* of
  that method (the readers it calls, the exceptions it catches or raises, the file names and tokenizer
  classes it tests, in source order).
- :data:`ROUTES` maps each fingerprint this project understands to a :class:`Route`: the steps the converter
  takes, in order. A fingerprint missing from the table (a converter whose ``set_vocab`` changed, an
  architecture not listed) gives the ``unchecked`` decision: nothing is refused, the converter decides and the
  token comparison after conversion checks the result. A test pins the table against the pinned converter.
- :func:`vocab_route` walks a route's steps over the files of a model directory. A file the converter needs
  and the directory lacks raises :class:`~include.errors.GGUFError` naming that file.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from include.errors import GGUFError

# Fingerprint parts: names of the converter's vocab readers, and constants that name files.
_READER_PREFIX = "_set_vocab_"
_FILE_NAME = re.compile(r"^[\w.-]+\.(?:json|model|txt|tiktoken)$")


@dataclass(frozen=True)
class Step:
    """One thing a ``set_vocab`` tries. ``kind``:

    - ``arch``: when config.json's first architecture is ``arg``, the converter takes reader ``outcome``;
    - ``tekken``: ``tekken.json`` without ``tokenizer.json`` -> the Mistral (tekken) reader;
    - ``tokenizer_class``: ``tokenizer_config.json``'s ``tokenizer_class`` equals ``arg`` -> ``outcome``
      (``strict``: the converter indexes the key, so a config without it aborts the conversion);
    - ``sentencepiece``: ``tokenizer.model`` is read when present (``required``: else the converter aborts);
    - ``llama-hf``: a SentencePiece-style ``tokenizer.json`` (BPE model with byte fallback, a ``Sequence``
      decoder) is read when present;
    - ``bpe``: the tokenizer is loaded with ``AutoTokenizer`` and the pre-tokenizer hash is looked up.
    """

    kind: str
    arg: str = ""
    outcome: str = ""
    required: bool = False


@dataclass(frozen=True)
class Route:
    """The steps one ``set_vocab`` of the converter takes, keyed by that method's fingerprint."""

    name: str
    fingerprint: str
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class VocabRoute:
    """The decision for one model directory: which reader the converter will use, and why.

    ``reader``: ``sentencepiece`` (tokenizer.model), ``llama-hf`` (SentencePiece-style tokenizer.json),
    ``bpe`` (the pre-tokenizer hash matters), ``other`` (a reader without a hash table, see ``detail``) or
    ``unchecked`` (this project does not know the route: the converter decides).
    """

    architecture: str | None
    converter_class: str | None
    route: str | None
    reader: str
    detail: str


_SPM, _BPE, _LLAMA_HF = Step("sentencepiece"), Step("bpe"), Step("llama-hf")
_SPM_OR_BPE = "try: sentencepiece except FileNotFoundError: gpt2 end"

ROUTES: tuple[Route, ...] = (
    # LlamaModel (Llama, Mistral, Mixtral, ...): guards for other formats, then SentencePiece, llama-hf, BPE.
    Route("llama", "if 'GlmasrModel': glmedge end if: mistral end 'tekken.json' 'tokenizer.json' if: mistral end "
                   "'tokenizer_config.json' if: if 'HybridDNATokenizer' 'tokenizer_class': hybriddna end end "
                   "try: sentencepiece except FileNotFoundError: try: llama_hf except FileNotFoundError,TypeError: "
                   "gpt2 end end",
          (Step("arch", "GlmasrModel", "glmedge"), Step("tekken", outcome="mistral"),
           Step("tokenizer_class", "HybridDNATokenizer", "hybriddna"), _SPM, _LLAMA_HF, _BPE)),
    # Qwen2Model: SentencePiece when tokenizer.model exists, else BPE.
    Route("sentencepiece-or-bpe", _SPM_OR_BPE, (_SPM, _BPE)),
    # Qwen3Model: Intern-S1 guard, then Qwen2Model's.
    Route("qwen3", f"if 'InternS1ForConditionalGeneration': interns1 end super: {_SPM_OR_BPE} end",
          (Step("arch", "InternS1ForConditionalGeneration", "interns1"), _SPM, _BPE)),
    # Gemma3Model: the same two readers, tested with an if.
    Route("gemma3", "if 'tokenizer.model': sentencepiece else: gpt2 end", (_SPM, _BPE)),
    # GemmaModel, Gemma2Model: tokenizer.model or nothing.
    Route("sentencepiece-only", "sentencepiece", (Step("sentencepiece", required=True),)),
    # Phi3MiniModel: BPE for a GPT2Tokenizer (Phi-4), else its own SentencePiece reader, which requires the file.
    Route("phi3", "'tokenizer_config.json' if: if 'GPT2Tokenizer': gpt2 end end 'tokenizer.model' if: raise ValueError "
                  "end 'added_tokens.json' 'tokenizer_config.json' 'tokenizer.json'",
          (Step("tokenizer_class", "GPT2Tokenizer", "bpe", required=True), Step("sentencepiece", required=True))),
    # TextModel's default (Qwen2-MoE and many others): BPE.
    Route("bpe", "gpt2", (_BPE,)),
)


# ---- reading the converter's source ---------------------------------------------------------------------

@dataclass(frozen=True)
class _Source:
    classes: dict[str, tuple[ast.ClassDef, str]]  # class name -> (definition, module stem)
    registered: dict[str, list[tuple[str, str]]]  # architecture -> [(module stem, class name)] in file order
    module_of: dict[str, str]  # TEXT_MODEL_MAP of the split converter (architecture -> module stem)


def _files(source_dir: Path) -> list[Path]:
    package = sorted((source_dir / "conversion").glob("*.py"))
    return [p for p in (source_dir / "convert_hf_to_gguf.py", *package) if p.is_file()]


def _stamp(source_dir: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in _files(source_dir))


@functools.lru_cache(maxsize=4)
def _parse(source_dir: str, stamp: tuple[tuple[str, int, int], ...]) -> _Source:
    classes: dict[str, tuple[ast.ClassDef, str]] = {}
    registered: dict[str, list[tuple[str, str]]] = {}
    module_of: dict[str, str] = {}
    for path in _files(Path(source_dir)):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, (node, path.stem))
                for arch in _registered_names(node):
                    registered.setdefault(arch, []).append((path.stem, node.name))
            elif path.name == "__init__.py" and _assigns(node, "TEXT_MODEL_MAP") and isinstance(node.value, ast.Dict):
                module_of.update({k.value: v.value for k, v in zip(node.value.keys, node.value.values, strict=True)
                                  if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)})
    return _Source(classes, registered, module_of)


def _assigns(node: ast.stmt, name: str) -> bool:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return any(isinstance(t, ast.Name) and t.id == name for t in targets)


def _registered_names(node: ast.ClassDef) -> list[str]:
    names: list[str] = []
    for deco in node.decorator_list:
        if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "register":
            names += [a.value for a in deco.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return names


def _bases(source: _Source, name: str) -> list[str]:
    node = source.classes[name][0] if name in source.classes else None
    return [b.id if isinstance(b, ast.Name) else b.attr for b in (node.bases if node else [])
            if isinstance(b, ast.Name | ast.Attribute)]


def _ancestors(source: _Source, name: str) -> list[str]:
    """``name`` and its base classes, nearest first (breadth first: enough for the converter's single bases)."""
    order, queue = [], [name]
    while queue:
        current = queue.pop(0)
        if current not in order:
            order.append(current)
            queue += _bases(source, current)
    return order


def _text_class(source: _Source, architecture: str) -> str | None:
    """The text-model class the converter instantiates for ``architecture`` (the last registration wins)."""
    entries = source.registered.get(architecture, [])
    module = source.module_of.get(architecture)
    preferred = [e for e in entries if e[0] == module] or entries
    texts = [cls for _, cls in preferred if "MmprojModel" not in _ancestors(source, cls)]
    return texts[-1] if texts else None


def _set_vocab_owner(source: _Source, cls: str) -> tuple[str, ast.FunctionDef] | None:
    for name in _ancestors(source, cls):
        if name in source.classes:
            for item in source.classes[name][0].body:
                if isinstance(item, ast.FunctionDef) and item.name == "set_vocab":
                    return name, item
    return None


def converter_architectures(source_dir: Path) -> list[str]:
    """Every architecture name the converter under ``source_dir`` registers a model class for (sorted)."""
    return sorted(_parse(str(source_dir), _stamp(Path(source_dir))).registered)


def set_vocab_of(source_dir: Path, architecture: str) -> tuple[str, str, str] | None:
    """``(converter class, class defining its set_vocab, fingerprint)`` for ``architecture``; None if unknown."""
    try:
        source = _parse(str(source_dir), _stamp(Path(source_dir)))
    except (OSError, SyntaxError, ValueError):  # a converter this Python cannot read: its routes are unknown
        return None
    cls = _text_class(source, architecture)
    found = _set_vocab_owner(source, cls) if cls else None
    if cls is None or found is None:
        return None
    owner, method = found
    return cls, owner, " ".join(_Fingerprint(source, owner).block(method.body))


class _Fingerprint:
    """Renders a ``set_vocab`` body as the readers it calls and the conditions around them (see module doc)."""

    def __init__(self, source: _Source, owner: str) -> None:
        self.source, self.owner = source, owner

    def block(self, body: list[ast.stmt]) -> list[str]:
        return [token for stmt in body for token in self.statement(stmt)]

    def statement(self, node: ast.stmt) -> list[str]:
        if isinstance(node, ast.If):
            test, then, other = self.constants(node.test), self.block(node.body), self.block(node.orelse)
            if not (then or other):  # a test around no reader (logging, metadata) is not part of the route
                return []
            return [" ".join(["if", *test]) + ":", *then, *(["else:", *other] if other else []), "end"]
        if isinstance(node, ast.Try):
            tokens = ["try:", *self.block(node.body)]
            for handler in node.handlers:
                kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                names = ",".join(k.id if isinstance(k, ast.Name) else "?" for k in kinds if k is not None) or "*"
                tokens += [f"except {names}:", *self.block(handler.body)]
            return [*tokens, "end"]
        if isinstance(node, ast.Raise):
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            return [f"raise {exc.id if isinstance(exc, ast.Name) else '?'}"]
        if isinstance(node, ast.For | ast.While | ast.With):
            return self.block(node.body)
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            return []
        return self.calls(node)

    def calls(self, node: ast.AST) -> list[str]:
        tokens: list[str] = []
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute):
                if sub.func.attr.startswith(_READER_PREFIX):
                    tokens.append(sub.func.attr.removeprefix(_READER_PREFIX))
                elif sub.func.attr == "set_vocab" and _is_super(sub.func.value):
                    tokens += ["super:", *self.parent(), "end"]
            elif isinstance(sub, ast.Constant) and isinstance(sub.value, str) and _FILE_NAME.match(sub.value):
                tokens.append(repr(sub.value))
        return tokens

    def constants(self, test: ast.expr) -> list[str]:
        return [repr(n.value) for n in ast.walk(test) if isinstance(n, ast.Constant) and isinstance(n.value, str)]

    def parent(self) -> list[str]:
        for base in _bases(self.source, self.owner):
            found = _set_vocab_owner(self.source, base)
            if found:
                return _Fingerprint(self.source, found[0]).block(found[1].body)
        return ["?"]


def _is_super(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


# ---- deciding for a model directory ---------------------------------------------------------------------

def config_architectures(model_dir: Path) -> list[str]:
    """config.json's architectures the converter may go by: ``text_config``'s first (it prefers it), the top level's."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    names: list[str] = []
    for holder in (config.get("text_config"), config):
        found = holder.get("architectures") if isinstance(holder, dict) else None
        if isinstance(found, list) and found and isinstance(found[0], str) and found[0] not in names:
            names.append(found[0])
    return names


def route_for(source_dir: Path, architecture: str) -> tuple[str | None, Route | None]:
    """``(converter class, route)`` for ``architecture``; the route is None when its fingerprint is not known."""
    found = set_vocab_of(source_dir, architecture)
    if found is None:
        return None, None
    cls, _, fingerprint = found
    return cls, next((r for r in ROUTES if r.fingerprint == fingerprint), None)


def vocab_route(model_dir: Path, source_dir: Path) -> VocabRoute:
    """The reader the converter under ``source_dir`` will use for ``model_dir``; GGUFError for a missing file."""
    model_dir = Path(model_dir)
    names = config_architectures(model_dir)
    if not names:
        return VocabRoute(None, None, None, "unchecked", "config.json names no architecture")
    architecture, top_level = names[0], names[-1]  # set_vocab's own guards look at the top level's
    cls, route = route_for(source_dir, architecture)
    if len(names) > 1 and route_for(source_dir, top_level) != (cls, route):
        return VocabRoute(architecture, cls, None, "unchecked",
                          f"config.json names {names}, whose vocab routes differ (the converter picks one)")
    if route is None:
        why = "no model class" if cls is None else f"an unknown set_vocab() (class {cls})"
        return VocabRoute(architecture, cls, None, "unchecked", f"this llama.cpp has {why} for {architecture}")
    for step in route.steps:
        taken = _take(step, model_dir, architecture, top_level, route)
        if taken is not None:
            return VocabRoute(architecture, cls, route.name, *taken)
    raise GGUFError(f"{architecture} needs {_needed(route)}, which {str(model_dir)!r} lacks",
                    fix=_fix(model_dir, _needed(route)))


def _take(step: Step, model_dir: Path, architecture: str, top_level: str, route: Route) -> tuple[str, str] | None:
    """``(reader, detail)`` when the converter ends at ``step`` for this directory, None when it goes on."""
    if step.kind == "arch":
        return ("other", f"{step.outcome} (architecture {top_level})") if top_level == step.arg else None
    if step.kind == "tekken":
        tekken = (model_dir / "tekken.json").is_file() and not (model_dir / "tokenizer.json").is_file()
        return ("other", f"{step.outcome} (tekken.json)") if tekken else None
    if step.kind == "tokenizer_class":
        return _tokenizer_class_step(step, model_dir, architecture)
    if step.kind == "sentencepiece":
        if (model_dir / "tokenizer.model").is_file():
            return "sentencepiece", "tokenizer.model"
        if step.required:
            raise GGUFError(
                f"{architecture} needs tokenizer.model, which {str(model_dir)!r} lacks: this llama.cpp converter reads "
                f"{architecture}'s vocab only from a SentencePiece model (a tokenizer.json alone is not enough)",
                fix=_fix(model_dir, "tokenizer.model"))
        return None
    if step.kind == "llama-hf":
        return ("llama-hf", "SentencePiece-style tokenizer.json") if _spm_style_json(model_dir) else None
    if step.kind == "bpe":
        if any((model_dir / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            return "bpe", "tokenizer.json" if (model_dir / "tokenizer.json").is_file() else "vocab.json"
        return None
    raise GGUFError(f"vocab route {route.name!r} has an unknown step {step.kind!r}", fix="fix ROUTES")


def _tokenizer_class_step(step: Step, model_dir: Path, architecture: str) -> tuple[str, str] | None:
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        config: Any = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise GGUFError(f"{str(path)!r} is not valid JSON ({e}), so the converter cannot read it",
                        fix="repair or replace tokenizer_config.json") from e
    if step.required and "tokenizer_class" not in config:
        raise GGUFError(f"{architecture} needs tokenizer_class in tokenizer_config.json, which {str(path)!r} lacks "
                        "(this llama.cpp converter reads it to choose the vocab reader)",
                        fix="add the tokenizer_class of the base model (e.g. \"LlamaTokenizer\") to that file")
    if config.get("tokenizer_class") != step.arg:
        return None
    reader = step.outcome if step.outcome in ("bpe", "sentencepiece") else "other"
    return reader, f"tokenizer_class {step.arg}" if reader != "other" else f"{step.outcome} (tokenizer_class)"


def _spm_style_json(model_dir: Path) -> bool:
    """Whether the converter's llama-hf reader accepts tokenizer.json (else it falls through to BPE)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model, decoder = data["model"], data.get("decoder")
    except (ValueError, KeyError, TypeError) as e:
        raise GGUFError(f"{str(path)!r} is not a tokenizers file ({e!r}), so the converter cannot read it",
                        fix="replace it with the base model's tokenizer.json") from e
    return (isinstance(model, dict) and model.get("type") == "BPE" and bool(model.get("byte_fallback"))
            and isinstance(decoder, dict) and decoder.get("type") == "Sequence")


def _needed(route: Route) -> str:
    files = {"sentencepiece": "tokenizer.model", "llama-hf": "tokenizer.json", "bpe": "tokenizer.json"}
    names = list(dict.fromkeys(files[s.kind] for s in route.steps if s.kind in files))
    return " or ".join(names) + (" (or vocab.json + merges.txt)" if _BPE in route.steps else "")


def _fix(model_dir: Path, files: str) -> str:
    return (f"copy {files} from the base model's original repository into the base model directory (the merge "
            f"copies the base's tokenizer files into the merged model), or into {str(model_dir)!r}")
