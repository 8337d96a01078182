"""The package installs with `kernels/` mapped to `harli_jax.kernels`, and the README keeps its two commands."""

import re
import subprocess
import sys

from conftest import REPO


def test_regular_install_maps_kernels(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    code = ("import harli_jax.kernels, harli_jax.model, harli_jax.lora, harli_jax.runtime; "
            "print(harli_jax.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(target / "harli_jax" / "kernels" / "__init__.py")
    assert not (target / "kernels").exists(), "kernels must not be installed as a top-level package"


def test_current_install_maps_kernels():
    import harli_jax.kernels

    assert harli_jax.kernels.__name__ == "harli_jax.kernels"


def test_readme_has_exactly_two_setup_commands():
    quickstart = REPO.joinpath("README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(?:pip|python|harli|bash|pytest)\b.*$", quickstart, flags=re.M)
    assert len(commands) == 2, commands
    main, tests = commands
    assert "harli " in main and "pytest" in tests
    assert tests in REPO.joinpath(".ci", "run").read_text(), ".ci/run must run the README's test command"
