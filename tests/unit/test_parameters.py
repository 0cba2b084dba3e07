"""Model parameters are checked when the plan is made, before anything is prepared or started: an unknown key
is refused with the parameters there are (and a close spelling), a bad value with the values it may take. The
first model given is the default one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from poolserve_contract.parameters import PARAMETER_NAMES, ModelParameters, check_parameter_names
from poolserve_contract.wire import SERVE_ORDER, SOURCE_FOLDER
from poolserve_stack.plan import PlanError, plan_models, with_served_names
from poolserve_stack.startup import start_triton

MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def test_an_unknown_key_is_refused_naming_a_close_spelling_and_every_parameter():
    with pytest.raises(ValueError) as refused:
        check_parameter_names(["dtype", "served_model_nam"])
    message = str(refused.value)
    assert message.startswith("unknown parameter 'served_model_nam' (did you mean served_model_name?); the "
                              "parameters are checkpoint, served_model_name, dtype,")
    assert all(name in message for name in PARAMETER_NAMES)
    with pytest.raises(ValueError, match=r"^unknown parameter 'colour'; the parameters are "):
        check_parameter_names(["colour"])  # nothing close: no guess
    assert SOURCE_FOLDER not in PARAMETER_NAMES and "instance_count" in PARAMETER_NAMES
    check_parameter_names(PARAMETER_NAMES)


@pytest.mark.parametrize("key, value, message", [
    ("dtype", "floa16", "dtype parameter 'floa16' is not one of auto, float32, bfloat16, float16 (did you mean float16?)"),
    ("long_documents", "maximum", "long_documents parameter 'maximum' is not one of truncate, max, mean"),
    ("max_tokens_per_forward", "lots", "max_tokens_per_forward parameter 'lots' is not a whole number"),
    ("max_model_len", "-1", "max_model_len parameter '-1' is not a whole number"),
    ("logit_sigma", "wide", "logit_sigma parameter 'wide' is not a number"),
    ("logit_sigma", "0", "logit_sigma parameter '0' must be greater than 0"),  # the scores divide by it
    ("logit_mean", "nan", "logit_mean parameter 'nan' is not a finite number"),
    ("logit_sigma", "inf", "logit_sigma parameter 'inf' is not a finite number"),
    ("max_tokens_per_forward", "0", "max_tokens_per_forward parameter '0' must be at least 1"),
])
def test_a_bad_value_names_its_parameter_and_what_it_may_be(key, value, message):
    with pytest.raises(ValueError) as refused:
        ModelParameters.from_mapping({key: value})
    assert str(refused.value) == message


def test_the_plan_refuses_bad_sets_on_any_entry_a_model_folder_named_alone_too():
    for sets, message in (({"bert_classifier": {"served_model_nam": "x"}}, "did you mean served_model_name?"),
                          ({"bert_classifier": {"dtype": "floa16"}}, "is not one of auto, float32"),
                          ({"bert_classifier": {"instance_count": "0"}}, "instance_count must be a positive integer")):
        with pytest.raises(PlanError, match=f"^--set bert_classifier: .*{message}"):
            plan_models(["bert_classifier"], MODEL_REPOSITORY, sets)


def test_a_bad_parameter_is_refused_before_preparing_or_starting_anything(monkeypatch):
    """The built-in models (a torch import, a training run) and Triton's load come after the check."""
    def must_not_run(*_args, **_kwargs):
        raise AssertionError("ran before the parameters were checked")

    monkeypatch.setattr("poolserve_stack.builtin.prepare_all", must_not_run)
    monkeypatch.setattr("poolserve_stack.startup.TritonServer.start", must_not_run)
    for sets, served_names in ((["bert_classifier.served_model_nam=x"], []), (["bert_embedder.dtype=floa16"], []),
                               ([], ["one-name-for-two-models"])):
        with pytest.raises(PlanError):
            start_triton([], sets, MODEL_REPOSITORY, log_path=None, served_names=served_names, say=must_not_run)


def test_served_model_names_go_one_per_model_in_order():
    sets = with_served_names(["bert_classifier=/data/x", "/data/y"], ["classifier", "y"], {"/data/y": {"dtype": "float16"}})
    assert sets == {"bert_classifier=/data/x": {"served_model_name": "classifier"},
                    "/data/y": {"dtype": "float16", "served_model_name": "y"}}
    with pytest.raises(PlanError, match="gives 1 name for 2 models"):
        with_served_names(["a", "b"], ["x"], {})
    with pytest.raises(PlanError, match="disagree"):
        with_served_names(["a"], ["x"], {"a": {"served_model_name": "z"}})
    plan = plan_models(["bert_classifier"], MODEL_REPOSITORY, with_served_names(["bert_classifier"], ["mood"], {}))
    assert plan["bert_classifier"]["served_model_name"] == "mood"


def test_names_given_with_no_model_are_refused_not_put_on_the_built_in_models():
    """``--served-model-name reranker BAAI/x`` reads the model as a second name (argparse's nargs="+"); with no
    model left, the two names must not land on the two built-in models."""
    with pytest.raises(PlanError, match="was given with no model: name the models first"):
        start_triton([], [], MODEL_REPOSITORY, log_path=None, served_names=["reranker", "BAAI/x"])


def test_two_model_folders_may_not_share_a_served_name():
    with pytest.raises(PlanError, match="would both be served as 'm'"):
        plan_models(["bert_classifier", "bert_embedder"], MODEL_REPOSITORY,
                    with_served_names(["bert_classifier", "bert_embedder"], ["m", "m"], {}))


def test_a_checkpoint_given_as_a_path_is_served_under_that_path_unless_named():
    """vLLM's default: served_model_name is the model as given."""
    assert ModelParameters.from_mapping({"checkpoint": "/data/my-reranker"}).served_name("folder") == "/data/my-reranker"
    named = ModelParameters.from_mapping({"checkpoint": "/data/my-reranker", "served_model_name": "rr"})
    assert named.served_name("folder") == "rr"


def test_the_plan_records_the_order_the_models_were_given_in():
    plan = plan_models(["bert_embedder", "bert_classifier"], MODEL_REPOSITORY)
    assert [(name, parameters[SERVE_ORDER]) for name, parameters in plan.items()] == [
        ("bert_embedder", "0"), ("bert_classifier", "1")]


class TritonWithModels:
    """What discover_models asks Triton: ready models and their configs (serve_order among the parameters)."""

    def __init__(self, orders: dict[str, str | None]):
        self.orders = orders

    async def is_server_ready(self, client_timeout=None):
        return True

    async def get_inference_statistics(self, as_json=False, client_timeout=None):
        return {"model_stats": [{"name": name} for name in self.orders]}

    async def is_model_ready(self, name, client_timeout=None):
        return True

    async def get_model_config(self, name, as_json=False):
        order = self.orders[name]
        return {"config": {"name": name, "parameters": {SERVE_ORDER: {"string_value": order}} if order else {}}}


def test_the_first_model_given_is_the_adapter_s_default(monkeypatch):
    """Triton's names sort otherwise: /data/x (Triton model data--x) given before BAAI/bge-reranker-v2-m3."""
    from poolserve_adapter import app
    from poolserve_adapter.settings import Settings

    monkeypatch.setattr(app, "build_served_model", lambda name, config, repository: SimpleNamespace(
        name=name, task="classify", can_score=True, adapters=lambda: []))
    orders = {"BAAI--bge-reranker-v2-m3": "1", "data--x": "0", "zz_stock_model": None, "aa_stock_model": None}
    registry = asyncio.run(app.discover_models(TritonWithModels(orders), Settings()))
    assert [model.name for model in registry] == ["data--x", "BAAI--bge-reranker-v2-m3", "aa_stock_model",
                                                  "zz_stock_model"]
    assert registry.resolve(None, capability="can_score").name == "data--x"
