"""Multi-LoRA: PEFT adapters served beside their base model, mixed in one packed forward.

:func:`read_adapter` reads one PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``:
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` per targeted linear layer, and the weights
of its ``modules_to_save`` heads). :meth:`LoraModel.attach` checks every adapter against the loaded base
(a targeted module it lacks, or a shape it does not have, is a wrong base: refused, naming the adapter and
the module), stacks the adapters of each targeted ``nn.Linear`` (ranks may differ; an adapter that does
not target a layer has rank 0 there) and swaps the layer for a :class:`LoraLinear`.

A forward runs inside :meth:`LoraModel.forward` (the engine's, around a chunk's body, pooling and head):
it publishes the chunk's segments (:func:`poolserve_kernels.lora.lora_segments`; each sequence's lora id
``i`` is adapter slot ``i - 1``, 0 the base model) for the two row layouts a linear layer sees, the
body's tokens (the packed stream, or the padded rows of the padded body) and the pooled sequences (an
encoder's pooler); each :class:`LoraLinear` runs its base layer once for all rows and adds every
segment's low-rank term (the Triton kernel on CUDA, its torch reference on CPU). Outside such a
forward a :class:`LoraLinear` is its base layer. Inside compiled layers the terms are added by one opaque
operator, ``poolserve::lora_add_``, that reads the forward in progress when it runs, so the graphs never see a
batch's segments. A reused-prefix stream (:mod:`poolserve_runtime.prefix_reuse`) gives its token segments per
run of one adapter (a prefix and the suffixes after it) rather than per sequence.

Heads: an adapter's ``modules_to_save`` head (``classifier``, ``score``) replaces the base's for that
adapter's sequences: :meth:`LoraModel.score_by_head` scores the chunk once with the base heads and once
per adapter head its sequences use (heads are small beside the body), keeping each sequence's rows.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from poolserve_contract.parameters import LORA_CONFIG_FILE
from poolserve_kernels.lora import LoraSegments, apply_lora, lora_reference, lora_segments, stack_lora_weights

WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# adapter_config.json options that change what the weights mean and that the runtime does not apply.
REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora) is not supported",
    "use_rslora": "rank-stabilised LoRA (use_rslora) is not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers) is not supported",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
}


class LoraError(ValueError):
    """An adapter the base model cannot serve (its message names the adapter and what is wrong)."""


@dataclass(frozen=True)
class LoraAdapter:
    """One PEFT adapter as read from its folder."""

    name: str
    path: str
    lora_alpha: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # targeted module → (lora_A [r, in], lora_B [out, r])
    heads: dict[str, dict[str, torch.Tensor]]  # modules_to_save module → its state dict


def read_adapter(name: str, path: str) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder; raises :class:`LoraError` for one the runtime cannot apply."""
    from safetensors.torch import load_file

    folder = Path(path)
    config_file, weights_file = folder / LORA_CONFIG_FILE, folder / WEIGHTS_FILE
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise LoraError(f"LoRA adapter {name!r}: {needed} is missing")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"LoRA adapter {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    for option, reason in REFUSED_OPTIONS.items():
        if config.get(option) and config.get(option) != "none":
            raise LoraError(f"LoRA adapter {name!r}: {reason}")
    if config.get("bias", "none") != "none":
        raise LoraError(f"LoRA adapter {name!r}: trained biases (bias={config['bias']!r}) are not supported")
    heads_named = tuple(config.get("modules_to_save") or ())
    layers: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        module = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            if module.endswith(f".{part}.weight"):
                layers.setdefault(module[: -len(f".{part}.weight")], {})[part] = tensor
                break
        else:
            head = next((head for head in heads_named if module == head or module.startswith(f"{head}.")), None)
            if head is None:
                raise LoraError(f"LoRA adapter {name!r}: weight {key!r} is neither a LoRA matrix of a linear layer "
                                "nor part of a modules_to_save head")
            heads.setdefault(head, {})[module[len(head) + 1:]] = tensor
    incomplete = [module for module, parts in layers.items() if set(parts) != {"lora_A", "lora_B"}]
    if incomplete:
        raise LoraError(f"LoRA adapter {name!r}: {incomplete[0]} lacks lora_A or lora_B")
    return LoraAdapter(name=name, path=path, lora_alpha=float(config["lora_alpha"]),
                       layers={module: (parts["lora_A"], parts["lora_B"]) for module, parts in layers.items()},
                       heads=heads)


@dataclass(frozen=True)
class LoraForward:
    """The segments of the forward in progress, for each row layout a linear layer may see."""

    token_rows: int
    token_segments: LoraSegments
    sequence_rows: int
    sequence_segments: LoraSegments

    def segments_for(self, rows: int) -> LoraSegments | None:
        """None for rows of neither layout: HF's BERT pooler on the packed stream's first row, whose output
        the engine never reads (it pools each sequence itself), runs as its base layer."""
        if rows == self.token_rows:
            return self.token_segments
        if rows == self.sequence_rows:
            return self.sequence_segments
        return None


CURRENT_FORWARD: contextvars.ContextVar[LoraForward | None] = contextvars.ContextVar("lora_forward", default=None)


class LoraLinear(nn.Module):
    """A linear layer with every adapter's low-rank term stacked beside it (see the module docstring)."""

    def __init__(self, base: nn.Linear, pairs: list[tuple[torch.Tensor, torch.Tensor]], scaling: list[float]):
        super().__init__()
        self.base = base
        dtype, device = base.weight.dtype, base.weight.device
        lora_a, lora_b, ranks = stack_lora_weights(pairs, dtype=dtype, device=device)
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b", lora_b, persistent=False)
        self.register_buffer("ranks", ranks, persistent=False)
        self.register_buffer("scaling", torch.tensor(scaling, dtype=torch.float32, device=device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # code that reads a linear layer's weight (dtype, device) keeps working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows, out = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if torch.compiler.is_compiling():
            # Inside compiled layers: one opaque operator that reads the forward in progress at run time, so
            # the graph neither breaks nor specialises on a batch's segments (one graph serves every batch).
            lora_add_op(out, rows, self.lora_a, self.lora_b, self.ranks, self.scaling)
        elif CURRENT_FORWARD.get() is not None:
            add_lora_terms(out, rows, self.lora_a, self.lora_b, self.ranks, self.scaling)
        return y


def add_lora_terms(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor,
                   scaling: torch.Tensor) -> None:
    """Add the low-rank terms of the forward in progress (:data:`CURRENT_FORWARD`; none: nothing) into ``y`` ([rows,
    out], the base layer's output) for the rows ``x`` ([rows, in]) of one linear layer."""
    forward = CURRENT_FORWARD.get()
    segments = forward.segments_for(x.shape[0]) if forward is not None else None
    if segments is None or segments.max_lora_length == 0:
        return
    if x.device.type == "cuda":
        apply_lora(y, x.contiguous(), segments.indptr, segments.adapter, lora_a, lora_b, ranks, scaling,
                   max_lora_length=segments.max_lora_length)
    else:
        y.copy_(lora_reference(y, x, segments.indptr, segments.adapter, lora_a, lora_b, ranks, scaling))


@torch.library.custom_op("poolserve::lora_add_", mutates_args=("y",))
def lora_add_op(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor,
                scaling: torch.Tensor) -> None:
    """:func:`add_lora_terms` as an operator torch.compile keeps opaque (compiled layers call it; it does nothing
    when no adapter's forward is in progress)."""
    add_lora_terms(y, x, lora_a, lora_b, ranks, scaling)


@lora_add_op.register_fake
def _lora_add_shapes(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     ranks: torch.Tensor, scaling: torch.Tensor) -> None:
    return None


def adapter_runs(lora_ids: torch.Tensor, sequences_per_request: list[int]) -> list[int]:
    """Each request's sequences cut into runs of one lora id (how many sequences each run holds, in order): the
    groups that may share a prompt prefix's keys and values, which differ from one adapter to the next."""
    runs, ids, first = [], lora_ids.tolist(), 0
    for count in sequences_per_request:
        for sequence in range(first, first + count):
            if sequence == first or ids[sequence] != ids[sequence - 1]:
                runs.append(0)
            runs[-1] += 1
        first += count
    return runs


class LoraModel:
    """The adapters attached to one loaded base model (lora id ``i`` is ``adapters[i - 1]``; ids are the runtime's
    own: requests name their adapters, :attr:`ids_by_name` maps the names)."""

    def __init__(self, model: nn.Module, adapters: list[LoraAdapter], head_modules: dict[str, list[nn.Module | None]]):
        self.model = model
        self.adapters = adapters
        self.ids_by_name = {adapter.name: slot + 1 for slot, adapter in enumerate(adapters)}
        # modules_to_save module → per adapter slot its copy (None: that adapter uses the base's).
        self.head_modules = head_modules

    @classmethod
    def attach(cls, model: nn.Module, modules: tuple[tuple[str, str], ...], body: nn.Module,
               head_linear: nn.Module | None) -> LoraModel:
        """Read the adapters ``modules`` (``(name, path)``), check them against ``model`` and wrap its targeted
        linear layers. ``body`` is the model's transformer body (heads live outside it); ``head_linear`` its
        score head's linear layer, which the fused head reads directly (an adapter changes it as a
        modules_to_save head, not with LoRA)."""
        adapters = [read_adapter(name, path) for name, path in modules]
        named = dict(model.named_modules())
        body_names = {name for name, module in named.items() if module is body}
        body_prefix = next(iter(body_names), "")
        targeted: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        scaling: dict[str, list[float]] = {}
        for slot, adapter in enumerate(adapters):
            for module_name, (a, b) in adapter.layers.items():
                layer = named.get(module_name)
                if layer is None:
                    raise LoraError(f"LoRA adapter {adapter.name!r} does not fit this base model (wrong base?): it "
                                    f"targets {module_name}, which the model does not have")
                if not isinstance(layer, nn.Linear):
                    raise LoraError(f"LoRA adapter {adapter.name!r} targets {module_name}, a {type(layer).__name__}; "
                                    "only linear layers are supported")
                if layer is head_linear:
                    raise LoraError(f"LoRA adapter {adapter.name!r} applies LoRA to the score head {module_name}; "
                                    "only a modules_to_save head can change it")
                if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (
                        a.shape[1], b.shape[0]) != (layer.in_features, layer.out_features):
                    raise LoraError(
                        f"LoRA adapter {adapter.name!r} does not fit this base model (wrong base?): {module_name} is "
                        f"{layer.in_features} -> {layer.out_features}, the adapter's lora_A is {list(a.shape)} and "
                        f"lora_B {list(b.shape)}")
                pairs = targeted.setdefault(module_name, [(
                    torch.zeros(0, layer.in_features), torch.zeros(layer.out_features, 0))] * len(adapters))
                pairs[slot] = (a, b)
                scaling.setdefault(module_name, [0.0] * len(adapters))[slot] = adapter.lora_alpha / a.shape[0]
        head_modules: dict[str, list[nn.Module | None]] = {}
        for slot, adapter in enumerate(adapters):
            for head_name, state in adapter.heads.items():
                head = named.get(head_name)
                if head is None or (body_prefix == "" and body is model) or head_name == body_prefix or (
                        body_prefix and head_name.startswith(f"{body_prefix}.")):
                    where = "the model does not have it" if head is None else "it is inside the model's body"
                    raise LoraError(f"LoRA adapter {adapter.name!r} saves module {head_name!r} (modules_to_save), "
                                    f"which cannot be served: {where}; only heads outside the body can")
                own = copy.deepcopy(head)
                expected = own.state_dict()
                wrong = [key for key, tensor in state.items()
                         if key not in expected or expected[key].shape != tensor.shape]
                if wrong or set(expected) - set(state):
                    raise LoraError(f"LoRA adapter {adapter.name!r} does not fit this base model (wrong base?): its "
                                    f"{head_name} head does not match the model's ({', '.join(wrong) or 'missing'})")
                own.load_state_dict({key: tensor.to(expected[key].dtype) for key, tensor in state.items()})
                head_modules.setdefault(head_name, [None] * len(adapters))[slot] = own
        for module_name, pairs in targeted.items():
            parent_name, _, child = module_name.rpartition(".")
            parent = named[parent_name] if parent_name else model
            setattr(parent, child, LoraLinear(named[module_name], pairs, scaling[module_name]))
        return cls(model, adapters, head_modules)

    @property
    def count(self) -> int:
        return len(self.adapters)

    @contextlib.contextmanager
    def forward(self, lora_ids: torch.Tensor | None, token_bounds: torch.Tensor, device: torch.device,
                span_ids: torch.Tensor | None = None) -> Iterator[None]:
        """Run the body, pooling and heads of a chunk whose sequences use ``lora_ids`` ([n] int32 on the
        host, None: all the base model) and whose tokens lie at ``token_bounds`` ([n + 1] on the host: the
        packed ``cu_seqlens``, or the padded rows' bounds). A reused-prefix stream gives the bounds of its
        requests instead, and ``span_ids``, the lora id of each (every sequence of one shares it)."""
        if lora_ids is None or not bool(lora_ids.any()):
            yield
            return
        slots = lora_ids.long() - 1  # lora id 0 (the base model) is the kernels' -1
        span_slots = slots if span_ids is None else span_ids.long() - 1
        sequences = torch.arange(slots.numel() + 1)
        forward = LoraForward(
            token_rows=int(token_bounds[-1]), token_segments=lora_segments(token_bounds, span_slots, device),
            sequence_rows=slots.numel(), sequence_segments=lora_segments(sequences, slots, device))
        token = CURRENT_FORWARD.set(forward)
        try:
            yield
        finally:
            CURRENT_FORWARD.reset(token)

    def score_by_head(self, lora_ids: torch.Tensor | None, lengths: torch.Tensor,
                      score: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``score()`` (the chunk's pooling and heads) with each sequence's rows from its adapter's
        modules_to_save heads where it has them. ``lengths``: the sequences' token counts (outputs with one
        row per token)."""
        outputs = score()
        if lora_ids is None or not self.head_modules:
            return outputs
        for slot in sorted({int(i) - 1 for i in lora_ids.tolist() if i > 0}):
            swaps = {name: copies[slot] for name, copies in self.head_modules.items() if copies[slot] is not None}
            if not swaps:
                continue
            with self.heads_swapped(swaps):
                own = score()
            chosen = lora_ids.long() - 1 == slot
            for name, tensor in outputs.items():
                rows = chosen if tensor.shape[0] == chosen.numel() else torch.repeat_interleave(chosen, lengths.long())
                rows = rows.to(tensor.device)
                outputs[name] = torch.where(rows.view(-1, *([1] * (tensor.dim() - 1))), own[name], tensor)
        return outputs

    @contextlib.contextmanager
    def heads_swapped(self, swaps: dict[str, nn.Module]) -> Iterator[None]:
        named = dict(self.model.named_modules())
        originals = {name: named[name] for name in swaps}
        try:
            for name, module in swaps.items():
                self._set(name, module)
            yield
        finally:
            for name, module in originals.items():
                self._set(name, module)

    def _set(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, module)
