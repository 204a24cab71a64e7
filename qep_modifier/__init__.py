"""qep-modifier: Quantization Error Propagation (and FOEM) for llm-compressor.

Importing the package registers ``QEPModifier``, ``FOEMModifier`` (FOEM
without QEP) and ``ValueRotationModifier`` (an exact per-head rotation of the
attention values, :mod:`qep_modifier.value_rotation`) with llm-compressor's
``ModifierFactory``, so recipes (and the ``recipe.yaml`` saved into a
checkpoint) resolve them by name, and registers
the ``full_range_mse`` weight observer (:mod:`qep_modifier.full_range`).
"""

import os
import sys
from pathlib import Path

#: The console scripts: for them the toolkit's import-time device warning is
#: left out (``qep_modifier.workflow.quiet_logs`` says the device once instead).
PROGRAMS = ("qep-demo", "qep-oneshot", "qep-eval", "qep-vllm-check")
_quiet_import = bool(sys.argv) and Path(sys.argv[0]).name in PROGRAMS and (
    "LLM_COMPRESSOR_LOG_DISABLED" not in os.environ
)
if _quiet_import:
    os.environ["LLM_COMPRESSOR_LOG_DISABLED"] = "true"
try:
    from llmcompressor.modifiers.factory import ModifierFactory
finally:
    if _quiet_import:
        del os.environ["LLM_COMPRESSOR_LOG_DISABLED"]

from qep_modifier import full_range  # noqa: F401  (registers the full_range_mse observer)
from qep_modifier.modifier import (
    DEFAULT_PROPAGATION_STRENGTH,
    FOEMModifier,
    QEPModifier,
)

from qep_modifier.value_rotation import ValueRotationModifier

__all__ = ["QEPModifier", "FOEMModifier", "ValueRotationModifier", "DEFAULT_PROPAGATION_STRENGTH"]

ModifierFactory.register("QEPModifier", QEPModifier)
ModifierFactory.register("FOEMModifier", FOEMModifier)
ModifierFactory.register("ValueRotationModifier", ValueRotationModifier)
