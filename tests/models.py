"""Tiny models, tokenizers and calibration data for the tests (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 256
REPO = Path(__file__).resolve().parents[1]


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def word_level_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{index}": index for index in range(3, vocab_size)})
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def save_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny Llama with a tokenizer beside it, saved to ``folder``."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.save_pretrained(folder)
    word_level_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def token_dataset(
    num_samples: int, seq_len: int, seed: int, vocab_size: int = VOCAB_SIZE
) -> Dataset:
    """Random token sequences with some repeated structure, as a Dataset."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(3, vocab_size, (num_samples, seq_len), generator=generator)
    return Dataset.from_dict(
        {
            "input_ids": rows.tolist(),
            "attention_mask": torch.ones_like(rows).tolist(),
        }
    )


def quantize(model_dir, recipe, dataset: Dataset, **kwargs):
    """Run llm-compressor's oneshot on a saved (or loaded) model, samples in order."""
    from llmcompressor import oneshot

    settings = dict(
        num_calibration_samples=len(dataset),
        max_seq_length=len(dataset[0]["input_ids"]),
        shuffle_calibration_samples=False,
    )
    settings.update(kwargs)
    if isinstance(model_dir, torch.nn.Module):
        from transformers import AutoTokenizer

        settings.setdefault("processor", AutoTokenizer.from_pretrained(model_dir.name_or_path))
        return oneshot(model=model_dir, dataset=dataset, recipe=recipe, **settings)
    return oneshot(model=str(model_dir), dataset=dataset, recipe=recipe, **settings)


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def group_scheme(num_bits: int, group_size: int | None, symmetric: bool = True, actorder=None, observer=None):
    """``config_groups`` for weight-only int on every Linear."""
    weights = {"num_bits": num_bits, "type": "int", "symmetric": symmetric}
    if observer is not None:
        weights["observer"] = observer
    if group_size is None:
        weights["strategy"] = "channel"
    else:
        weights.update(strategy="group", group_size=group_size)
    if actorder is not None:
        weights["actorder"] = actorder
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def quantized_linears(model) -> dict[str, dict[str, torch.Tensor]]:
    """weight, weight_scale and weight_zero_point of every quantized Linear."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale"):
            found[name] = {
                key: getattr(module, key).detach().clone()
                for key in ("weight", "weight_scale", "weight_zero_point")
            }
    return found


def norm_weights(model) -> dict[str, torch.Tensor]:
    """The weight of every RMSNorm (block tuning changes them)."""
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if type(module).__name__.endswith("RMSNorm")
    }


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


def save_tiny_qwen3_moe(folder: Path, seed: int = 0, unrouted_experts: bool = False) -> Path:
    """A random tiny Qwen3-MoE (2 layers, 4 experts) with a tokenizer beside it.

    ``unrouted_experts``: top-1 routing whose router rows are ``w, -w, 0, 0``, so
    every token goes to expert 0 or 1 and experts 2 and 3 never get a token.
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=1 if unrouted_experts else 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(config)
    if unrouted_experts:
        with torch.no_grad():
            for layer in model.model.layers:
                router = layer.mlp.gate.weight
                router[1] = -router[0]
                router[2:] = 0.0
    model.save_pretrained(folder)
    word_level_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


def inputs_of(model, names, input_ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """What ``model`` feeds each named module (its first argument), one tensor
    per sample of ``input_ids``."""
    captured = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: captured[name].append(args[0].clone())
        )
        for name in names
    ]
    with torch.no_grad():
        for row in input_ids:
            model(input_ids=row[None])
    for handle in handles:
        handle.remove()
    return captured


#: Tiny random decoders of the families the toolkit and vLLM load (issue 26): the
#: model type and the config fields (2 layers, widths 128 / 256 so that every shipped
#: recipe's group, 64 or the W4A16 preset's 128, divides every Linear's input width).
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"head_dim": 32, "sliding_window": None}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "qwen3_moe": (
        "qwen3_moe",
        {"head_dim": 32, "moe_intermediate_size": 128, "num_experts": 4, "num_experts_per_tok": 2},
    ),
    "gemma2": ("gemma2", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16}),
    "gemma3": ("gemma3_text", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "gpt_neox": ("gpt_neox", {"rotary_pct": 0.25}),
    "opt": ("opt", {"ffn_dim": 256, "word_embed_proj_dim": 128, "do_layer_norm_before": True}),
    "falcon": ("falcon", {"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True}),
    "gpt2": ("gpt2", {"n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 128}),
}

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def family_config(family: str, **overrides):
    """The transformers config of ``family``'s tiny random model (:data:`FAMILIES`)."""
    from transformers import AutoConfig

    model_type, fields = FAMILIES[family]
    config = AutoConfig.for_model(model_type)
    settings = {key: value for key, value in _COMMON.items() if hasattr(config, key)}
    settings.update(fields)
    settings.update(overrides)
    return AutoConfig.for_model(model_type, **settings)


def tiny_family_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random tiny model of ``family`` (:data:`FAMILIES`), in memory. Norm weights
    and biases are randomised too (their initial ones and zeros would hide a norm
    that is tuned or rotated the wrong way)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                parameter.add_(0.1 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.02)
    return model.to(dtype).eval()


def save_tiny_family(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """:func:`tiny_family_model` with a tokenizer beside it, saved to ``folder``."""
    model = tiny_family_model(family, seed, **overrides)
    model.save_pretrained(folder)
    word_level_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``||output - reference||^2 / ||reference||^2`` (logits on held-out tokens)."""
    return float((output - reference).pow(2).sum() / reference.pow(2).sum())


@torch.no_grad()
def round_to_nearest(model, names, args):
    """``model`` with the weights of ``names`` rounded to ``args``' grid (min-max
    scales per group: round-to-nearest as the toolkit's default observer does it).
    Mixture-of-experts blocks are first split into Linears as ``oneshot`` does."""
    from compressed_tensors.quantization.lifecycle import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes, linearize_moe

    if get_non_linearized_moes(model):
        linearize_moe(model)
    for name in names:
        weight = model.get_submodule(name).weight
        groups = weight.reshape(weight.shape[0], -1, args.group_size)
        scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        weight.copy_(fake_quantize(weight, scale, zero_point, args))
    return model


def assert_reloads_packed(model, folder: Path, input_ids: torch.Tensor) -> None:
    """Save ``model`` compressed to ``folder``: the format is pack-quantized and
    the reloaded model gives the same logits on ``input_ids``."""
    import json

    expected = logits(model, input_ids)
    model.save_pretrained(folder, save_compressed=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    torch.testing.assert_close(logits(load_model(folder), input_ids), expected, rtol=1e-4, atol=1e-4)


class ToyMlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class ToyMlpLayer(torch.nn.Module):
    """A residual MLP of width 4 (``out``: a Linear of the layer itself, unused by forward)."""

    def __init__(self):
        super().__init__()
        self.mlp, self.out = ToyMlp(), torch.nn.Linear(4, 4)

    def forward(self, hidden_states):
        return hidden_states + self.mlp(hidden_states)
