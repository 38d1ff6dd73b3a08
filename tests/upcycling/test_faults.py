"""Fault injection: conversions killed or interrupted at several points, a full disk, symlinks,
planted code, corrupt shards and two conversions at once. In every case the output is either
complete or absent, an existing output is never lost, and no foreign code travels or runs.

Conversions that get killed run in a forked child (it inherits the imported modules, so it starts
in milliseconds); a patched step of the converter announces itself on an Event and sleeps, and the
test then sends the signal. More corrupt-input cases (headers, missing shards, unsafe pickles) are
in test_errors.py.
"""

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB, leftovers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

import hf_moe.checkpoints.staging as staging_files
import hf_moe.upcycling.convert as convert
from hf_moe import upcycle_checkpoint
from hf_moe.cli import main

FORK = multiprocessing.get_context("fork")
OPTIONS = dict(num_experts=2, progress=False)


@pytest.fixture
def source(save_dense):
    return save_dense("llama", name="dense")[1]


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_checkpoint(a: Path, b: Path) -> None:
    first, second = weights_of(a), weights_of(b)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# --- killed and interrupted conversions ----------------------------------------------------------


def _pause_at(point: str, ready) -> None:
    """Patch the converter (in the child) so that it announces ``point`` and sleeps there."""

    def pause():
        ready.set()
        time.sleep(60)

    if point == "writing":  # a shard is half written
        produce = convert.produce

        def paused_produce(*args):
            yield from produce(*args)
            pause()

        convert.produce = paused_produce
    elif point == "verifying":  # every shard is written, verification runs
        verify = convert.verify_conversion

        def paused_verify(*args):
            pause()
            return verify(*args)

        convert.verify_conversion = paused_verify
    elif point == "publishing":  # --overwrite: the previous output is moved aside, the new one not yet in place
        rename = os.rename

        def paused_rename(src, dst):
            rename(src, dst)
            if ".hf-moe-upcycle-replaced." in str(dst):
                pause()

        staging_files.os = _Namespace(os, rename=paused_rename)
    elif point == "published":  # --overwrite: the new output is in place, the previous one not yet removed
        rename = os.rename

        def paused_rename(src, dst):
            rename(src, dst)
            if ".hf-moe-upcycle-unfinished." in str(src):
                pause()

        staging_files.os = _Namespace(os, rename=paused_rename)


class _Namespace:
    """``os`` with some functions replaced (only inside the forked child)."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(self._module, name)


def _convert_in_child(point, ready, argv):
    # A forked child inherits the parent's OpenMP thread pool in a broken state: once the parent has
    # run parallel torch ops (earlier tests), a parallel op in the child hangs. One thread avoids it.
    torch.set_num_threads(1)
    # Python leaves SIGINT ignored when its process started that way (pytest run as a shell's background
    # job); the child must get Ctrl-C's KeyboardInterrupt whatever the parent inherited.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _pause_at(point, ready)
    sys.exit(main(argv))


def join_or_kill(child, timeout: float) -> int | None:
    """The child's exit code once it ends within ``timeout`` seconds; otherwise it is killed (a child
    left sleeping would keep pytest from exiting) and None is returned."""
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        return None
    return child.exitcode


def run_and_signal(point: str, sig: int, argv: list[str]) -> int | None:
    """Run ``hf-moe`` with ``argv`` in a forked child, send ``sig`` once it reaches ``point``; exit code."""
    ready = FORK.Event()
    child = FORK.Process(target=_convert_in_child, args=(point, ready, argv))
    child.start()
    if not ready.wait(60):
        join_or_kill(child, 0)
        pytest.fail(f"the conversion never reached {point}")
    os.kill(child.pid, sig)
    return join_or_kill(child, 30)


def upcycle_argv(source, output, *extra):
    return ["upcycle", str(source), str(output), "--num-experts", "2", "--no-progress", *extra]


@pytest.mark.parametrize("point", ["writing", "verifying", "publishing"])
def test_sigint_leaves_nothing_and_keeps_the_previous_output(point, source, tmp_path, capfd):
    output = upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)
    previous = tmp_path / "previous"
    os.link(output / "model.safetensors", previous)  # what the published output held
    before = leftovers(tmp_path)
    status = run_and_signal(
        point, signal.SIGINT, upcycle_argv(source, output, "--overwrite", "--seed", "1", "--verify")
    )
    assert status == 130 and "interrupted; nothing was written" in capfd.readouterr().err
    assert leftovers(tmp_path) == before
    assert (output / "model.safetensors").read_bytes() == previous.read_bytes()


@pytest.mark.parametrize("point", ["writing", "verifying"])
def test_sigkill_leftovers_are_named_and_removed_by_the_next_run(point, source, tmp_path, caplog):
    status = run_and_signal(point, signal.SIGKILL, upcycle_argv(source, tmp_path / "out", "--verify"))
    assert status == -signal.SIGKILL
    (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert staging.name.startswith(f".out.hf-moe-upcycle-unfinished.{staging_files.HOST}.")
    assert not (tmp_path / "out").exists()

    upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)
    assert leftovers(tmp_path) == ["dense", "out"]
    assert f"Removed {staging} (" in caplog.text and "left by a conversion (pid" in caplog.text


def test_sigkill_between_the_renames_of_overwrite_loses_nothing(source, tmp_path, caplog):
    output = upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)
    previous = (output / "model.safetensors").read_bytes()
    status = run_and_signal("publishing", signal.SIGKILL, upcycle_argv(source, output, "--overwrite", "--seed", "1"))
    assert status == -signal.SIGKILL and not output.exists()  # the window this test is about

    # The next run puts the previous output back, then refuses to replace it without --overwrite.
    with pytest.raises(FileExistsError, match="is not empty; pass overwrite=True"):
        upcycle_checkpoint(source, output, seed=1, **OPTIONS)
    assert (output / "model.safetensors").read_bytes() == previous
    assert leftovers(tmp_path) == ["dense", "out"] and "Restored" in caplog.text


def test_a_live_conversion_is_reported_with_the_command_to_remove_its_folder(source, tmp_path):
    staging = tmp_path / f".out.hf-moe-upcycle-unfinished.{staging_files.HOST}.{os.getppid()}.abc"
    staging.mkdir()
    with pytest.raises(FileExistsError, match=rf"\(pid {os.getppid()}\) is running or was interrupted.*rm -rf "):
        upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)
    other_host = tmp_path / ".out.hf-moe-upcycle-unfinished.elsewhere.1.abc"
    staging.rename(other_host)
    with pytest.raises(FileExistsError, match=r"\(pid 1 on host elsewhere\).*rm -rf .*elsewhere\.1\.abc"):
        upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)
    assert leftovers(tmp_path) == [other_host.name, "dense"]


# --- two conversions at once -----------------------------------------------------------------------


def _convert_after(barrier, argv):
    torch.set_num_threads(1)  # see _convert_in_child
    barrier.wait(30)
    sys.exit(main(argv))


def run_together(*argvs) -> list[int]:
    barrier = FORK.Barrier(len(argvs))
    children = [FORK.Process(target=_convert_after, args=(barrier, argv)) for argv in argvs]
    for child in children:
        child.start()
    return [join_or_kill(child, 60) for child in children]


def test_two_conversions_to_one_output(source, tmp_path, capfd):
    statuses = run_together(*[upcycle_argv(source, tmp_path / "out")] * 2)
    err = capfd.readouterr().err
    assert sorted(statuses) == [0, 2], err
    assert any(
        message in err for message in ("is running or was interrupted", "is not empty", "was filled by another process")
    ), err
    assert leftovers(tmp_path) == ["dense", "out"]
    assert_same_checkpoint(tmp_path / "out", upcycle_checkpoint(source, tmp_path / "again", **OPTIONS))


def test_two_conversions_to_neighbouring_outputs(source, tmp_path):
    assert run_together(upcycle_argv(source, tmp_path / "a"), upcycle_argv(source, tmp_path / "b")) == [0, 0]
    assert leftovers(tmp_path) == ["a", "b", "dense"]
    assert_same_checkpoint(tmp_path / "a", tmp_path / "b")


# --- full disk -----------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of ``size`` bytes; skipped where mounting is not permitted."""
    mounts = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {result.stderr.strip()}")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_before_and_while_writing(source, tmp_path, small_disk):
    reference = upcycle_checkpoint(source, tmp_path / "reference", **OPTIONS)
    weights = (reference / "model.safetensors").stat().st_size
    rest = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file()) - weights

    disk = small_disk(64 * 1024)  # smaller than the weights: refused before anything is written
    with pytest.raises(OSError, match=r"No disk space: the MoE checkpoint needs 1\d\d\.\d kB but only \d+\.\d kB"):
        upcycle_checkpoint(source, disk / "out", **OPTIONS)
    assert leftovers(disk) == []

    disk = small_disk(weights + rest // 2)  # the weights fit, the rest does not: fails while writing
    with pytest.raises(OSError, match=r"No disk space left on .* while writing the MoE checkpoint") as caught:
        upcycle_checkpoint(source, disk / "out", **OPTIONS)
    assert caught.value.errno == errno.ENOSPC
    assert leftovers(disk) == []


# --- symlinks ------------------------------------------------------------------------------------------


def test_output_linking_to_the_source_is_refused_and_the_source_kept(source, tmp_path):
    (tmp_path / "out").symlink_to(source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    with pytest.raises(ValueError, match=r"output_dir='.*out' is a symbolic link \(to '.*dense'\)"):
        upcycle_checkpoint(source, tmp_path / "out", overwrite=True, **OPTIONS)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert leftovers(tmp_path) == ["dense", "out"]


@pytest.mark.parametrize("target", ["empty", "missing"])
def test_output_linking_to_an_empty_or_missing_folder_is_refused_up_front(target, source, tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "CheckpointReader", None)  # fails loudly if the conversion starts
    if target == "empty":
        (tmp_path / target).mkdir()
    (tmp_path / "out").symlink_to(tmp_path / target)
    with pytest.raises(ValueError, match="is a symbolic link"):
        upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)


def test_source_reached_through_a_link_is_still_the_source(source, tmp_path):
    (tmp_path / "link").symlink_to(source)
    with pytest.raises(ValueError, match="must not be or contain source="):
        upcycle_checkpoint(tmp_path / "link", source, overwrite=True, **OPTIONS)
    (tmp_path / "parent").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="must not be or contain source="):
        upcycle_checkpoint(source, tmp_path / "parent" / "dense", overwrite=True, **OPTIONS)


def test_output_under_a_linked_parent_is_written_in_the_real_folder(source, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    output = upcycle_checkpoint(source, tmp_path / "alias" / "out", **OPTIONS)
    assert output == tmp_path / "real" / "out" and leftovers(tmp_path / "real") == ["out"]


# --- planted code ----------------------------------------------------------------------------------------

PLANTED = {
    "tokenizer.py": "Path({marker!r}).write_text('ran')",
    "tokenization_evil.py": "Path({marker!r}).write_text('ran')",
    "vocab.py": "Path({marker!r}).write_text('ran')",
    "chat_template.py": "Path({marker!r}).write_text('ran')",
}


def plant_tokenizer_with_code(folder: Path, marker: Path) -> None:
    """A working fast tokenizer, plus code files whose names match the copied patterns, plus an
    ``auto_map`` that would import ``tokenization_evil.EvilTokenizer`` under trust_remote_code."""
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(folder)
    for name, body in PLANTED.items():
        code = "from pathlib import Path\n" + body.format(marker=str(marker)) + "\n"
        if name == "tokenization_evil.py":
            code += "from transformers import PreTrainedTokenizerFast as Base\nclass EvilTokenizer(Base):\n    pass\n"
        (folder / name).write_text(code)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool.jinja").write_text("{{ messages }}")
    (folder / "additional_chat_templates" / "tool.py").write_text(PLANTED["vocab.py"].format(marker=str(marker)))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    config_path.write_text(json.dumps(config))


def test_a_tokenizer_that_needs_code_is_refused(source, tmp_path):
    plant_tokenizer_with_code(source, tmp_path / "ran")
    with pytest.raises(
        ValueError,
        match=r"The tokenizer of source=.* needs custom code \(auto_map \{'AutoTokenizer': \[None, "
        r"'tokenization_evil\.EvilTokenizer'\]\} in tokenizer_config\.json\).*pass allow_tokenizer_remote_code=True",
    ):
        upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)
    assert leftovers(tmp_path) == ["dense"]


def test_cli_names_the_flag_for_a_tokenizer_that_needs_code(source, tmp_path, capsys):
    plant_tokenizer_with_code(source, tmp_path / "ran")
    assert main(upcycle_argv(source, tmp_path / "out")) == 2
    assert "pass --allow-tokenizer-remote-code to convert it anyway" in capsys.readouterr().err


def test_planted_code_never_travels_or_runs(source, tmp_path):
    marker = tmp_path / "ran"
    plant_tokenizer_with_code(source, marker)
    output = upcycle_checkpoint(source, tmp_path / "out", allow_tokenizer_remote_code=True, **OPTIONS)

    code = sorted(p.relative_to(output).as_posix() for p in output.rglob("*.py"))
    assert code == ["configuration_moe.py", "experts.py", "modeling_moe.py", "routing.py", "switch.py"]
    assert (output / "tokenizer.json").is_file() and (output / "additional_chat_templates" / "tool.jinja").is_file()
    recorded = json.loads((output / "config.json").read_text())["upcycling"]["tokenizer_remote_code_not_copied"]
    assert recorded == {"tokenizer_config.json": {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}}
    card = (output / "README.md").read_text()
    assert "the source's tokenizer needs custom code" in card and "--allow-tokenizer-remote-code" in card
    with pytest.raises(OSError, match="tokenization_evil.py"):  # the code is not there to run
        AutoTokenizer.from_pretrained(output, trust_remote_code=True)
    assert not marker.exists()


def test_the_source_config_auto_map_is_not_carried_over(source, tmp_path):
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (source / "config.json").write_text(json.dumps(config))
    (source / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    output = upcycle_checkpoint(source, tmp_path / "out", **OPTIONS)
    written = json.loads((output / "config.json").read_text())
    assert "evil" not in json.dumps(written) and not (output / "modeling_evil.py").exists()
    assert written["auto_map"]["AutoConfig"] == "switch.SwitchMoeConfig"
    assert AutoConfig.from_pretrained(output, trust_remote_code=True).model_type == "switch_moe"


# --- corrupt shards ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "corrupt, error, message",
    [
        (lambda path: path.write_bytes(b""), ValueError, "the file has 0 bytes"),
        (lambda path: path.write_bytes(os.urandom(4096)), ValueError, "Corrupt safetensors header"),
        (lambda path: (path.unlink(), path.mkdir()), FileNotFoundError, r"Shard\(s\) \['model-00002-of-"),
        (lambda path: (path.unlink(), path.symlink_to(path.parent / "gone")), FileNotFoundError, "Shard"),
    ],
    ids=["empty", "random-bytes", "directory", "dangling-link"],
)
def test_corrupt_shard_of_a_sharded_checkpoint(corrupt, error, message, save_dense, tmp_path):
    _, sharded = save_dense("llama", sharded=True, name="dense")
    corrupt(sharded / "model-00002-of-00007.safetensors")
    with pytest.raises(error, match=message):
        upcycle_checkpoint(sharded, tmp_path / "out", **OPTIONS)
    assert leftovers(tmp_path) == ["dense"]
