"""A decoder's causal mask through llm-compressor 0.14.0.1's sequential tracing.

The toolkit traces the model's forward and wraps (runs at calibration time instead
of baking into the graph) calls whose target, evaluated in the forward's module
namespace, is a function named in its ``tracing_ignore`` list (``create_causal_mask``,
``mask_function``, ...). Mistral, Phi-3, Qwen3-MoE, Mixtral, Starcoder2 and others in
transformers 5 pick their mask through a local variable
(``mask_function = create_causal_mask if ... else create_sliding_window_causal_mask``);
the local name cannot be evaluated there, so the call is traced through, its trace-time
result (``None``) is baked in, and every decoder layer calibrates with
``attention_mask=None``: not causal, for GPTQModifier as for QEP. Giving the modeling
module a global of that name lets the toolkit's check evaluate it and wrap the call; the
forward still uses its own local (the global is never read outside the tracing).
"""

from __future__ import annotations

import inspect
import re
import sys

import torch
from loguru import logger

__all__ = ["expose_local_mask_functions"]

_LOCAL_MASK_FUNCTION = re.compile(r"^\s*mask_function\s*=", re.M)


def expose_local_mask_functions(model: torch.nn.Module) -> list[str]:
    """Name ``mask_function`` in each modeling module of ``model`` whose forward
    assigns a local ``mask_function`` and whose module has no such global; returns
    those modules' names."""
    from transformers.masking_utils import create_causal_mask

    exposed = []
    for cls in {type(module) for module in model.modules()}:
        forward = getattr(cls, "forward", None)
        home = sys.modules.get(getattr(forward, "__module__", ""), None)
        if home is None or "mask_function" in vars(home):
            continue
        try:
            source = inspect.getsource(forward)
        except (OSError, TypeError):
            continue
        if _LOCAL_MASK_FUNCTION.search(source):
            home.mask_function = create_causal_mask
            exposed.append(home.__name__)
            logger.info(
                f"QEP: {home.__name__} picks its causal mask through a local mask_function; "
                "named it in the module so that llm-compressor's tracing keeps the mask "
                "(qep_modifier.tracing)"
            )
    return sorted(exposed)
