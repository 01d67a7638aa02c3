import subprocess

import pytest
import torch

from dlrm_cache.config import MULTI_HOT_MLPERF, PreprocessOptions
from dlrm_cache.data.default_dataset import synthetic_dataset


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mounted(tmp_path):
    """Mount a tmpfs (``options``) on a folder of the test's, where this machine allows it."""
    mounts = []

    def mount(name, options):
        folder = tmp_path / name
        folder.mkdir()
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
        ).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(scope="session")
def bags(tmp_path_factory):
    """20,000 generated rows of Criteo 1TB's profile, hashed as MLPerf's cap, scaled, and expanded to
    MLPerf's bags (pareto: the skewed variant, so that a 2% cache has hits to find)."""
    options = PreprocessOptions(max_ind_range=40_000, multi_hot_sizes=list(MULTI_HOT_MLPERF),
                                multi_hot_distribution="pareto")  # fmt: skip
    return synthetic_dataset(tmp_path_factory.mktemp("bags"), 20_000, 0.0005, row_group_rows=4096,
                             progress=False, cardinalities="terabyte", options=options)  # fmt: skip
