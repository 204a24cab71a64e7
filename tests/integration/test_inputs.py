"""Every bad input to qep-oneshot, qep-eval and the distributed example ends in one
line, before any model is loaded (issue 24, items 4 and 5); a NaN checkpoint
fails qep-eval naming the first non-finite logits; a hung rank fails the others
at the collective timeout, naming the step."""

import datetime
import importlib.util
import multiprocessing
import os
import shutil
import signal
import sys
import time
import types

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM

from qep_modifier import cli, distributed, workflow
from tests.models import REPO, save_tiny_llama, tiny_llama_config, word_level_tokenizer

RECIPE = REPO / "recipes" / "w4a16_qep_gptq.yaml"
SEQ_LEN = 32
TEXT_TOKENS = 600  # 568 distinct windows of 32 tokens, 18 without overlap


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    model = save_tiny_llama(root / "tiny", num_hidden_layers=1)  # 256 positions
    text = root / "calib.txt"
    text.write_text(" ".join(f"w{3 + i % 200}" for i in range(TEXT_TOKENS)))
    return root, model, text


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model for calibration or evaluation fails the test: every check
    must come before."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was refused")

    monkeypatch.setattr(workflow, "quantize", loaded)
    monkeypatch.setattr(workflow, "load_causal_lm", loaded)


def refused(program, argv) -> str:
    """The one line ``program`` (``oneshot_main`` or ``eval_main``) ends with."""
    with pytest.raises(SystemExit) as ended:
        program(argv)
    message = str(ended.value)
    name = "qep-oneshot" if program is cli.oneshot_main else "qep-eval"
    assert message.startswith(f"{name}: ") and "\n" not in message, message
    assert "Traceback" not in message
    return message


def oneshot_refused(workspace, *options, dataset=None, model=None) -> str:
    root, tiny, text = workspace
    message = refused(cli.oneshot_main, [
        "--model", str(model or tiny), "--recipe", str(RECIPE),
        "--dataset", str(dataset or text), "--seq-len", str(SEQ_LEN), "--num-samples", "2",
        *options, "--output", str(root / "never"),
    ])
    assert not (root / "never").exists()
    return message


# ------------------------------------------------------------------ --dataset


def test_non_utf8_dataset_names_the_byte_offset(workspace, nothing_loads):
    latin1 = workspace[0] / "latin1.txt"
    latin1.write_bytes("w3 w4 caf\u00e9 w5".encode("latin-1"))
    message = oneshot_refused(workspace, dataset=latin1)
    assert f"text file {latin1} is not UTF-8 text: byte 0xe9 at offset 9" in message


def test_binary_dataset_names_the_nul_byte(workspace, nothing_loads):
    binary = workspace[0] / "weights.bin"
    binary.write_bytes(b"w3 w4" + bytes(range(256)))
    message = oneshot_refused(workspace, dataset=binary)
    assert f"text file {binary} is binary (a NUL byte at offset 5)" in message


def test_dataset_folder_is_refused(workspace, nothing_loads):
    message = oneshot_refused(workspace, dataset=workspace[0])
    assert f"--dataset {workspace[0]} is a folder" in message


def test_dataset_name_without_suffix_that_is_no_file_nor_known_dataset(workspace, nothing_loads, monkeypatch):
    monkeypatch.chdir(workspace[0])
    for name in ("calib", "data/calib"):  # a forgotten suffix, a missing local path
        message = oneshot_refused(workspace, dataset=name)
        assert f"--dataset {name}: no such file, and not a named text (austen, wiki)" in message
        assert "open-platypus" in message  # what oneshot loads by name


def test_model_folder_without_tokenizer(workspace, nothing_loads):
    bare = workspace[0] / "no-tokenizer"
    shutil.copytree(workspace[1], bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink(missing_ok=True)
    message = oneshot_refused(workspace, model=bare)
    assert f"{bare} has no tokenizer (none of tokenizer.json, tokenizer_config.json" in message


# ------------------------------------------------------------- windows, positions


def test_num_samples_beyond_the_text_says_how_many_windows_it_holds(workspace, nothing_loads):
    message = oneshot_refused(workspace, "--num-samples", "1000")
    assert (
        f"num_samples=1000 is more than the calibration text holds: its {TEXT_TOKENS} tokens give "
        f"{TEXT_TOKENS - SEQ_LEN} distinct windows of seq_len={SEQ_LEN}" in message
    )
    assert f"{TEXT_TOKENS // SEQ_LEN} without overlap" in message


def test_a_million_samples_are_refused_for_memory(workspace, nothing_loads, monkeypatch):
    monkeypatch.setattr(workflow, "available_memory", lambda: 8 * 2**30)
    message = oneshot_refused(workspace, "--num-samples", "1000000")
    # 1e6 x 32 tokens x hidden 128 x 4 bytes x 3 copies = 45.8 GiB
    assert "--num-samples 1000000 x --seq-len 32: calibration keeps about 45.8 GiB" in message
    assert "more than the 8.0 GiB of memory available" in message
    assert "at most about 174762 windows of 32 tokens fit" in message


def test_seq_len_above_the_models_positions(workspace, nothing_loads):
    message = oneshot_refused(workspace, "--seq-len", "512")
    assert f"--seq-len 512 is above model {workspace[1]}'s max_position_embeddings 256" in message


# ------------------------------------------------------------------- qep-eval


def test_eval_fails_on_a_nan_checkpoint_naming_window_and_position(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(workflow, "bar_chart", lambda *args, **kwargs: False)
    broken = tmp_path / "nan-model"
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1))
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = float("nan")  # token w7
    model.save_pretrained(broken)
    word_level_tokenizer().save_pretrained(broken)
    words = ["w3"] * 4 * 64
    # in window 2 (of 64 tokens): attention multiplies its NaN value by the causal
    # mask's zeros, so every position of that window is NaN, none before it
    words[2 * 64 + 5] = "w7"
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(words))
    message = refused(cli.eval_main, [
        str(broken), "--text", str(text), "--seq-len", "64", "--csv", str(tmp_path / "ppl.csv"),
    ])
    assert message == (
        f"qep-eval: not finite: {broken}: logits not finite (nan) at window 2, position 0 "
        "(of 4 windows of 64 tokens): the checkpoint has non-finite weights or overflows"
    )
    assert "nan" in (tmp_path / "ppl.csv").read_text()  # the table is still written


def test_eval_argument_ranges_are_one_line_each(workspace, nothing_loads):
    _, tiny, text = workspace
    for options, expected in [
        (["--seq-len", "0"], "--seq-len 0: must be an integer >= 2"),
        (["--seq-len", "1"], "--seq-len 1: must be an integer >= 2"),
        (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
        (["--max-windows", "0"], "--max-windows 0: must be an integer >= 1"),
        (["--seq-len", "512"], f"--seq-len 512 is above model {tiny}'s max_position_embeddings 256"),
    ]:
        assert expected in refused(cli.eval_main, [str(tiny), "--text", str(text), *options])


def test_eval_text_that_is_not_utf8(workspace, nothing_loads):
    _, tiny, _ = workspace
    latin1 = workspace[0] / "eval-latin1.txt"
    latin1.write_bytes(b"w3 \xff w4")
    message = refused(cli.eval_main, [str(tiny), "--text", str(latin1)])
    assert "is not UTF-8 text: byte 0xff at offset 3" in message


def test_lm_eval_refuses_paths_that_would_inject_options(workspace, nothing_loads, monkeypatch):
    root, tiny, text = workspace
    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=None))
    monkeypatch.setattr(cli, "_has_module", lambda name: True)
    injected = root / "m,trust_remote_code=True"
    shutil.copytree(tiny, injected, dirs_exist_ok=True)
    for argv, path in [
        ([str(injected)], injected),
        ([str(tiny), "--tokenizer", str(root / "tok=x")], root / "tok=x"),
    ]:
        message = refused(cli.eval_main, [*argv, "--text", str(text), "--lm-eval", "arc_easy"])
        assert f"--lm-eval: the path {path} contains ',' or '='" in message


# ---------------------------------------------------------------- distributed


def _stalled_pair(rendezvous, answers):
    """Rank 0 gathers while rank 1 stops itself (SIGSTOP) after joining."""
    def rank(number):
        distributed.init_process_group(2 / 60, init_method=rendezvous, rank=number, world_size=2)
        if number == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        start = time.monotonic()
        try:
            distributed.gather(number)
            answers.put(("no error", 0.0))
        except Exception as error:  # the test reads it
            answers.put((f"{type(error).__name__}: {error}", time.monotonic() - start))
        finally:
            dist.destroy_process_group()

    return rank


def test_a_hung_rank_times_out_naming_the_step(tmp_path):
    # forked ranks (gloo, 2 s timeout) inherit this process's imports: no start-up cost
    context = multiprocessing.get_context("fork")
    answers = context.Queue()
    target = _stalled_pair(f"file://{tmp_path / 'rendezvous'}", answers)
    ranks = [context.Process(target=target, args=(number,)) for number in range(2)]
    for process in ranks:
        process.start()
    try:
        message, waited = answers.get(timeout=60)
    finally:
        for process in ranks:
            process.kill()
            process.join()
    assert message.startswith(
        "CollectiveError: rank 0 of 2 timed out waiting at gathering a value from every rank"
    ), message
    assert "\n" not in message and waited < 10


def _example():
    spec = importlib.util.spec_from_file_location("distributed_oneshot", REPO / "examples" / "distributed_oneshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_refuses_fewer_samples_than_ranks(workspace, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "init_process_group", lambda *a, **k: pytest.fail("started"))
    with pytest.raises(SystemExit) as ended:
        _example().main(["--recipe", str(RECIPE), "--output", "never", "--num-samples", "1"])
    assert str(ended.value) == (
        "--num-samples 1 is below the number of ranks (2): every rank needs at least one "
        "calibration window"
    )


def test_example_passes_timeout_min_to_init_process_group(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    started = {}

    def init(backend, **options):
        started.update(options, backend=backend)
        raise KeyboardInterrupt  # stop here: no process group in this process

    monkeypatch.setattr(dist, "init_process_group", init)
    with pytest.raises(KeyboardInterrupt):
        _example().main(["--recipe", str(RECIPE), "--output", "never", "--timeout-min", "0.5"])
    assert started == {"backend": "gloo", "timeout": datetime.timedelta(seconds=30)}
