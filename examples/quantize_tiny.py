"""Quantize a tiny random Llama with QEP (or plain GPTQ) and compare it to full precision.

    python examples/quantize_tiny.py                   # QEPModifier, recipes/w4a16_qep_gptq.yaml
    python examples/quantize_tiny.py --modifier gptq   # llm-compressor's GPTQModifier, W4A16

No model hub is needed: the model is built from a config with random weights and the
tokenizer is a byte-level BPE trained in memory on a little English text. The weights are
random, so perplexity means little here; the main number is the relative error of the
quantized model's logits against the full-precision ones on held-out tokens.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TEXT_PATH = REPO.parent / "shared" / "bench" / "austen.txt"
DEFAULT_RECIPE = REPO / "recipes" / "w4a16_qep_gptq.yaml"
DEFAULT_OUTPUT = Path("out/tiny-qep-w4")  # this example's own: a later run replaces it

# The tokenizer is used before datasets forks; silence the fork warning it would print.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Used only when ../shared/bench/austen.txt is not there.
FALLBACK_TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune,
must be in want of a wife. However little known the feelings or views of such a man may be
on his first entering a neighbourhood, this truth is so well fixed in the minds of the
surrounding families, that he is considered the rightful property of some one or other of
their daughters. The family of Dashwood had long been settled in Sussex. Their estate was
large, and their residence was at Norland Park, in the centre of their property, where, for
many generations, they had lived in so respectable a manner as to engage the general good
opinion of their surrounding acquaintance. Emma Woodhouse, handsome, clever, and rich, with a
comfortable home and happy disposition, seemed to unite some of the best blessings of
existence; and had lived nearly twenty-one years in the world with very little to distress or
vex her. No one who had ever seen Catherine Morland in her infancy would have supposed her born
to be an heroine. Her situation in life, the character of her father and mother, her own
person and disposition, were all equally against her.
"""

TINY_CONFIG = dict(
    vocab_size=512,
    hidden_size=128,  # W4A16 uses groups of 128 along the input: widths must be multiples
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def load_text(max_chars: int = 400_000) -> str:
    """Up to ``max_chars`` characters of English text (Austen if available)."""
    if TEXT_PATH.is_file():
        return TEXT_PATH.read_text(encoding="utf-8")[:max_chars]
    # Repeat the paragraph so that there are enough tokens for calibration and evaluation.
    return FALLBACK_TEXT * 40


def build_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer with ``vocab_size`` entries, trained in memory on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines()
    tok.train_from_iterator((lines[i : i + 256] for i in range(0, len(lines), 256)), trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, model {vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos, unk_token=eos
    )


def build_tiny_llama(folder: str | Path, seed: int = 0, text: str | None = None):
    """Save a tiny random ``LlamaForCausalLM`` and a matching tokenizer to ``folder``.

    oneshot needs a model it can load from disk and a tokenizer beside it, so both are
    saved. Returns ``(folder, tokenizer)``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    if text is None:
        text = load_text()
    tokenizer = build_tokenizer(text, TINY_CONFIG["vocab_size"])
    config = LlamaConfig(
        **TINY_CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def token_windows(ids: list[int], n: int, length: int, start: int = 0) -> torch.Tensor:
    """``n`` consecutive non-overlapping windows of ``length`` tokens from ``ids[start:]``."""
    need = start + n * length
    if len(ids) < need:
        raise ValueError(f"need {need} tokens, the text gives {len(ids)}")
    return torch.tensor(ids[start:need], dtype=torch.long).view(n, length)


@torch.no_grad()
def logits_of(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(input_ids=w[None]).logits.float() for w in windows])


def perplexity(logits: torch.Tensor, windows: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    )
    return float(torch.exp(nll))


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over windows of ||logits - reference|| / ||reference||."""
    diff = (logits - reference).flatten(1).norm(dim=1)
    return float((diff / reference.flatten(1).norm(dim=1)).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--modifier",
        choices=["qep", "gptq"],
        default="qep",
        help="qep: QEPModifier from --recipe; gptq: llm-compressor's GPTQModifier, W4A16",
    )
    parser.add_argument(
        "--recipe", type=Path, default=DEFAULT_RECIPE, help="recipe for --modifier qep"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="a new or empty folder; the default is replaced when it holds a checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing checkpoint folder at --output whole")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--eval-samples", type=int, default=8, help="held-out windows")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per window")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from llmcompressor import oneshot

    from qep_modifier.workflow import check_output, one_line_errors, save_checkpoint

    overwrite = args.overwrite or args.output == DEFAULT_OUTPUT
    with one_line_errors("quantize_tiny.py"):
        check_output(args.output, overwrite)

    if args.modifier == "qep":
        import qep_modifier  # noqa: F401  (registers QEPModifier for the recipe parser)

        recipe = str(args.recipe)
    else:
        from llmcompressor.modifiers.gptq import GPTQModifier

        recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], scheme="W4A16")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tiny-llama-") as tmp:
        text = load_text()
        folder, tokenizer = build_tiny_llama(tmp, seed=args.seed, text=text)
        ids = tokenizer(text)["input_ids"]
        calib = token_windows(ids, args.samples, args.seq_len)
        # Held-out windows start after the calibration ones: no token is shared.
        heldout = token_windows(ids, args.eval_samples, args.seq_len, start=calib.numel())

        fp_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        fp_logits = logits_of(fp_model, heldout)
        del fp_model

        dataset = Dataset.from_dict({"input_ids": calib.tolist()})
        model = oneshot(
            model=str(folder),
            dataset=dataset,
            recipe=recipe,
            max_seq_length=args.seq_len,
            num_calibration_samples=args.samples,
            shuffle_calibration_samples=False,
        )
        model.eval()
        q_logits = logits_of(model, heldout)

        # float32 as calibrated: the reloaded logits are compared with these
        save_checkpoint(model, tokenizer, args.output, dtype=None, overwrite=overwrite)

    reloaded = AutoModelForCausalLM.from_pretrained(args.output, dtype=torch.float32).eval()
    r_logits = logits_of(reloaded, heldout)
    elapsed = time.perf_counter() - t0

    name = args.recipe.stem if args.modifier == "qep" else "gptq W4A16"
    rows = [
        ("FP32", fp_logits),
        (name, q_logits),
        (name + " (reloaded)", r_logits),
    ]
    print()
    print(f"tiny random Llama, {args.samples} x {args.seq_len} calibration tokens, "
          f"{args.eval_samples} x {args.seq_len} held-out tokens")
    print(f"{'model':<30}{'rel. logits error':>19}{'perplexity':>12}")
    for label, logits in rows:
        print(f"{label:<30}{relative_error(logits, fp_logits):>19.4f}"
              f"{perplexity(logits, heldout):>12.2f}")
    print("(random weights: perplexity is near the vocabulary size and means little; "
          "the logits error is the number to read)")
    reload_diff = float((r_logits - q_logits).abs().max())
    match = torch.allclose(r_logits, q_logits, rtol=1e-3, atol=1e-3)
    print(f"saved compressed to {args.output}; reloaded logits "
          f"{'match' if match else 'DO NOT match'} the in-memory quantized model "
          f"(max abs diff {reload_diff:.2e})")
    print(f"done in {elapsed:.1f} s")
    if not match:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
