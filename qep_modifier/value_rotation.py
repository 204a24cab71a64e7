"""An exact rotation of each attention block's values (SpinQuant's R2) for the
families llm-compressor's ``SpinQuantModifier`` does not rotate.

Within one attention block, every head's value vector ``v`` reaches the model
only through the output projection: ``out = sum_i W_o[:, head i] (attention_i v_kv(i))``.
Rotating every value head by one orthogonal ``R`` (value rows ``W_v <- R^T W_v``,
bias ``b_v <- R^T b_v``) and the output projection's columns of every query head
by the same ``R`` (``W_o <- W_o R``) leaves the block's output unchanged, whatever
the norms around the block: Gemma 2/3's sandwich norms and OLMo 2's post-norms,
which make the residual rotation (R1) inexact, do not see it. The weights
change, the model's function does not (to float32 rounding: the products are
taken in float64), and the checkpoint stays a plain one with nothing to run at
serving time. A Hadamard-like ``R`` spreads a head's outlier channels over the
head, which the output projection's input groups and the value rows' groups
quantize better.

:class:`ValueLayout` says, per attention block, where the values sit (their own
Linear, or rows of a fused query/key/value Linear); :func:`value_layouts` resolves them once per model,
:func:`rotate_values` applies one rotation. :class:`ValueRotationModifier` is the
recipe entry (registered by ``import qep_modifier``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from compressed_tensors.utils import align_module_device, update_offload_parameter

from llmcompressor.core import State
from llmcompressor.modifiers import Modifier

from qep_modifier.rotations import VALUE_ROTATION_MODEL_TYPES, value_rotation_misfit

__all__ = [
    "VALUE_ROTATION_MODEL_TYPES", "ValueLayout", "ValueRotationModifier", "head_rotation",
    "rotate_values", "value_layouts", "value_rotation_misfit",
]

# (value Linear's name, output Linear's name) of the attention blocks with a
# value projection of their own
_SEPARATE = (("v_proj", "o_proj"), ("v_proj", "out_proj"))
# the fused query/key/value Linear and the output Linear, by model type
_FUSED = {"phi3": ("qkv_proj", "o_proj"), "gpt_neox": ("query_key_value", "dense"),
          "falcon": ("query_key_value", "dense")}


@dataclass(frozen=True)
class ValueLayout:
    """Where one attention block keeps its values. ``value_chunks[j]``: the chunk of
    ``head_dim`` output rows of ``value`` that holds value head ``j``; ``query_heads``:
    how many chunks of ``head_dim`` input columns ``output`` has, one per query head.
    One rotation serves every head of the block, so which value head a query head
    reads (grouped-query attention) does not matter."""

    name: str
    value: torch.nn.Linear
    output: torch.nn.Linear
    head_dim: int
    value_chunks: tuple[int, ...]
    query_heads: int


def value_layouts(model: torch.nn.Module) -> list[ValueLayout]:
    """Every attention block's :class:`ValueLayout`, in module order. Raises a
    one-line ``ValueError`` for a model type outside
    :data:`VALUE_ROTATION_MODEL_TYPES` or a block whose widths do not add up."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_type = getattr(config, "model_type", None)
    problem = value_rotation_misfit(model_type)
    if problem is not None:
        raise ValueError(problem)
    heads = config.num_attention_heads
    kv_heads = _kv_heads(config, model_type)
    layouts = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        pair = _FUSED.get(model_type)
        if pair is None:
            pair = next((p for p in _SEPARATE if p[0] in children and p[1] in children), None)
        if pair is None or pair[0] not in children or pair[1] not in children:
            continue
        value, output = children[pair[0]], children[pair[1]]
        head_dim = output.in_features // heads
        if model_type in _FUSED:
            chunks = _fused_value_chunks(model_type, config, heads, kv_heads)
            expected = _fused_rows(model_type, config, heads, kv_heads)
        else:
            chunks = tuple(range(kv_heads))
            expected = kv_heads
        if head_dim * heads != output.in_features or value.out_features != expected * head_dim:
            raise ValueError(
                f"ValueRotationModifier: {name}.{pair[0]} has {value.out_features} outputs and "
                f"{name}.{pair[1]} {output.in_features} inputs, which {heads} heads of "
                f"{kv_heads} value heads do not explain; drop it from the recipe"
            )
        layouts.append(ValueLayout(name, value, output, head_dim, chunks, heads))
    if not layouts:
        raise ValueError(
            f"ValueRotationModifier: no attention block of model type {model_type} found; "
            "drop it from the recipe"
        )
    return layouts


def _kv_heads(config, model_type: str) -> int:
    if model_type == "falcon":
        if config.new_decoder_architecture:
            return config.num_kv_heads
        return 1 if config.multi_query else config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _interleaved(model_type: str, config) -> bool:
    """Whether the fused Linear interleaves (query, key, value) per head: GPT-NeoX
    and classic Falcon (neither multi-query nor the new layout)."""
    return model_type == "gpt_neox" or (
        model_type == "falcon" and not config.new_decoder_architecture and not config.multi_query
    )


def _fused_value_chunks(model_type: str, config, heads: int, kv_heads: int) -> tuple[int, ...]:
    """Which ``head_dim`` chunk of the fused Linear's rows holds each value head:
    Phi-3 stacks all queries, all keys, all values; GPT-NeoX and classic Falcon
    interleave (query, key, value) per head; Falcon's new layout stacks, per
    value head, its queries, its key and its value; multi-query Falcon ends with
    one key and one value."""
    if model_type == "phi3":
        return tuple(heads + kv_heads + j for j in range(kv_heads))
    if _interleaved(model_type, config):
        return tuple(3 * j + 2 for j in range(kv_heads))
    if config.new_decoder_architecture:
        per_group = heads // kv_heads + 2
        return tuple(per_group * j + per_group - 1 for j in range(kv_heads))
    return (heads + 1,)  # multi-query


def _fused_rows(model_type: str, config, heads: int, kv_heads: int) -> int:
    """Rows of the fused Linear, in ``head_dim`` chunks."""
    if _interleaved(model_type, config):
        return 3 * heads
    return heads + 2 * kv_heads


def head_rotation(head_dim: int, kind: str = "random-hadamard", seed: int = 0) -> torch.Tensor:
    """An orthogonal ``head_dim x head_dim`` matrix in float64: a Hadamard matrix
    (compressed-tensors' known orders times powers of two) scaled to be
    orthogonal, with random signs on its rows for ``random-hadamard`` (seeded),
    every row's first entry positive for ``hadamard`` (Sylvester's matrix at powers of two);
    ``random-orthogonal``, or a width no Hadamard matrix is known for, gives the
    Q factor of a seeded Gaussian matrix."""
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

    generator = torch.Generator().manual_seed(seed)
    if kind != "random-orthogonal":
        try:
            matrix = random_hadamard_matrix(head_dim, dtype=torch.float64, gen=generator)
        except ValueError:  # no Hadamard matrix of this order known
            matrix = None
        if matrix is not None:
            if kind == "hadamard":  # undo the random signs: every row starts positive
                matrix = matrix * torch.sign(matrix[:, :1])
            return matrix / matrix[0].norm()
    gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))


@torch.no_grad()
def rotate_values(layout: ValueLayout, rotation: torch.Tensor) -> None:
    """Rotate one block's value heads by ``rotation`` (``W_v <- R^T W_v`` per value
    head, its bias likewise) and the output projection's query-head columns by
    the same ``R`` (``W_o <- W_o R``), in float64, in place (offloaded parameters
    included)."""
    d = layout.head_dim
    with align_module_device(layout.value):
        weight = layout.value.weight.to(torch.float64)
        bias = None if layout.value.bias is None else layout.value.bias.to(torch.float64)
        for chunk in layout.value_chunks:
            rows = slice(chunk * d, (chunk + 1) * d)
            weight[rows] = rotation.T @ weight[rows]
            if bias is not None:
                bias[rows] = rotation.T @ bias[rows]
        update_offload_parameter(layout.value, "weight", weight.to(layout.value.weight.dtype))
        if bias is not None:
            update_offload_parameter(layout.value, "bias", bias.to(layout.value.bias.dtype))
    with align_module_device(layout.output):
        weight = layout.output.weight.to(torch.float64)
        for head in range(layout.query_heads):
            columns = slice(head * d, (head + 1) * d)
            weight[:, columns] = weight[:, columns] @ rotation
        update_offload_parameter(layout.output, "weight", weight.to(layout.output.weight.dtype))


class ValueRotationModifier(Modifier):
    """Rotate every attention block's value heads and the output projection's
    matching columns by one orthogonal matrix per block (SpinQuant's R2), exactly,
    before calibration: on every family :data:`VALUE_ROTATION_MODEL_TYPES` lists,
    including those llm-compressor's ``SpinQuantModifier`` refuses (Gemma 2/3,
    Phi-3, OLMo 2, GPT-NeoX, OPT, Falcon). The rotation is fused into the
    weights: the checkpoint is a plain one.

    Lifecycle: ``on_initialize`` resolves the layouts (one line for a model it does
    not know) and rotates; nothing runs during calibration. Put it before the
    quantizing modifier::

        quant_stage:
          quant_modifiers:
            ValueRotationModifier:
              transform_type: random-hadamard
            QEPModifier: {...}

    :param transform_type: ``random-hadamard`` (default: a Hadamard matrix with
        random signs), ``hadamard`` or ``random-orthogonal``; see :func:`head_rotation`
    :param seed: the random signs' (or matrix's) seed; block ``k`` uses ``seed + k``
    """

    transform_type: Literal["random-hadamard", "hadamard", "random-orthogonal"] = "random-hadamard"
    seed: int = 0

    def on_initialize(self, state: State, **kwargs) -> bool:
        for index, layout in enumerate(value_layouts(state.model)):
            rotate_values(layout, head_rotation(layout.head_dim, self.transform_type, self.seed + index))
        return True
