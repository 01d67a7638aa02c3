"""Faults as they happen: processes killed at random moments, signals, full and read-only file
systems, outputs that hold the user's files. After each, what is left on disk is checked."""

import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from dlrm_cache.config import SynthConfig
from dlrm_cache.data.default_dataset import synthetic_dataset
from dlrm_cache.data.synthetic import generate
from dlrm_cache.distributed.checkpoint import find_checkpoint, load_meta, pieces

PREPROCESS = [sys.executable, "-m", "dlrm_cache.cli.preprocess", "preprocess.progress=false"]
TRAIN = [
    sys.executable, "-m", "dlrm_cache.cli.train", "model.embedding_dim=8",
    "model.dense_arch_layer_sizes=[32,8]", "model.over_arch_layer_sizes=[32,1]", "train.batch_size=256",
    "train.max_steps=60", "train.log_every=1", "train.checkpoint_every=7", "cache.ratio=0.02",
    "cache.lookahead=8",
]  # fmt: skip


@pytest.fixture(scope="module")
def tsvs(tmp_path_factory):
    """Two labelled inputs (two parse processes) and an unlabelled one."""
    folder = tmp_path_factory.mktemp("tsv")
    for seed in (0, 1):
        generate(SynthConfig(rows=60_000, out=str(folder / f"day_{seed}.txt"), seed=seed, progress=False))
    generate(SynthConfig(rows=500, out=str(folder / "test.txt"), labeled=False, progress=False))
    return folder


def preprocess(*args, check=False):
    return subprocess.run([*PREPROCESS, *args], capture_output=True, text=True, check=check)


def dataset_contents(root: Path) -> dict:
    """Everything a dataset holds, read back: every Parquet file's table, and the metadata."""
    out = {str(p.relative_to(root)): pq.read_table(p) for p in sorted(root.rglob("*.parquet"))}
    out["metadata"] = json.loads((root / "metadata.json").read_text())
    return out


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.glob(f".{name}.*"))


def test_preprocess_killed_at_random_moments_reruns_to_the_uninterrupted_output(tsvs, tmp_path):
    inputs = f"input=[{tsvs / 'day_0.txt'},{tsvs / 'day_1.txt'}]"
    preprocess(inputs, f"output_dir={tmp_path / 'straight'}", check=True)
    expected = dataset_contents(tmp_path / "straight")
    start = time.perf_counter()
    preprocess(inputs, f"output_dir={tmp_path / 'timing'}", check=True)
    took = time.perf_counter() - start
    rng = random.Random(17)
    for trial in range(3):
        out = tmp_path / f"killed{trial}"
        proc = subprocess.Popen([*PREPROCESS, inputs, f"output_dir={out}"], stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.25, 0.5) * took)  # well before the end: runs vary in speed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists(), "killed before it finished"
        again = preprocess(inputs, f"output_dir={out}")
        assert again.returncode == 0, again.stderr[-2000:]
        assert dataset_contents(out) == expected, f"trial {trial}"
        assert leftovers(tmp_path, out.name) == [], "the killed run's temporary folder is removed"
        if out.exists() and "removed" in again.stderr:
            assert "left by an interrupted run" in again.stderr


def test_sigterm_cleans_up_like_ctrl_c_without_a_traceback(tsvs, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*PREPROCESS, f"input=[{tsvs / 'day_0.txt'},{tsvs / 'day_1.txt'}]", f"output_dir={out}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not leftovers(tmp_path, "out") and time.time() < deadline:  # the parse has begun
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and err.strip().endswith("dlrm-preprocess: interrupted")
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_a_leftover_of_a_dead_run_is_removed_and_one_of_a_live_run_is_kept(tsvs, tmp_path, caplog):
    from dlrm_cache.config import PreprocessRunConfig
    from dlrm_cache.data.preprocess import preprocess as run

    dead = tmp_path / ".out.tmp-999999999-abc"  # no such pid
    (dead / "train").mkdir(parents=True)
    (dead / "train" / "part-0.parquet").write_bytes(b"x" * 1000)
    live = tmp_path / f".out.tmp-{__import__('os').getpid()}-abc"
    live.mkdir()
    unknown = tmp_path / ".out.tmp-zz9"
    unknown.mkdir()
    run(PreprocessRunConfig(input=[str(tsvs / "test.txt")], output_dir=str(tmp_path / "out")))
    assert not dead.exists() and live.exists() and unknown.exists()
    assert "removed" in caplog.text and "left by an interrupted run (pid 999999999)" in caplog.text
    assert (
        "left alone" in caplog.text
        and ".out.tmp-zz9 (0.00 GB) looks left by an interrupted run" in caplog.text
    )


def test_overwrite_removes_only_what_dlrm_preprocess_wrote(tsvs, tmp_path):
    tsv = str(tsvs / "test.txt")
    inside = tmp_path / "data"
    inside.mkdir()
    (inside / "raw.txt").write_bytes((tsvs / "test.txt").read_bytes())
    r = preprocess(f"input={inside / 'raw.txt'}", f"output_dir={inside}", "overwrite=true")
    assert r.returncode == 2 and "holds the input" in r.stderr and (inside / "raw.txt").is_file()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    r = preprocess(f"input={tsv}", f"output_dir={a_file}", "overwrite=true")
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr
    assert a_file.read_text() == "mine" and leftovers(tmp_path, "notes.txt") == []
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    r = preprocess(f"input={tsv}", f"output_dir={mine}", "overwrite=true")
    assert r.returncode == 2 and "did not write (thesis.tex)" in r.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"
    ours = tmp_path / "ours"
    preprocess(f"input={tsv}", f"output_dir={ours}", check=True)
    (ours / "README.md").write_text("my notes")
    r = preprocess(f"input={tsv}", f"output_dir={ours}", "overwrite=true", "preprocess.min_count=2")
    assert r.returncode == 2 and "did not write (README.md)" in r.stderr and (ours / "README.md").is_file()
    (ours / "README.md").unlink()
    r = preprocess(f"input={tsv}", f"output_dir={ours}", "overwrite=true", "preprocess.min_count=2")
    assert r.returncode == 0, r.stderr
    assert json.loads((ours / "metadata.json").read_text())["preprocess"]["min_count"] == 2
    assert leftovers(tmp_path, "ours") == []


def test_labelled_and_unlabelled_inputs_together_are_refused(tsvs, tmp_path):
    r = preprocess(f"input=[{tsvs / 'day_0.txt'},{tsvs / 'test.txt'}]", f"output_dir={tmp_path / 'o'}")
    assert r.returncode == 2
    assert "day_0.txt has labels (40 fields) but" in r.stderr and "test.txt has none (39 fields)" in r.stderr
    assert not (tmp_path / "o").exists()


def test_an_added_key_that_no_schema_has_is_refused(tsvs, tmp_path):
    r = preprocess(f"input={tsvs / 'test.txt'}", f"output_dir={tmp_path / 'o'}", "+preprocess.min_cout=3")
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == "dlrm-preprocess: error: preprocess.min_cout: no such key in PreprocessRunConfig (a typo?)"
    )
    assert not (tmp_path / "o").exists()


def test_a_read_only_output_is_one_line_naming_the_file(tsvs, mounted):
    ro = mounted("ro", "ro,size=1m")
    r = preprocess(f"input={tsvs / 'test.txt'}", f"output_dir={ro / 'out'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert line.startswith("dlrm-preprocess: error: ") and str(ro) in line and "Read-only file system" in line


def test_a_full_disk_while_preprocessing_is_one_line_and_leaves_nothing(tsvs, mounted):
    small = mounted("small", "size=2m")
    r = preprocess(f"input={tsvs / 'day_0.txt'}", f"output_dir={small / 'out'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("dlrm-preprocess: error: ")
    assert "No space left on device" in r.stderr
    assert list(small.iterdir()) == []


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_dataset(
        tmp_path_factory.mktemp("data"), 20_000, 0.002, row_group_rows=4096, progress=False
    )


def final_state(run_dir: Path) -> tuple[dict, list]:
    meta = load_meta(find_checkpoint(run_dir))
    tables = [p.read(0, p.rows) for p in pieces(find_checkpoint(run_dir), meta["world_size"])]
    return meta["model"], tables


def test_training_killed_at_random_moments_resumes_to_the_uninterrupted_result(dataset, tmp_path):
    args = [*TRAIN, f"data.path={dataset}"]
    start = time.perf_counter()
    subprocess.run([*args, f"hydra.run.dir={tmp_path / 'straight'}"], check=True, capture_output=True)
    took = time.perf_counter() - start
    model, tables = final_state(tmp_path / "straight")
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    expected_losses = [r["loss"] for r in straight if "loss" in r]
    rng = random.Random(3)
    for trial in range(3):
        run_dir = tmp_path / f"killed{trial}"
        proc = subprocess.Popen(
            [*args, f"hydra.run.dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.4, 0.75) * took)  # well before the end: runs vary in speed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        at_kill = find_checkpoint(run_dir)
        assert at_kill is None or load_meta(at_kill)["step"] < 60, "killed before it finished"
        done = subprocess.run(
            [*args, f"hydra.run.dir={run_dir}", "train.resume=true"], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        got_model, got_tables = final_state(run_dir)
        assert load_meta(find_checkpoint(run_dir))["step"] == 60
        for k in model:
            torch.testing.assert_close(
                got_model[k], model[k], atol=1e-6, rtol=1e-5, msg=f"trial {trial}: {k}"
            )
        for a, b in zip(tables, got_tables, strict=True):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        steps = [r["step"] for r in records if "loss" in r]
        assert steps == list(range(1, 61)), f"trial {trial}: each step once"
        torch.testing.assert_close(
            torch.tensor([r["loss"] for r in records if "loss" in r]),
            torch.tensor(expected_losses),
            atol=1e-6,
            rtol=1e-5,
        )


def test_the_default_dataset_is_made_again_when_its_settings_change(tmp_path):
    first = synthetic_dataset(tmp_path, 3000, 0.001, progress=False)
    assert json.loads((first / "metadata.json").read_text())["rows"]["train"] < 3000
    again = synthetic_dataset(tmp_path, 5000, 0.001, progress=False)
    rows = json.loads((again / "metadata.json").read_text())["rows"]
    assert sum(rows.values()) == 5000
    assert leftovers(tmp_path, "parquet") == []


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (from /proc)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")  # a zombie has ended; nothing may reap it here


def test_a_killed_preprocess_leaves_no_process_behind(tsvs, tmp_path):
    inputs = f"input=[{tsvs / 'day_0.txt'},{tsvs / 'day_1.txt'}]"
    proc = subprocess.Popen([*PREPROCESS, inputs, f"output_dir={tmp_path / 'out'}", "preprocess.workers=2"],
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline, children = time.monotonic() + 60, set()
    while len(children) < 2 and time.monotonic() < deadline:  # the two parse processes (and the tracker)
        children |= _children(proc.pid)
        time.sleep(0.02)
    assert len(children) >= 2, "the parse processes never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while not all(_gone(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [c for c in children if not _gone(c)] == [], "processes of the killed run live on"


def test_a_killed_overwrite_leaves_nothing_after_a_rerun_that_has_nothing_to_do(tsvs, tmp_path):
    out = tmp_path / "out"
    inputs = f"input=[{tsvs / 'day_0.txt'},{tsvs / 'day_1.txt'}]"
    preprocess(inputs, f"output_dir={out}", check=True)
    before = dataset_contents(out)
    proc = subprocess.Popen([*PREPROCESS, inputs, f"output_dir={out}", "overwrite=true"],
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while not leftovers(tmp_path, "out") and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert leftovers(tmp_path, "out"), "killed before it made its temporary folder"
    again = preprocess(inputs, f"output_dir={out}")  # the dataset there is whole: nothing to do
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert leftovers(tmp_path, "out") == [] and dataset_contents(out) == before


def test_a_full_disk_names_the_file_it_could_not_write(tsvs, mounted):
    small = mounted("small", "size=2m")
    r = preprocess(f"input={tsvs / 'day_0.txt'}", f"output_dir={small / 'out'}")
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and line.startswith(f"dlrm-preprocess: error: {small}/")
    assert line.endswith(": No space left on device") and "Error writing bytes" not in line
