"""make serve's plan helpers that need no running stack."""

from pathlib import Path

from adapter.stack import Recovery, uses_builtins

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def test_builtins_are_prepared_only_when_the_plan_uses_them():
    assert uses_builtins([], REPOSITORY)  # the defaults
    assert uses_builtins(["bert_classifier"], REPOSITORY)  # a folder alone: its default checkpoint is built in
    assert uses_builtins(["bert_classifier=builtin:sentiment-minilm"], REPOSITORY)
    assert not uses_builtins(["bert_classifier=/data/x", "BAAI/bge-reranker-v2-m3", "/data/y"], REPOSITORY)


def test_recovery_allows_a_bounded_number_of_restarts_with_growing_backoff():
    recovery = Recovery(limit=2, window_s=60)
    assert recovery.allow("m") and recovery.backoff_s("m") == 0.5
    assert recovery.allow("m") and recovery.backoff_s("m") == 1.0
    assert not recovery.allow("m")  # the third failure within the window is a crash loop
    assert recovery.allow("other")
