"""What a user runs into besides the maths: runs that share a place, errors on the command line, answers
that would be silently wrong. Each test drives the real command or function and looks at what is left."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dlrm_cache.config import (
    CacheConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    PreprocessRunConfig,
    SynthConfig,
    TrainerConfig,
    TrainLoopConfig,
    TrainRunConfig,
)
from dlrm_cache.data.default_dataset import synthetic_dataset
from dlrm_cache.data.preprocess import preprocess
from dlrm_cache.data.synthetic import generate
from dlrm_cache.files import held
from dlrm_cache.train.trainer import TrainingError, train

SMALL = ["model.embedding_dim=8", "model.dense_arch_layer_sizes=[16,8]", "model.over_arch_layer_sizes=[16,1]",
         "train.batch_size=256", "train.max_steps=3", "train.tensorboard=false"]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("data"), 6000, 0.001, progress=False)


def config(path, **kw) -> TrainRunConfig:
    small = ModelConfig(embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    base = TrainRunConfig(
        data=DataConfig(path=str(path)),
        model=small,
        cache=CacheConfig(ratio=0.05, full_table_rows=100),
        train=TrainLoopConfig(batch_size=256, max_steps=3, tensorboard=False),
    )
    return replace(base, **kw)


def command(name: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"dlrm_cache.cli.{name}", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints (its stderr, asserted to be one line)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---------------------------------------------------------------- runs that share a place
def test_runs_started_in_the_same_second_get_run_dirs_of_their_own(dataset, tmp_path):
    args = [sys.executable, "-m", "dlrm_cache.cli.train", f"data.path={dataset}", *SMALL]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    run_dirs = sorted(tmp_path.glob("outputs/*/*"))
    assert len(run_dirs) == 2
    assert all((d / "checkpoint" / "meta.pt").is_file() for d in run_dirs)


def test_a_run_dir_in_use_is_refused_at_once_naming_its_owner(dataset, tmp_path):
    run_dir = tmp_path / "run"
    with held(run_dir, "hydra.run.dir"):  # as a live run holds it
        proc = command("train", f"data.path={dataset}", f"hydra.run.dir={run_dir}", *SMALL, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"is in use by another run (pid {os.getpid()})" in error_line(proc)
    assert not (run_dir / "checkpoint").exists() and not (run_dir / "metrics.jsonl").exists()
    with held(run_dir, "hydra.run.dir"):  # the refused run held nothing
        pass


# ---------------------------------------------------------------- the command line
@pytest.mark.parametrize(
    "override,says",
    [
        ("model=foo", "Could not find 'model/foo'; options in 'model': dcn; dlrm"),
        ("cache.ratio=abc", "cache.ratio=abc (Value 'abc' of type 'str' could not be converted to Float)"),
        ("cache.colour=1", "To append to your config use +cache.colour=1"),
        ("train.batch_size=-1", "train.batch_size=-1: expected >= 1"),
        ("hydra.run.dir=/proc/run", "hydra.run.dir=/proc/run: cannot write into /proc"),
    ],
)
def test_a_bad_command_line_is_one_line_exit_2_and_makes_nothing(tmp_path, override, says):
    proc = command("train", override, cwd=tmp_path)
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("dlrm-train: error: ") and says in line and "schema" not in line
    assert list(tmp_path.iterdir()) == []  # no run dir, no dataset


def test_a_run_dir_under_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    proc = command("train", f"hydra.run.dir={tmp_path / 'f' / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and "cannot write into" in error_line(proc)


# ---------------------------------------------------------------- settings that would be ignored
def test_all_into_val_or_test_without_a_vocabulary_is_refused():
    for split in ("val", "test"):
        with pytest.raises(ConfigError, match=f"all_into='{split}': expected train, or vocab_from="):
            PreprocessRunConfig(input=["a.txt"], output_dir="out", all_into=split)
    assert PreprocessRunConfig(input=["a.txt"], output_dir="out", all_into="train").all_into == "train"


@pytest.mark.parametrize("sharding", ["column_wise", "hybrid"])
def test_a_sharding_in_one_process_without_the_sharded_path_is_refused(dataset, tmp_path, sharding):
    with pytest.raises(TrainingError, match=f"trainer.sharding={sharding} places tables over the ranks"):
        train(config(dataset, trainer=TrainerConfig(sharding=sharding)), tmp_path / "r")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


# ---------------------------------------------------------------- answers that would be silently wrong
@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    train(config(dataset), run_dir)
    return run_dir


def _piece(run_dir: Path) -> tuple[Path, dict, dict]:
    index_path = run_dir / "checkpoint" / "embeddings-rank0.json"
    index = json.loads(index_path.read_text())
    return index_path, index, index["pieces"][2]


def test_a_checkpoint_damaged_on_disk_is_refused_naming_the_file(trained, dataset, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    _, _, piece = _piece(run_dir)
    damaged = run_dir / "checkpoint" / piece["file"]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit flipped
    damaged.write_bytes(bytes(data))
    out = tmp_path / "scores.csv"
    proc = command(
        "predict", f"run_dir={run_dir}", f"input={dataset}", f"output={out}", "progress=false", cwd=tmp_path
    )
    assert proc.returncode == 2 and f"{damaged}: damaged" in error_line(proc)
    assert not out.exists()
    with pytest.raises(ValueError, match="damaged"):  # nor does a resume train on it
        train(
            replace(config(dataset), train=TrainLoopConfig(batch_size=256, max_steps=4, resume=True)), run_dir
        )


def test_scores_that_are_not_numbers_are_refused_and_nothing_is_written(trained, dataset, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    index_path, index, piece = _piece(run_dir)
    path = run_dir / "checkpoint" / piece["file"]
    rows = np.fromfile(path, dtype=np.float32)
    rows[:] = np.nan  # a checkpoint written whole, of a model gone wrong
    rows.tofile(path)
    piece["crc32"] = zlib.crc32(path.read_bytes())
    index_path.write_text(json.dumps(index))
    out = tmp_path / "scores.csv"
    proc = command(
        "predict", f"run_dir={run_dir}", f"input={dataset}", f"output={out}", "progress=false", cwd=tmp_path
    )
    assert proc.returncode == 2 and "the model scores nan for input row 0" in error_line(proc)
    assert not out.exists() and list(tmp_path.glob(".scores.csv*")) == []


def test_a_split_with_nothing_to_score_is_refused_not_an_empty_file(trained, dataset, tmp_path):
    tsv = tmp_path / "new.txt"
    generate(SynthConfig(rows=50, out=str(tsv), progress=False))
    encoded = tmp_path / "new_pq"  # the run's vocabulary; every line in test, none in val
    preprocess(PreprocessRunConfig(input=[str(tsv)], output_dir=str(encoded), vocab_from=str(dataset),
                                   all_into="test"))  # fmt: skip
    out = tmp_path / "scores.csv"
    proc = command("predict", f"run_dir={trained}", f"input={encoded}", "split=val", f"output={out}",
                   "progress=false", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"input={encoded} split=val: no rows to score" in error_line(proc)
    assert not out.exists()


def test_a_split_of_one_class_says_auc_is_undefined_and_its_outputs_stay_json(tmp_path, caplog):
    tsv = tmp_path / "train.txt"
    generate(SynthConfig(rows=3000, out=str(tsv), progress=False))
    tsv.write_text("".join("0" + line[1:] for line in tsv.read_text().splitlines(keepends=True)))
    root = preprocess(PreprocessRunConfig(input=[str(tsv)], output_dir=str(tmp_path / "pq")))
    summary = train(config(root), tmp_path / "r")
    assert math.isnan(summary["val_auc"])
    assert "AUC and NE are undefined" in caplog.text

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    written = json.loads((tmp_path / "r" / "summary.json").read_text(), parse_constant=refuse)
    assert written["val_auc"] is None and written["val_ne"] is None
    for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


def test_a_killed_runs_host_table_file_is_removed_by_the_next_run(dataset, tmp_path):
    mmap_dir = tmp_path / "host"
    common = [sys.executable, "-m", "dlrm_cache.cli.train", f"data.path={dataset}", *SMALL,
              "cache.host=mmap", f"cache.mmap_dir={mmap_dir}"]  # fmt: skip
    long_run = [*common, f"hydra.run.dir={tmp_path / 'a'}", "train.max_steps=0", "train.epochs=1000"]
    proc = subprocess.Popen(long_run, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(mmap_dir.glob("*.f32")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    orphans = list(mmap_dir.glob("*.f32"))
    assert orphans, "the killed run's host table is left"
    again = subprocess.run([*common, f"hydra.run.dir={tmp_path / 'b'}"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not any(p.exists() for p in orphans)
    assert f"left by a run that was killed (pid {proc.pid})" in again.stdout + again.stderr


def test_a_dataset_is_known_by_its_content_not_its_sizes_or_its_path(trained, dataset, tmp_path, monkeypatch):
    other = tmp_path / "other"  # the same sizes, another encoding (as another input would give)
    shutil.copytree(dataset, other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["vocab_id"], meta["dataset_id"] = "0123456789abcdef", "fedcba9876543210"
    (other / "metadata.json").write_text(json.dumps(meta))
    out = tmp_path / "scores.csv"
    proc = command("predict", f"run_dir={trained}", f"input={other}", f"output={out}", "progress=false",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "encoded with another vocabulary than the run's" in error_line(proc)
    assert not out.exists()

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    more = TrainLoopConfig(batch_size=256, max_steps=5, tensorboard=False, resume=True)
    monkeypatch.chdir(tmp_path)  # a relative path elsewhere, to another dataset: refused
    (tmp_path / "data").symlink_to(other)
    with pytest.raises(TrainingError, match=r"other data"):
        train(replace(config("data"), train=more), run_dir)
    monkeypatch.chdir(dataset.parent)  # the same dataset by another path: resumed
    assert train(replace(config(dataset.name), train=more), run_dir)["steps"] == 5


def test_outputs_get_the_modes_the_umask_allows(tmp_path):
    old = os.umask(0o027)
    try:
        tsv = tmp_path / "t.txt"
        assert command("synth", "rows=300", f"out={tsv}", "progress=false", cwd=tmp_path).returncode == 0
        out = tmp_path / "pq"
        proc = command("preprocess", f"input={tsv}", f"output_dir={out}", "preprocess.progress=false",
                       cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    finally:
        os.umask(old)
    assert tsv.stat().st_mode & 0o777 == 0o640
    assert out.stat().st_mode & 0o777 == 0o750
    assert (out / "metadata.json").stat().st_mode & 0o777 == 0o640


def test_a_run_refused_for_its_data_leaves_no_run_dir(tmp_path):
    proc = command("train", f"data.path={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert proc.returncode == 2 and "no such folder" in error_line(proc)
    assert list(tmp_path.iterdir()) == []


def test_an_error_while_training_is_the_last_line_under_a_closed_bar(dataset, tmp_path):
    diverging = ["optim=sgd", "optim.sparse_lr=1e30", "optim.dense_lr=1e30"]
    proc = command("train", f"data.path={dataset}", *SMALL, "train.max_steps=20", "train.log_every=1",
                   *diverging, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    last = proc.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("dlrm-train: error: loss is nan at step ") and "\r" not in last
    assert "dlrm-train: error" not in proc.stderr[: proc.stderr.index(last)]  # said once, after the bar


def test_both_parsers_take_the_same_integers(tmp_path):
    from dlrm_cache.criteo import LABELED_COLUMNS
    from dlrm_cache.data.criteo_tsv import BadLines, read_chunks

    values = [
        "+5",
        "-5",
        "",
        "0012",
        str(2**62),
        str(2**63 - 1),
        str(-(2**63)),
        str(2**63),
        "+-1",
        "1e3",
        "+",
    ]
    cats = "\t".join(["68fd1e64"] * 26)
    lines = [f"1\t{v}\t" + "\t".join(["1"] * 12) + f"\t{cats}\n" for v in values]
    src = tmp_path / "ints.txt"
    src.write_text("".join(lines))
    read = {}
    for parser in ("native", "arrow"):
        bad = BadLines()
        chunks = list(read_chunks(src, LABELED_COLUMNS, 1 << 20, "skip", bad, parser=parser))
        read[parser] = (
            [int(v) for c in chunks for v in c.ints[:, 0]],
            [int(x) for c in chunks for x in c.lines],
        )
    assert read["native"] == read["arrow"]
    assert read["native"][0] == [5, -5, 0, 12, 2**62, 2**63 - 1, -(2**63)]
    assert read["native"][1] == [1, 2, 3, 4, 5, 6, 7]  # lines 8-11 refused by both


def test_a_folder_as_input_and_a_missing_vocabulary_are_said_as_such(dataset, tmp_path):
    (tmp_path / "days").mkdir()
    proc = command("preprocess", f"input={tmp_path / 'days'}", f"output_dir={tmp_path / 'o'}", cwd=tmp_path)
    assert (
        proc.returncode == 2
        and f"input {tmp_path / 'days'}: a folder, not a Criteo TSV file" in error_line(proc)
    )
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / "vocab" / "cat_3.parquet").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"cat_3.parquet: missing: the dataset .*broken is incomplete"
    ):
        train(config(broken), tmp_path / "r")


def test_predict_names_its_own_setting_when_its_host_files_find_no_room(trained, dataset, tmp_path, mounted):
    small = mounted("small", "size=64k")
    proc = command("predict", f"run_dir={trained}", f"input={dataset}", f"output={tmp_path / 's.csv'}",
                   "host=mmap", f"mmap_dir={small}", "progress=false", cwd=tmp_path)  # fmt: skip
    line = error_line(proc)
    assert proc.returncode == 2 and f"error: mmap_dir={small}: the host table needs" in line


def test_resuming_a_finished_run_records_its_evaluation_once(trained, dataset, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    again = TrainLoopConfig(batch_size=256, max_steps=3, tensorboard=False, resume=True)
    train(replace(config(dataset), train=again), run_dir)  # nothing left to train
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val" in r] == [3]
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_the_shipped_sgd_settings_learn(tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from dlrm_cache.cli.schemas import register_configs, to_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("dlrm_cache.configs", version_base=None):
        shipped = to_config(compose("train", ["optim=sgd"]), TrainRunConfig).optim
    GlobalHydra.instance().clear()
    root = synthetic_dataset(tmp_path / "d", 60_000, 0.01, progress=False)
    run = TrainRunConfig(
        data=DataConfig(path=str(root)), optim=shipped, train=TrainLoopConfig(tensorboard=False)
    )
    summary = train(run, tmp_path / "r")  # the built-in model, one epoch of batches of 2,048
    assert summary["test_auc"] > 0.6  # at the former 0.1: 0.49, a model that learnt nothing


@pytest.mark.slow  # several processes
def test_under_torchrun_the_libraries_warn_once(dataset, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "dlrm_cache.cli.train", f"data.path={dataset}", *SMALL, f"hydra.run.dir={tmp_path / 'r'}"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if "Warning" in line]
    assert said and len(said) == len(set(said)), "\n".join(said)


def test_a_read_only_run_dir_is_one_line_and_a_read_only_working_folder_is_fine(tmp_path, mounted):
    ro = mounted("ro", "ro,size=1m")
    proc = command("train", f"hydra.run.dir={ro / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and f"cannot write into {ro} (Read-only file system)" in error_line(proc)
    synth = command("synth", "rows=10", f"out={tmp_path / 't.txt'}", "progress=false", cwd=ro)
    assert synth.returncode == 0, synth.stderr  # it has no run dir to make there
