"""The command line: help, version, and one clear line + exit code for every mistake, with nothing written."""
from __future__ import annotations

import json
import os
import socket

import pytest
from click.testing import CliRunner

import colortrend
from colortrend import __version__
from colortrend.cli import main
from conftest import encoded, rgb_image


def config(tmp_path, extra: str = "", inputs: str = "[data/demo]", output: str | None = None):
    out = output or str(tmp_path / "out")
    path = tmp_path / "c.yaml"
    path.write_text(f"name: t\ninput: {{paths: {inputs}, year: 2016}}\noutput: {out}\ndevice: cpu\n{extra}")
    return str(path), out


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_and_version():
    for flag in ("-h", "--help"):
        result = invoke(flag)
        assert result.exit_code == 0
        for command in ("run", "status", "report", "eval", "train"):
            assert command in result.output
    assert invoke("--version").output.strip().endswith(__version__)
    assert "--executor" in invoke("run", "-h").output


@pytest.mark.parametrize(
    "extra, inputs, message",
    [
        ("colour: {k: 3}\n", "[data/demo]", "colour: unknown key"),
        ("batch_size: '16'\n", "[data/demo]", "batch_size: expected an integer"),
        ("", "[no/such/folder]", "input.paths[0]: 'no/such/folder' does not exist"),
    ],
)
def test_config_errors_exit_2_with_one_line_and_write_nothing(tmp_path, extra, inputs, message):
    path, out = config(tmp_path, extra, inputs)
    result = invoke("run", path)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert not os.path.exists(out)


def test_output_that_cannot_be_written_is_a_config_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    path, out = config(tmp_path, output=str(blocker / "out"))
    result = invoke("run", path)
    assert result.exit_code == 2 and "output: cannot write" in result.output


def test_cuda_without_a_gpu_is_a_config_error(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path, out = config(tmp_path)
    result = invoke("run", path, "--device", "cuda")
    assert result.exit_code == 2 and "device: cuda requested" in result.output
    assert not os.path.exists(out)


def test_second_run_on_a_locked_output_exits_3(tmp_path):
    path, out = config(tmp_path)
    os.makedirs(out)
    with open(os.path.join(out, "_lock"), "w") as f:  # held by a live process: this one
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    result = invoke("run", path)
    assert result.exit_code == 3
    assert f"pid {os.getpid()}" in result.output


def test_status_before_any_run(tmp_path):
    path, _ = config(tmp_path)
    result = invoke("status", path, "--json")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["photos_pending"] == info["inputs"] > 0 and info["photos_committed"] == 0


def test_report_before_any_run_says_so(tmp_path):
    path, _ = config(tmp_path)
    result = invoke("report", path)
    assert result.exit_code == 2 and "nothing committed" in result.output


def test_eval_age_prints_json_last_and_saves_predictions(shared_data, tmp_path):
    import pandas as pd

    labels = pd.read_csv(shared_data / "age" / "aaf" / "labels.csv").iloc[[0, 3000, 6000]]
    labels = labels.assign(path=[str(shared_data / "age" / "aaf" / p) for p in labels["path"]])
    labels[["path", "age"]].to_csv(tmp_path / "labels.csv", index=False)
    result = invoke("eval", "age", str(tmp_path / "labels.csv"), "--device", "cpu", "--json",
                    "--save-predictions", str(tmp_path / "pred.csv"))
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert metrics["n"] + metrics["missed"] == 3 and 0 <= metrics["mae"] < 30
    saved = pd.read_csv(tmp_path / "pred.csv")
    assert list(saved.columns) == ["path", "age", "predicted_age"] and len(saved) == 3


def test_eval_parsing_prints_json_and_writes_masks(shared_data, tmp_path):
    from PIL import Image

    ccp = shared_data / "parsing" / "ccp"
    (tmp_path / "labels.csv").write_text(
        "image,mask\n" + "".join(f"{ccp}/images/{n}.jpg,{ccp}/masks/{n}.png\n" for n in ("0008", "0016")))
    result = invoke("eval", "parsing", str(tmp_path / "labels.csv"), "--device", "cpu", "--json",
                    "--save-masks", str(tmp_path / "masks"))
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert metrics["n"] == 2 and metrics["iou"] > 0.7
    mask = Image.open(tmp_path / "masks" / "0008.png")
    assert mask.size == Image.open(ccp / "images" / "0008.jpg").size


def test_train_age_defaults_are_the_training_recipe():
    """`train age` with no options reproduces the shipped 96-px network: its defaults are AgeTrainConfig's."""
    from colortrend.cli import train_age
    from colortrend.training.age import AgeTrainConfig

    defaults = {p.name: p.default for p in train_age.params}
    recipe = AgeTrainConfig()
    assert defaults["epochs"] == recipe.epochs
    assert defaults["seed"] == recipe.seed
    assert defaults["chip_size"] == recipe.chip_size
    assert defaults["chip_scale"] == recipe.chip_scale
    assert defaults["arch"] == recipe.arch and defaults["threads"] == recipe.threads


@pytest.mark.parametrize("foreign", ["notes.txt", "photos/theirs.parquet", "report/chart.png"])
def test_an_existing_folder_that_is_not_a_colortrend_output_is_refused_untouched(tmp_path, foreign):
    path, out = config(tmp_path)
    target = os.path.join(out, foreign)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w") as f:
        f.write("someone else's")
    before = sorted(os.path.relpath(os.path.join(r, n), out) for r, _, files in os.walk(out) for n in files)
    result = invoke("run", path)
    assert result.exit_code == 2 and "not a colortrend output" in result.output or "did not write" in result.output
    assert len(result.output.strip().splitlines()) == 1
    after = sorted(os.path.relpath(os.path.join(r, n), out) for r, _, files in os.walk(out) for n in files)
    assert after == before and open(target).read() == "someone else's"


@pytest.mark.parametrize("output, message", [('""', "output: name a folder"), ("/", "filesystem root")])
def test_an_empty_or_root_output_is_refused(tmp_path, output, message):
    path, _ = config(tmp_path, output=output)
    result = invoke("run", path)
    assert result.exit_code == 2 and message in result.output


def test_a_home_relative_output_is_expanded():
    from colortrend.config import load_from_dict

    cfg = load_from_dict({"name": "t", "input": {"paths": ["data/demo"]}, "output": "~/colortrend-out"})
    assert cfg.output == os.path.join(os.path.expanduser("~"), "colortrend-out")


def test_a_yaml_alias_bomb_is_one_line_not_gigabytes(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for k in range(1, 9):
        levels.append(f"{chr(97 + k)}: &{chr(97 + k)} [" + ", ".join([f"*{chr(96 + k)}"] * 9) + "]")
    bomb = "\n".join(levels) + "\nname: *i\ninput: {paths: [data/demo]}\noutput: " + str(tmp_path / "out") + "\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    result = invoke("run", str(path))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert len(result.output) < 300


def test_an_empty_input_folder_is_a_quiet_night_not_an_error(tmp_path):
    (tmp_path / "nothing-today").mkdir()
    path, out = config(tmp_path, inputs=f"[{tmp_path / 'nothing-today'}]")
    for _ in range(2):  # and again the next night
        result = invoke("run", path)
        assert result.exit_code == 0, result.output
        assert "0 photos" in result.output
    page = open(os.path.join(out, "report", "index.html"), encoding="utf-8").read()
    assert "No person was counted" in page


def test_ray_executor_without_ray_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    import colortrend.run

    monkeypatch.setattr(colortrend.run, "ray_installed", lambda: False)
    path, out = config(tmp_path)
    result = invoke("run", path, "--executor", "ray")
    assert result.exit_code == 2 and "Ray is not installed" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not os.path.exists(out)


def test_manifest_urls_outside_the_allowed_schemes_are_error_rows_and_nothing_connects(tmp_path):
    """A manifest chooses photos, not where the run connects: its ftp/http rows become error rows, no connection
    is opened (a listening socket sees none) and the run goes on with the rest."""
    import pandas as pd

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    urls = [f"ftp://127.0.0.1:{port}/a.jpg", f"http://127.0.0.1:{port}/b.jpg", f"sftp://127.0.0.1:{port}/c.jpg"]
    (tmp_path / "local.png").write_bytes(encoded(rgb_image(), "PNG"))
    pd.DataFrame({"path": ["local.png", *urls]}).to_csv(tmp_path / "list.csv", index=False)
    path, out = config(tmp_path, inputs=f"[{tmp_path / 'list.csv'}]")
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    photos = colortrend.read(out, "photos").set_index("path")
    assert photos.loc[str(tmp_path / "local.png"), "status"] == "no_face"
    for url in urls:
        assert photos.loc[url, "status"] == "error" and "is not allowed" in photos.loc[url, "error"]
    with pytest.raises(BlockingIOError):  # a connection attempt would be waiting here to be accepted
        listener.accept()
    listener.close()


def one_line_error(result, *wanted: str) -> str:
    """The single stderr line of a failed command, after checking the exit code and that it names the problem."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    for text in wanted:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def awkward_inputs(tmp_path):
    """A photo, a file that is not one, labels files with and without the right columns, and a path under a file."""
    (tmp_path / "photo.png").write_bytes(encoded(rgb_image(), "PNG"))
    (tmp_path / "not-a-photo.jpg").write_text("hello")
    (tmp_path / "ages.csv").write_text("path,age\nphoto.png,30\n")
    (tmp_path / "masks.csv").write_text("image,mask\nphoto.png,photo.png\n")
    (tmp_path / "blocker").write_text("a file, not a folder")
    (tmp_path / "no-ccp").mkdir()
    return tmp_path


@pytest.mark.parametrize("args, wanted", [
    (["explain", "{t}/not-a-photo.jpg"], "not an image in a supported format"),
    (["explain", "{t}/photo.png", "--out", "{t}/blocker/x.png"], "--out: cannot write"),
    (["eval", "age", "{t}/ages.csv", "--save-predictions", "{t}/blocker/p.csv"], "--save-predictions: cannot write"),
    (["eval", "color", "{t}/masks.csv", "--save-predictions", "{t}/blocker/p.csv"], "--save-predictions: cannot"),
    (["eval", "parsing", "{t}/masks.csv", "--save-masks", "{t}/blocker/masks"], "--save-masks: cannot write"),
    (["eval", "parsing", "{t}/ages.csv"], "expected a CSV with image and mask columns"),
    (["eval", "age", "{t}/missing.csv"], "'{t}/missing.csv' does not exist"),
    (["eval", "age", "{t}/photo.png"], "not a readable CSV"),
    (["train", "parsing", "{t}/no-ccp", "--out", "{t}/w.pt"], "needs labels.csv"),
    (["train", "age", "{t}/ages.csv", "--out", "{t}/blocker/age"], "--out: cannot write"),
], ids=["explain-not-an-image", "explain-out", "eval-age-save", "eval-color-save", "eval-parsing-masks",
        "labels-columns", "labels-missing", "labels-not-csv", "train-parsing-no-labels", "train-age-out"])
def test_bad_inputs_and_unwritable_targets_are_one_line_before_any_work(awkward_inputs, args, wanted):
    t = str(awkward_inputs)
    one_line_error(invoke(*(a.format(t=t) for a in args)), wanted.format(t=t))
    assert not (awkward_inputs / "blocker").is_dir() and not (awkward_inputs / "w.pt").exists()


@pytest.mark.parametrize("args", [["explain", "{t}/photo.png"], ["eval", "age", "{t}/ages.csv"],
                                  ["eval", "color", "{t}/masks.csv"], ["eval", "parsing", "{t}/masks.csv"]],
                         ids=["explain", "eval-age", "eval-color", "eval-parsing"])
def test_device_cuda_without_a_gpu_is_one_line_for_every_command(awkward_inputs, args):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_line_error(invoke(*(a.format(t=awkward_inputs) for a in args), "--device", "cuda"), "device: cuda requested")


def refuse_writes(monkeypatch, folder, code: int) -> None:
    """Every attempt to create, change or remove a file under ``folder`` fails with ``code`` (ENOSPC: a full disk;
    EACCES: `chmod -R a-w`, which root, running these tests in CI, would ignore)."""
    import builtins
    import errno as errnos

    root = os.path.abspath(folder) + os.sep

    def check(path) -> None:
        if os.path.abspath(os.fsdecode(path)).startswith(root):
            raise OSError(code, os.strerror(code), os.fsdecode(path))

    real_open, real_builtin_open = os.open, builtins.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def guarded_open(path, flags, *a, **k):
        if flags & writing:
            check(path)
        return real_open(path, flags, *a, **k)

    def guarded_builtin_open(path, mode="r", *a, **k):
        if isinstance(path, (str, bytes, os.PathLike)) and set(mode) & set("wax+"):
            check(path)
        return real_builtin_open(path, mode, *a, **k)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(builtins, "open", guarded_builtin_open)
    for name in ("replace", "rename", "unlink", "remove", "mkdir", "rmdir", "link"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda path, *a, _real=real, **k: check(path) or _real(path, *a, **k))
    assert code in (errnos.ENOSPC, errnos.EACCES)


def snapshot(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(r, n), folder): open(os.path.join(r, n), "rb").read()
            for r, _, files in os.walk(folder) for n in files}


def test_a_full_disk_while_the_report_is_written_is_one_line_and_the_next_run_finishes_it(tmp_path, monkeypatch):
    import errno

    (tmp_path / "today").mkdir()
    path, out = config(tmp_path, inputs=f"[{tmp_path / 'today'}]")
    os.makedirs(os.path.join(out, "report"))
    refuse_writes(monkeypatch, os.path.join(out, "report"), errno.ENOSPC)
    one_line_error(invoke("run", path), "disk full", os.path.join(out, "report"))
    monkeypatch.undo()
    result = invoke("run", path)  # space again: the lock was released and the report is built
    assert result.exit_code == 0, result.output
    assert os.path.exists(os.path.join(out, "report", "index.html"))


@pytest.mark.parametrize("limit, what", [("SPILL_ROWS", "photos to analyse"), ("COMMITTED_ROWS", "committed photos")])
def test_a_full_disk_under_the_plans_temporary_folder_is_one_line_naming_it(tmp_path, monkeypatch, limit, what):
    # Past its limits planning spills to TMPDIR (a plan's photos to analyse; the committed photos and the listing,
    # compared by ranges of keys); that disk filling up mid-write (pyarrow raises OSError ENOSPC with no file name)
    # is one line that names the folder, what it holds and the fix, and leaves no temporary file behind.
    import errno
    import gc
    import tempfile

    import pyarrow as pa

    import colortrend.plan

    (tmp_path / "today").mkdir()
    for i in range(12):
        (tmp_path / "today" / f"p{i:02d}.jpg").write_bytes(b"x")
    path, _ = config(tmp_path, inputs=f"[{tmp_path / 'today'}]")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if limit == "COMMITTED_ROWS":  # 12 committed photos (unreadable ones), listed again
        assert invoke("run", path).exit_code == 0
    monkeypatch.setattr(colortrend.plan, limit, 4)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    real_new_file = pa.ipc.new_file

    class FillsUp:
        def __init__(self, *args):
            self.writer, self.written = real_new_file(*args), 0

        def write_batch(self, batch):
            if self.written == 2:
                raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
            self.written += 1
            self.writer.write_batch(batch)

        def close(self):
            self.writer.close()

    monkeypatch.setattr(pa.ipc, "new_file", FillsUp)
    for command in ("status", "run"):
        one_line_error(invoke(command, path), "planning: disk full in", str(scratch), what, "set TMPDIR")
        gc.collect()  # (the plan's folder goes with its owner)
        assert list(scratch.iterdir()) == []
    monkeypatch.setattr(pa.ipc, "new_file", real_new_file)
    result = invoke("status", path, "--json")
    pending = 12 if limit == "SPILL_ROWS" else 0
    assert result.exit_code == 0 and json.loads(result.output)["photos_pending"] == pending, result.output


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """An output with one committed shard (a photo without a face: the models run once, on little)."""
    folder = tmp_path_factory.mktemp("committed")
    (folder / "photos").mkdir()
    (folder / "photos" / "plain.png").write_bytes(encoded(rgb_image(), "PNG"))
    path, out = config(folder, inputs=f"[{folder / 'photos'}]")
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    return path, out


@pytest.mark.parametrize("code, wanted", [("EACCES", "permission denied"), ("ENOSPC", "disk full")])
def test_report_on_a_read_only_or_full_output_is_one_line_and_changes_nothing(committed, monkeypatch, code, wanted):
    import errno

    path, out = committed
    before = snapshot(out)
    refuse_writes(monkeypatch, out, getattr(errno, code))
    one_line_error(invoke("report", path), wanted, out)
    monkeypatch.undo()
    assert snapshot(out) == before
