"""QEP under torch.distributed (two gloo ranks on CPU, one sample each) equals one
process on the same two samples, bit for bit."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from qep_modifier import QEPModifier
from tests.integration.distributed_cases import CASES, W3, both_samples
from tests.models import (
    REPO, VOCAB_SIZE, load_model, norm_weights, quantize, quantized_linears, save_tiny_llama, save_tiny_qwen3_moe,
)

WORLD_SIZE = 2
RUN = [name for name in CASES if name != "identical_data"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed-models")
    save_tiny_llama(root / "llama")
    save_tiny_llama(root / "tied", tie_word_embeddings=True)
    save_tiny_qwen3_moe(root / "moe")
    return root


@pytest.fixture(scope="module")
def two_ranks(models, tmp_path_factory):
    """Run every case on two ranks (one process each); their outputs' folder."""
    output = tmp_path_factory.mktemp("distributed-output")
    init = f"file://{output / 'rendezvous'}"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # each rank's output goes to a file, not a pipe: a pipe read only after the other
    # rank finished fills up (progress bars), blocks its writer inside a collective,
    # and the two ranks then wait for each other
    log_paths = [output / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    ranks = []
    for rank, log_path in enumerate(log_paths):
        with log_path.open("w") as log:
            ranks.append(subprocess.Popen(
                [sys.executable, "-m", "tests.integration.distributed_worker", "--rank", str(rank),
                 "--world-size", str(WORLD_SIZE), "--init", init, "--models", str(models),
                 "--output", str(output), "--cases", ",".join(CASES)],
                cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT, text=True,
            ))
    for process in ranks:
        try:
            process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.kill()
            pytest.fail("the two ranks did not finish (a deadlock?)")
    logs = [path.read_text() for path in log_paths]
    assert all(process.returncode == 0 for process in ranks), logs[0][-3000:] + logs[1][-3000:]
    return output


def differences(first: dict, second: dict) -> list[str]:
    """``module.tensor`` names whose values are not bit for bit equal."""
    if first.keys() != second.keys():
        return sorted(set(first) ^ set(second))
    return [
        f"{name}.{key}"
        for name in first
        for key in first[name]
        if not torch.equal(first[name][key], second[name][key])
    ]


@contextlib.contextmanager
def _ranks_thread_count():
    """One thread, as each rank runs (a product's summation order depends on
    the thread count); the previous count restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _single_process(models, name, samples=None, recipe=None):
    """The reference: one process, both samples, the ranks' thread count
    (``recipe``: another recipe on the case's model and samples)."""
    case = CASES[name]
    modifier = (recipe or case.recipe)()
    with _ranks_thread_count():
        model = quantize(
            load_model(models / case.model), modifier, samples or both_samples(case),
            batch_size=1, **case.oneshot,
        )
    return quantized_linears(model), modifier.error_report, norm_weights(model)


@pytest.mark.parametrize("name", RUN)
def test_two_ranks_equal_one_process_bit_for_bit(models, two_ranks, name):
    errors = list(two_ranks.glob(f"{name}-rank*.error"))
    assert not errors, errors[0].read_text()
    results = [torch.load(two_ranks / f"{name}-rank{rank}.pt") for rank in range(WORLD_SIZE)]
    weights, report, norms = _single_process(models, name)
    assert len(weights) >= 14
    for rank, result in enumerate(results):
        assert differences(result["weights"], weights) == [], (name, rank)
        assert differences({"norms": result["norms"]}, {"norms": norms}) == [], (name, rank)
    # the error report is gathered from every rank, in the single-process order
    assert results[0]["report"] == report
    if name == "report":
        assert len(report) == 21
    if name.startswith("block_tuning"):
        untouched = norm_weights(load_model(models / "llama"))
        moved = [not torch.equal(norms[key], untouched[key]) for key in untouched if ".layers." in key]
        # the tuning was kept (norms moved) or, diverging, undone, the same on both ranks
        assert not any(moved) if name == "block_tuning_fallback" else all(moved)
    if name == "block_tuning_codes":  # layer 0's codes moved from those the held-codes run keeps
        held, _, _ = _single_process(models, name, recipe=lambda: QEPModifier(block_tuning_epochs=4, **W3))
        for role in ("self_attn.q_proj", "mlp.down_proj"):
            module = f"model.layers.0.{role}"
            groups = torch.arange(weights[module]["weight"].shape[1]) // 32
            codes = [w[module]["weight"] / w[module]["weight_scale"][:, groups] for w in (held, weights)]
            assert not torch.equal(codes[0].round(), codes[1].round()), module


def test_the_comparison_can_fail(models, two_ranks):
    # the same harness against a reference on other data reports differences
    case = CASES["qep"]
    other = both_samples(case).select([0, 0])
    weights, _, _ = _single_process(models, "qep", other)
    result = torch.load(two_ranks / "qep-rank1.pt")
    assert differences(result["weights"], weights)


def test_identical_data_on_every_rank_is_refused(two_ranks):
    for rank in range(WORLD_SIZE):
        message = (two_ranks / f"identical_data-rank{rank}.error").read_text()
        assert "ranks 0 and 1 got the same calibration batches" in message
        assert "shard" in message


def test_the_example_saves_what_one_process_saves(models, tmp_path):
    """examples/distributed_oneshot.py under torchrun, two ranks, one window each,
    down to the saved checkpoint (saving is collective in compressed-tensors: a
    rank-0-only save waits forever), equals one process's checkpoint tensor for
    tensor."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qep_modifier.workflow import calibration_windows, quantize, save_checkpoint

    words = torch.randint(3, VOCAB_SIZE, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in words))
    recipe = REPO / "recipes" / "w3a16_qep_gptq.yaml"
    arguments = ["--model", str(models / "llama"), "--recipe", str(recipe), "--text", str(text),
                 "--num-samples", "2", "--seq-len", "32"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
         str(REPO / "examples" / "distributed_oneshot.py"), *arguments, "--output", str(tmp_path / "two")],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads(line[5:]) for line in run.stdout.splitlines() if line.startswith("RANK ")]
    assert sorted(rank["rank"] for rank in ranks) == [0, 1], run.stdout[-3000:]

    tokenizer = AutoTokenizer.from_pretrained(models / "llama")
    with _ranks_thread_count():
        model = AutoModelForCausalLM.from_pretrained(models / "llama", dtype="auto")
        windows = calibration_windows(tokenizer, text, 2, 32, 0)
        save_checkpoint(quantize(model, recipe, windows, processor=tokenizer), tokenizer, tmp_path / "one")
    two, one = (load_file(tmp_path / name / "model.safetensors") for name in ("two", "one"))
    assert two.keys() == one.keys() and any(name.endswith("weight_packed") for name in one)
    assert [name for name in one if not torch.equal(one[name], two[name])] == []
