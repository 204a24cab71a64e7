"""Where qep-oneshot writes: never into its source, never over other files unless
--overwrite (then a replacement, not a merge), no permission widened outside what
it wrote, no half-written folder, no non-finite tensor shipped."""

import hashlib
import os
import stat
from pathlib import Path

import pytest
import torch

from qep_modifier import workflow
from qep_modifier.cli import oneshot_main
from tests.models import REPO, VOCAB_SIZE, save_tiny_llama

RECIPE = REPO / "recipes" / "w4a16_qep_gptq.yaml"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("output")
    model = save_tiny_llama(root / "tiny", num_hidden_layers=1)
    generator = torch.Generator().manual_seed(1)
    words = torch.randint(3, VOCAB_SIZE, (600,), generator=generator).tolist()
    text = root / "calib.txt"
    text.write_text(" ".join(f"w{i}" for i in words))
    return root, model, text


@pytest.fixture(scope="module")
def quantized(workspace):
    """One quantized model and its tokenizer for every save below (saving it
    again writes the same files)."""
    from transformers import AutoTokenizer

    _, model, text = workspace
    tokenizer = AutoTokenizer.from_pretrained(model)
    windows = workflow.calibration_windows(tokenizer, text, 4, 32, 0)
    return workflow.quantize(model, workflow.load_recipe(RECIPE), windows), tokenizer


@pytest.fixture
def no_loading(monkeypatch):
    """The refusals below come before any model or tokenizer is loaded."""

    def loaded(*args, **kwargs):
        pytest.fail("a model or tokenizer was loaded before the output was checked")

    monkeypatch.setattr(workflow, "quantize", loaded)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", loaded)


def refused(workspace, output, *extra) -> str:
    _, model, text = workspace
    with pytest.raises(SystemExit) as ended:
        oneshot_main([
            "--model", str(model), "--recipe", str(RECIPE), "--dataset", str(text),
            "--num-samples", "4", "--seq-len", "32", "--output", str(output), *extra,
        ])
    message = str(ended.value)
    assert message.startswith("qep-oneshot: ") and "\n" not in message, message
    return message


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder``: md5 (files) or link target, and mode, links not followed."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            content = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = hashlib.md5(path.read_bytes()).hexdigest()
        else:
            content = "folder"
        entries[str(path.relative_to(folder))] = (content, stat.S_IMODE(info.st_mode))
    return entries


def leftovers(parent: Path) -> list[str]:
    return [name for name in os.listdir(parent) if ".tmp-" in name or ".old-" in name]


def private_file(path: Path, text: str = "secret") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


def old_checkpoint(folder: Path) -> Path:
    """A folder that looks like an earlier checkpoint, with a stray shard."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"old": true}')
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (folder / "model.safetensors.index.json").write_text("{}")
    return folder


def test_existing_folder_with_other_files_is_refused_before_loading(workspace, tmp_path, no_loading):
    output = tmp_path / "home"
    key = private_file(output / ".ssh" / "id_rsa")
    (output / "notes.txt").write_text("mine")
    before = snapshot(output)
    message = refused(workspace, output)
    assert f"--output {output} already holds 2 entries" in message and "--overwrite" in message
    assert snapshot(output) == before
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_overwrite_replaces_only_a_model_folder(workspace, tmp_path, no_loading):
    output = tmp_path / "home"
    private_file(output / ".ssh" / "id_rsa")
    before = snapshot(output)
    message = refused(workspace, output, "--overwrite")
    assert "holds files but no model (no config.json)" in message
    assert snapshot(output) == before


def test_output_equal_to_the_model_is_refused_even_with_overwrite(workspace, no_loading):
    _, model, _ = workspace
    before = snapshot(model)
    message = refused(workspace, model, "--overwrite")
    assert f"is the model folder {model.resolve()}" in message and "never replaced" in message
    assert snapshot(model) == before


def test_output_inside_the_model_is_refused(workspace, no_loading):
    _, model, _ = workspace
    before = snapshot(model)
    message = refused(workspace, model / "w4")
    assert f"lies inside the model folder {model.resolve()}" in message
    assert snapshot(model) == before


def test_output_holding_the_model_is_refused_even_with_overwrite(workspace):
    root, model, _ = workspace
    with pytest.raises(workflow.InputError, match=f"holds the model folder {model.resolve()}"):
        workflow.check_output(root, overwrite=True, sources=[model])


def test_default_model_in_the_cache_is_protected(workspace, tmp_path, monkeypatch, no_loading):
    _, _, text = workspace
    monkeypatch.setenv("QEP_CACHE", str(tmp_path / "cache"))
    from qep_modifier.default_model import default_model_folder

    with pytest.raises(SystemExit, match="is the model folder"):
        oneshot_main(["--recipe", str(RECIPE), "--dataset", str(text),
                      "--output", str(default_model_folder()), "--overwrite"])


def test_output_under_a_file_is_refused_before_loading(workspace, tmp_path, no_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    message = refused(workspace, blocker / "sub" / "out")
    assert f"{blocker} is a file, not a folder" in message
    assert blocker.read_text() == "not a folder"


def test_read_only_parent_is_refused_before_loading(workspace, tmp_path, no_loading, monkeypatch):
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root may write anywhere: answer as an ordinary user would
        real_access = os.access
        monkeypatch.setattr(
            os, "access",
            lambda path, mode, **kw: real_access(path, mode, **kw)
            and not (mode & os.W_OK and not os.stat(path).st_mode & stat.S_IWUSR),
        )
    message = refused(workspace, parent / "out")
    assert f"no permission to write in {parent}" in message


def test_overwrite_replaces_the_folder_instead_of_merging(quantized, tmp_path):
    model, tokenizer = quantized
    outside = private_file(tmp_path / "outside" / "id_rsa")
    output = old_checkpoint(tmp_path / "ckpt")
    with pytest.raises(workflow.InputError, match="already holds 3 entries"):
        workflow.save_checkpoint(model, tokenizer, output)  # no overwrite: refused at save too
    workflow.save_checkpoint(model, tokenizer, output, overwrite=True)
    names = set(os.listdir(output))
    assert {"config.json", "model.safetensors", "recipe.yaml", "tokenizer.json"} <= names
    assert "model-00001-of-00002.safetensors" not in names
    assert "model.safetensors.index.json" not in names
    assert "quantization_config" in (output / "config.json").read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(path.stat().st_mode) for path in output.iterdir()} == {0o666 & ~umask}
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600 and outside.read_text() == "secret"
    assert leftovers(tmp_path) == []


def test_symlink_target_keeps_its_permissions(quantized, tmp_path):
    model, tokenizer = quantized
    target = private_file(tmp_path / "elsewhere" / "id_rsa")
    output = old_checkpoint(tmp_path / "ckpt")
    (output / "key").symlink_to(target)
    workflow.save_checkpoint(model, tokenizer, output, overwrite=True)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_text() == "secret"
    assert not (output / "key").is_symlink()  # the old folder is gone, link included


def test_interrupted_save_leaves_the_old_checkpoint_as_it_was(quantized, tmp_path, monkeypatch):
    model, tokenizer = quantized
    output = tmp_path / "ckpt"
    workflow.save_checkpoint(model, tokenizer, output)
    before = snapshot(output)

    def interrupted(folder, *args, **kwargs):
        (Path(folder) / "tokenizer.json").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        workflow.save_checkpoint(model, tokenizer, output, overwrite=True)
    assert snapshot(output) == before
    assert leftovers(tmp_path) == []


def test_non_finite_scale_is_one_line_and_nothing_is_written(quantized, tmp_path):
    model, tokenizer = quantized
    module = "model.layers.0.self_attn.k_proj"
    scale = model.get_submodule(module).weight_scale
    kept = scale.detach().clone()
    output = tmp_path / "ckpt"
    try:
        with torch.no_grad():
            scale.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), float("nan")])
        with pytest.raises(SystemExit) as ended:
            with workflow.one_line_errors("qep-oneshot"):
                workflow.save_checkpoint(model, tokenizer, output)
    finally:
        with torch.no_grad():
            scale.copy_(kept)
    assert str(ended.value) == f"qep-oneshot: module {module} has non-finite weight_scale (3 values); nothing saved"
    assert os.listdir(tmp_path) == []


def test_a_cast_that_overflows_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(1e5)  # finite in float32, inf in float16
    assert workflow.first_non_finite(model) is None
    with pytest.raises(workflow.InputError, match=r"^module 0 has non-finite weight \(16 values\) in float16"):
        workflow.save_checkpoint(model, None, tmp_path / "never", torch.float16)
    assert os.listdir(tmp_path) == []
