import pytest
from transformers import PretrainedConfig

from poolserve_runtime.activation import Activation, activation_for_config


def config(**kwargs):
    num_labels = kwargs.pop("num_labels", 1)
    cfg = PretrainedConfig(**kwargs)
    cfg.num_labels = num_labels
    return cfg


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"num_labels": 1}, Activation.SIGMOID),
        ({"num_labels": 2}, Activation.SOFTMAX),
        ({"num_labels": 1, "problem_type": "regression"}, Activation.IDENTITY),
        ({"num_labels": 3, "problem_type": "multi_label_classification"}, Activation.SIGMOID),
        ({"num_labels": 1, "problem_type": "single_label_classification"}, Activation.SIGMOID),
        ({"num_labels": 4, "problem_type": "single_label_classification"}, Activation.SOFTMAX),
        ({"num_labels": 1, "sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"}, Activation.IDENTITY),
        ({"num_labels": 1, "sentence_transformers": {"activation_fn": "torch.nn.modules.activation.Sigmoid"}}, Activation.SIGMOID),
        # problem_type wins over a declared sentence-transformers activation
        ({"num_labels": 1, "problem_type": "regression",
          "sbert_ce_default_activation_function": "torch.nn.modules.activation.Sigmoid"}, Activation.IDENTITY),
    ],
)
def test_vllm_activation_rule(kwargs, expected):
    assert activation_for_config(config(**kwargs)) is expected


def test_rejects_activation_outside_torch_nn():
    with pytest.raises(ValueError, match="unsupported"):
        activation_for_config(config(sbert_ce_default_activation_function="my.module.Act"))
