import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dlrm_cache").rglob("__init__.py")}
    assert found | {"dlrm_cache.configs"} == listed


def test_the_data_commands_do_not_load_torch():
    """dlrm-preprocess and dlrm-synth never train: importing torch and torchrec (seconds) is not theirs
    to pay."""
    import subprocess
    import sys

    code = (
        "import sys, dlrm_cache.cli.preprocess, dlrm_cache.cli.synth; "
        "print(sorted({'torch', 'torchrec'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
