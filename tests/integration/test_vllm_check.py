"""qep_modifier.vllm_check: the spec comparison, the file-side reader, the wiring.

vLLM itself cannot be installed here (scripts/check_vllm.sh runs the real check in
its own environment); the last tests drive ``main`` with a stand-in for the few
vLLM APIs it calls, to check the plumbing around them, not vLLM.
"""

import contextlib
import math
import subprocess
import sys
import types

import pytest
import torch

from tests.models import group_scheme, quantize, save_tiny_llama, token_dataset
from qep_modifier import QEPModifier, vllm_check
from qep_modifier.vllm_check import (
    compare_specs,
    layer_sizes,
    quantized_layers,
    read_checkpoint_spec,
)

from tests.models import REPO
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SPEC = {
    "model.layers.0.mlp.up_proj.weight_packed": ("int32", (256, 12)),
    "model.layers.0.mlp.up_proj.weight_scale": ("float32", (256, 4)),
    "model.layers.0.mlp.up_proj.weight_shape": ("int64", (2,)),
}


def test_identical_specs_have_no_mismatch():
    assert compare_specs(SPEC, dict(SPEC)) == []
    assert compare_specs({}, {}) == []


def test_wrong_shape():
    actual = dict(SPEC)
    actual["model.layers.0.mlp.up_proj.weight_packed"] = ("int32", (256, 13))
    assert compare_specs(SPEC, actual) == [
        "wrong shape: model.layers.0.mlp.up_proj.weight_packed: file [256, 13], "
        "vLLM expects [256, 12]"
    ]


def test_missing_tensor():
    actual = dict(SPEC)
    del actual["model.layers.0.mlp.up_proj.weight_shape"]
    assert compare_specs(SPEC, actual) == [
        "missing tensor: model.layers.0.mlp.up_proj.weight_shape (vLLM expects int64 [2])"
    ]


def test_extra_tensor():
    actual = dict(SPEC)
    actual["model.layers.0.mlp.up_proj.weight_zero_point"] = ("int32", (24, 4))
    assert compare_specs(SPEC, actual) == [
        "extra tensor: model.layers.0.mlp.up_proj.weight_zero_point (int32 [24, 4]; "
        "vLLM creates no such parameter)"
    ]


def test_wrong_dtype():
    actual = dict(SPEC)
    actual["model.layers.0.mlp.up_proj.weight_scale"] = ("bfloat16", (256, 4))
    assert compare_specs(SPEC, actual) == [
        "wrong dtype: model.layers.0.mlp.up_proj.weight_scale: file bfloat16, "
        "vLLM expects float32"
    ]


def test_several_mismatches_one_line_each():
    actual = {"a": ("int64", (3,)), "c": ("int32", (1,))}
    expected = {"a": ("int32", (2,)), "b": ("float16", (1,))}
    lines = compare_specs(expected, actual)
    assert len(lines) == 4
    assert [line.split(":")[0] for line in lines] == [
        "wrong shape", "wrong dtype", "missing tensor", "extra tensor"
    ]


# ---------------------------------------------------------------- a real checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-check")
    model = save_tiny_llama(root / "tiny")
    output = root / "w3-g32"
    quantize(
        model,
        QEPModifier(targets="Linear", ignore=["lm_head"], config_groups=group_scheme(3, 32)),
        token_dataset(4, 32, seed=1),
        output_dir=str(output),
    )
    return output


def test_reader_finds_dense_3bit_layout(checkpoint):
    _assert_dense_layout(checkpoint, bits=3, group_size=32)


@pytest.mark.parametrize("recipe_file, bits, symmetric", [
    ("w3a16_spinquant_qep.yaml", 3, True),
    ("w3a16_asym_spinquant_qep.yaml", 3, False),
    ("w4a16_asym_spinquant_qep.yaml", 4, False),
    ("w4a16_spinquant_qep.yaml", 4, True),  # full-range grid: signed scales
    ("w2a16_asym_spinquant_qep.yaml", 2, False),
])
def test_spinquant_then_qep_is_a_plain_checkpoint_vllm_can_load(
    recipe_file, bits, symmetric, tmp_path, monkeypatch, capsys
):
    # R1 + R2 are fused into the weights: the saved model has the same dense
    # layout as any QEP checkpoint and reloads with the logits it had in memory
    import json

    from tests.models import load_model, logits

    model_dir = save_tiny_llama(tmp_path / "tiny")
    output = tmp_path / "spinquant"
    held_out = torch.tensor(token_dataset(2, 24, seed=3)["input_ids"])
    model = quantize(
        model_dir, str(REPO / "recipes" / recipe_file), token_dataset(4, 32, seed=1),
        output_dir=str(output),
    )
    in_memory = logits(model, held_out)
    torch.testing.assert_close(logits(load_model(output), held_out), in_memory, rtol=1e-4, atol=1e-4)
    _assert_dense_layout(output, bits=bits, group_size=64, scale_dtype="float32", symmetric=symmetric)
    # the config records the rotations, all at weight locations (fused offline):
    # vLLM runs only input/output (online) transforms at serving time
    config = json.loads((output / "config.json").read_text())["quantization_config"]
    locations = {
        apply["location"]
        for group in config["transform_config"]["config_groups"].values()
        for apply in group["apply"]
    }
    assert locations <= {"weight_input", "weight_output"}, locations
    fake_vllm(monkeypatch, packing="dense")
    assert vllm_check.main([str(output)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("OK: vLLM 0.33.0+fake creates")


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_the_value_rotation_recipe_is_a_plain_checkpoint_vllm_can_load(family, tmp_path, monkeypatch, capsys):
    # the rotation is fused into the weights before calibration: no transform is
    # recorded, the layout is the plain symmetric one (signed full-range scales)
    import json

    from tests.models import load_model, logits, save_tiny_family

    model_dir = save_tiny_family(tmp_path / family, family)
    output = tmp_path / "values"
    held_out = torch.tensor(token_dataset(2, 24, seed=3)["input_ids"])
    model = quantize(
        model_dir, str(REPO / "recipes" / "w3a16_values_qep.yaml"), token_dataset(4, 32, seed=1),
        output_dir=str(output),
    )
    torch.testing.assert_close(logits(load_model(output), held_out), logits(model, held_out), rtol=1e-4, atol=1e-4)
    linears = sorted(
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    )
    assert quantized_layers(read_checkpoint_spec(output)) == linears
    _assert_packed_layers(output, linears, bits=3, group_size=64)
    config = json.loads((output / "config.json").read_text())["quantization_config"]
    assert not config.get("transform_config")  # no transform recorded: nothing runs at serving time
    fake_vllm(monkeypatch, packing="dense")
    assert vllm_check.main([str(output)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("OK: vLLM 0.33.0+fake creates")


def _assert_dense_layout(checkpoint, bits, group_size, scale_dtype="float32", symmetric=True):
    spec = read_checkpoint_spec(checkpoint)
    prefixes = quantized_layers(spec)
    assert prefixes == sorted(
        f"model.layers.{layer}.{'mlp' if name in LINEARS[4:] else 'self_attn'}.{name}"
        for layer in range(3)
        for name in LINEARS
    )
    sizes = layer_sizes(checkpoint)
    # tiny Llama: hidden 128, intermediate 256, 4 heads of 32, 2 KV heads
    assert sizes["model.layers.0.self_attn.k_proj"] == (64, 128)
    assert sizes["model.layers.0.mlp.down_proj"] == (128, 256)
    _assert_packed_layers(checkpoint, prefixes, bits, group_size, scale_dtype, symmetric)
    assert spec["lm_head.weight"] == ("float32", (256, 128))  # ignored: stays dense


def _assert_packed_layers(checkpoint, prefixes, bits, group_size, scale_dtype="float32", symmetric=True):
    """Every layer of ``prefixes`` packed at ``bits`` with one scale per group."""
    spec = read_checkpoint_spec(checkpoint)
    sizes = layer_sizes(checkpoint)
    assert set(sizes) == set(prefixes)
    for prefix in prefixes:
        out_features, in_features = sizes[prefix]
        assert spec[f"{prefix}.weight_packed"] == (
            "int32",
            (out_features, math.ceil(in_features * bits / 32)),  # dense: bits back to back
        )
        assert spec[f"{prefix}.weight_scale"][1] == (out_features, in_features // group_size)
        assert spec[f"{prefix}.weight_scale"][0] == scale_dtype
        assert spec[f"{prefix}.weight_shape"] == ("int64", (2,))
        assert f"{prefix}.weight" not in spec
        if symmetric:
            assert f"{prefix}.weight_zero_point" not in spec
        else:  # one zero point per group, packed along the output dimension
            assert spec[f"{prefix}.weight_zero_point"] == (
                "int32", (math.ceil(out_features * bits / 32), in_features // group_size)
            )


def _checkpoint_writer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vllm_checkpoints", REPO / "scripts" / "vllm_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_script_writes_scheme_and_recipe_checkpoints(tmp_path, capsys):
    # scripts/check_vllm.sh hands these folders to vLLM: each must be a dense
    # pack-quantized checkpoint, and the script prints each folder it wrote
    written = _checkpoint_writer().main(
        [str(tmp_path), "--schemes", "w2-asym", "--recipes", "w3a16_asym_spinquant_qep"]
    )
    assert written == [tmp_path / "w2-g32-asym", tmp_path / "recipe-w3a16_asym_spinquant_qep"]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
    assert printed == [f"wrote {folder}" for folder in written]
    _assert_dense_layout(written[0], bits=2, group_size=32, symmetric=False)
    _assert_dense_layout(written[1], bits=3, group_size=64, symmetric=False)


def test_check_script_writes_the_full_range_grid_with_signed_scales(tmp_path):
    # the full-range grid is the symmetric layout (same tensors, no zero points) with
    # some scales negative: what vLLM's loader classes are shown
    from safetensors.torch import load_file

    (written,) = _checkpoint_writer().main([str(tmp_path), "--schemes", "w3-full", "--recipes", "none"])
    assert written == tmp_path / "w3-g32-full"
    _assert_dense_layout(written, bits=3, group_size=32, symmetric=True)
    scales = [tensor for name, tensor in load_file(str(written / "model.safetensors")).items() if name.endswith("weight_scale")]
    assert scales and any((scale < 0).any() for scale in scales) and any((scale > 0).any() for scale in scales)


def test_check_script_writes_a_family_checkpoint_with_its_biases(tmp_path):
    from safetensors import safe_open

    (folder,) = _checkpoint_writer().main(
        [str(tmp_path), "--schemes", "none", "--recipes", "none", "--families", "opt"]
    )
    assert folder == tmp_path / "family-opt"
    import json

    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    (file,) = folder.glob("*.safetensors")
    with safe_open(str(file), framework="pt") as handle:
        names = set(handle.keys())
    assert "model.decoder.layers.0.fc1.weight_packed" in names
    assert "model.decoder.layers.0.fc1.bias" in names


@pytest.mark.parametrize("argv, message", [
    (["--schemes", "w5-sym"], "--schemes: unknown ['w5-sym']"),
    (["--recipes", "w9a16_nothing"], "--recipes: no ['w9a16_nothing']"),
    (["--families", "gpt2"], "--families: unknown ['gpt2']"),
])
def test_check_script_refuses_unknown_schemes_and_recipes(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _checkpoint_writer().parse_args([str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_module_imports_no_llmcompressor_as_a_file():
    code = (
        "import sys; sys.path.insert(0, 'qep_modifier'); import vllm_check; "
        "bad = [m for m in ('llmcompressor', 'compressed_tensors', 'torch', 'vllm') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is not None, reason="vLLM is installed"
)
def test_without_vllm_the_error_says_how_to_get_it(checkpoint):
    with pytest.raises(SystemExit) as raised:
        vllm_check.main([str(checkpoint)])
    message = str(raised.value)
    assert "vLLM is not installed" in message and "scripts/check_vllm.sh" in message


# ---------------------------------------------------------------- the plumbing


def fake_vllm(monkeypatch, packing: str, kernel_error: bool = False, reject_config=False):
    """Just enough of vLLM's module tree for ``vllm_check.vllm_expected_spec``.

    Its scheme creates the parameters of a compressed-tensors WNA16 layer with
    ``packing`` "dense" (ceil(K * bits / 32) words per row) or "integer" (K // (32 //
    bits), the layout of a fixed whole number of values per word); for asymmetric
    weights also a ``weight_zero_point`` per group, packed the same way along the
    output dimension.
    """
    calls = []

    def module(name, **attributes):
        made = types.ModuleType(name)
        made.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, made)
        return made

    @contextlib.contextmanager
    def set_current_vllm_config(config):
        calls.append("config")
        yield

    def choose_mp_linear_kernel(config):
        if kernel_error:
            raise ValueError("Failed to find a kernel that can implement the WNA16 linear layer.")
        return type("FakeKernel", (), {"__init__": lambda self, *a, **k: None})

    scheme_module = module("vllm.fake_wna16", choose_mp_linear_kernel=choose_mp_linear_kernel)

    class Scheme:
        def __init__(self, bits, group_size, symmetric):
            self.bits, self.group_size, self.symmetric = bits, group_size, symmetric

        def create_weights(self, layer, output_size, input_size, output_partition_sizes,
                           input_size_per_partition, params_dtype, weight_loader, **kwargs):
            n, k = sum(output_partition_sizes), input_size_per_partition

            def words(values):
                return math.ceil(values * self.bits / 32) if packing == "dense" else values // (32 // self.bits)

            kernel = scheme_module.choose_mp_linear_kernel(None)
            zero_point = [] if self.symmetric else [
                ("weight_zero_point", (words(n), k // self.group_size), torch.int32)
            ]
            for name, shape, dtype in [
                ("weight_packed", (n, words(k)), torch.int32),
                ("weight_scale", (n, k // self.group_size), params_dtype),
                ("weight_shape", (2,), torch.int64),
                *zero_point,
            ]:
                layer.register_parameter(
                    name, torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
                )
            self.kernel = kernel()

    Scheme.__module__ = "vllm.fake_wna16"

    class CompressedTensorsConfig:
        @classmethod
        def from_config(cls, config):
            if reject_config:
                raise ValueError("zp_dtype: Extra inputs are not permitted")
            made = cls()
            made.weights = config["config_groups"]["group_0"]["weights"]
            made.ignore = config["ignore"]
            return made

        def get_scheme(self, layer, layer_name=None):
            assert isinstance(layer, torch.nn.Linear)
            calls.append(("scheme", layer_name, layer.out_features, layer.in_features))
            if layer_name in self.ignore:
                return None
            return Scheme(
                self.weights["num_bits"], self.weights["group_size"], self.weights.get("symmetric", True)
            )

    module("vllm", __version__="0.33.0+fake")
    module("vllm.config", VllmConfig=lambda: object(), set_current_vllm_config=set_current_vllm_config)
    module(
        "vllm.distributed",
        init_distributed_environment=lambda **kwargs: calls.append(("init", kwargs)),
        ensure_model_parallel_initialized=lambda tp, pp: calls.append(("groups", tp, pp)),
    )
    for name in ["vllm.model_executor", "vllm.model_executor.layers",
                 "vllm.model_executor.layers.quantization",
                 "vllm.model_executor.layers.quantization.compressed_tensors"]:
        module(name)
    module(
        "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors",
        CompressedTensorsConfig=CompressedTensorsConfig,
    )
    return calls


def test_main_passes_when_vllm_creates_the_file_layout(checkpoint, monkeypatch, capsys):
    calls = fake_vllm(monkeypatch, packing="dense")
    assert vllm_check.main([str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith(
        "OK: vLLM 0.33.0+fake creates exactly the file's 63 tensors for all 21 quantized "
        "Linear layers"
    )
    init = [call for call in calls if call[0] == "init"][0][1]
    assert init["world_size"] == 1 and init["backend"] == "gloo"
    assert init["distributed_init_method"].startswith("tcp://127.0.0.1:")
    assert ("groups", 1, 1) in calls
    assert ("scheme", "model.layers.0.mlp.down_proj", 128, 256) in calls


def test_main_reports_each_mismatch_and_fails(checkpoint, monkeypatch, capsys):
    fake_vllm(monkeypatch, packing="integer")
    assert vllm_check.main([str(checkpoint)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    # K = 128: 128 // 10 = 12 = ceil(384 / 32), same; K = 256 (down_proj): 25 vs 24
    mismatches = [line for line in lines if line.startswith("wrong shape")]
    assert mismatches == [
        f"wrong shape: model.layers.{layer}.mlp.down_proj.weight_packed: file [128, 24], "
        "vLLM expects [128, 25]"
        for layer in range(3)
    ]
    assert lines[-1].startswith("FAIL: 3 problem(s); 21 quantized Linear layers")


def test_main_notes_a_missing_kernel_but_checks_the_layout(checkpoint, monkeypatch, capsys):
    fake_vllm(monkeypatch, packing="dense", kernel_error=True)
    assert vllm_check.main([str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "note: vLLM has no kernel on this machine for 21 layer(s)" in out
    assert vllm_check.main([str(checkpoint), "--require-kernel"]) == 1
    assert capsys.readouterr().out.count("no vLLM kernel: ") == 21


def test_main_reports_an_unreadable_quantization_config(checkpoint, monkeypatch, capsys):
    fake_vllm(monkeypatch, packing="dense", reject_config=True)
    assert vllm_check.main([str(checkpoint)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == (
        "vLLM cannot read the quantization_config: ValueError: "
        "zp_dtype: Extra inputs are not permitted"
    )
    assert lines[-1].startswith("FAIL: 1 problem(s)")


def test_main_checks_several_checkpoints_in_one_process(checkpoint, tmp_path, monkeypatch, capsys):
    import json
    import shutil

    broken = tmp_path / "no-quantization-config"
    shutil.copytree(checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["quantization_config"]
    (broken / "config.json").write_text(json.dumps(config))
    fake_vllm(monkeypatch, packing="dense")
    assert vllm_check.main([str(checkpoint), str(broken)]) == 1
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0] == f"== {checkpoint}"
    assert lines[1].startswith("OK: vLLM 0.33.0+fake creates exactly the file's 63 tensors")
    assert f"== {broken}" in lines
    assert f"{broken}/config.json has no quantization_config" in captured.err
    assert lines[-2:] == ["1 of 2 checkpoints do not match vLLM:", f"  {broken}"]
    fake_vllm(monkeypatch, packing="dense")
    assert vllm_check.main([str(checkpoint), str(checkpoint)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "all 2 checkpoints match what vLLM creates"


def test_main_expects_the_bias_vllm_creates_beside_a_biased_linear(checkpoint, tmp_path, monkeypatch, capsys):
    """A quantized Linear with a bias (OPT, GPT-NeoX, Qwen2's q/k/v): vLLM's linear layer
    creates ``bias`` itself (one per output feature, in the model dtype), so the file's bias
    is expected, and one of another size is a mismatch."""
    import shutil

    from safetensors.torch import load_file, save_file

    biased = tmp_path / "biased"
    shutil.copytree(checkpoint, biased)
    (file,) = biased.glob("*.safetensors")
    tensors = load_file(file)
    out_features = int(tensors["model.layers.0.self_attn.q_proj.weight_shape"][0])
    up_features = int(tensors["model.layers.0.mlp.up_proj.weight_shape"][0])
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(out_features)
    tensors["model.layers.0.mlp.up_proj.bias"] = torch.zeros(up_features + 1)
    save_file(tensors, file, metadata={"format": "pt"})
    fake_vllm(monkeypatch, packing="dense")
    assert vllm_check.main([str(biased)]) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("wrong", "missing", "extra"))]
    assert problems == [
        f"wrong shape: model.layers.0.mlp.up_proj.bias: file [{up_features + 1}], vLLM expects [{up_features}]"
    ]
