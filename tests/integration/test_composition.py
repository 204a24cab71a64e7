"""QEP beside other calibrating modifiers in one recipe: every forward QEP runs
itself is silent to them, so they see each calibration batch exactly once."""

import pytest
import torch
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.gptq import GPTQModifier
from pydantic import PrivateAttr

from qep_modifier import QEPModifier
from tests.conftest import NUM_SAMPLES
from tests.models import group_scheme, inputs_of, load_model, quantize

WEIGHTS = group_scheme(3, 32)["group_0"]["weights"]
QEP_TARGETS = ["re:.*(q|k|v|o|gate|up)_proj$"]
DOWN = ["re:.*down_proj$"]


class DownProjGPTQ(GPTQModifier):
    """GPTQModifier on down_proj that keeps what it calibrated on."""

    _inputs: dict = PrivateAttr(default_factory=dict)
    _hessians_seen: dict = PrivateAttr(default_factory=dict)

    def calibrate_module(self, module, args, output):
        self._inputs.setdefault(self._module_names[module], []).append(args[0].detach().clone())
        super().calibrate_module(module, args, output)

    def compress_modules(self):
        for module, hessian in self._hessians.items():
            self._hessians_seen[self._module_names[module]] = (
                hessian.clone(),
                self._num_samples[module].clone(),
            )
        super().compress_modules()


class LayerInputCache(Modifier):
    """Records each decoder layer's inputs with a forward pre-hook, the way AWQ
    caches its parent layers' arguments for its grid search."""

    requires_calibration_data: bool = True
    _inputs: dict = PrivateAttr(default_factory=dict)

    def on_initialize(self, state, **kwargs):
        return True

    def on_calibration_start(self, state, event, **kwargs):
        for index, layer in enumerate(state.model.model.layers):
            self.register_hook(layer, self._record(index), "forward_pre", with_kwargs=True)

    def _record(self, index):
        def hook(module, args, kwargs):
            self._inputs.setdefault(index, []).append(args[0].detach().clone())

        return hook

    def on_calibration_end(self, state, event, **kwargs):
        self.remove_hooks()


@pytest.mark.parametrize("pipeline", ["sequential", "independent"])
def test_other_modifiers_see_each_batch_once(tiny_llama, calibration, pipeline):
    qep = QEPModifier(
        targets=QEP_TARGETS, config_groups={"qep": {"targets": QEP_TARGETS, "weights": WEIGHTS}}
    )
    gptq = DownProjGPTQ(targets=DOWN, config_groups={"gptq": {"targets": DOWN, "weights": WEIGHTS}})
    cache = LayerInputCache()
    model = quantize(tiny_llama, [qep, gptq, cache], calibration, pipeline=pipeline)

    input_ids = torch.tensor(calibration["input_ids"])
    # what the quantized model feeds each layer: the quantized stream
    layers = [f"model.layers.{index}" for index in range(3)]
    quantized_stream = inputs_of(model, layers, input_ids)
    original = load_model(tiny_llama)
    for index in range(3):
        # the layer-input cache saw each batch once, and only the quantized stream
        # (in the shared pass: not QEP's full-precision pass nor its replays)
        recorded = cache._inputs[index]
        assert len(recorded) == NUM_SAMPLES, (pipeline, index)
        for got, expected in zip(recorded, quantized_stream[layers[index]]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

        # GPTQModifier's down_proj saw each batch once; its Hessian is the sum
        # over batches of its calibration-pass input alone. In the shared pass
        # that is the original layer (nothing of it quantized yet) run on the
        # quantized stream; in its own pass (independent), QEP has quantized
        # the whole model first: the quantized layer on the quantized stream
        name = f"model.layers.{index}.mlp.down_proj"
        assert len(gptq._inputs[name]) == NUM_SAMPLES, (pipeline, name)
        down_inputs = []
        reference = original if pipeline == "sequential" else model
        layer = reference.model.layers[index]
        feeds = iter(quantized_stream[layers[index]])
        handles = [
            # the original model, its layer fed the quantized stream instead
            layer.register_forward_pre_hook(lambda module, args: (next(feeds), *args[1:])),
            layer.mlp.down_proj.register_forward_hook(
                lambda module, args, output: down_inputs.append(args[0].double())
            ),
        ]
        with torch.no_grad():
            for row in input_ids:
                reference(input_ids=row[None])
        for handle in handles:
            handle.remove()
        expected = sum(2.0 * x.reshape(-1, x.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) for x in down_inputs)
        hessian, num_samples = gptq._hessians_seen[name]
        assert num_samples.item() == NUM_SAMPLES
        torch.testing.assert_close(hessian.double(), expected, rtol=1e-4, atol=1e-3)
