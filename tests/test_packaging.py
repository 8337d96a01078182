"""The package installs with `kernels/` mapped to `harli_jax.kernels` and `configs/` to `harli_jax.configs`, and the
README keeps its two commands."""

import json
import os
import re
import subprocess
import sys

from conftest import REPO


def test_regular_install_maps_kernels(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    code = ("import harli_jax.kernels, harli_jax.model, harli_jax.lora, harli_jax.runtime, harli_jax.server.app; "
            "print(harli_jax.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(target / "harli_jax" / "kernels" / "__init__.py")
    assert not (target / "kernels").exists(), "kernels must not be installed as a top-level package"
    # The replay's preset, models and traces come with the package: its help works from any directory.
    out = subprocess.run([sys.executable, "-m", "harli_jax.cli", "replay", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "site/harli_jax/configs/models/tiny.yaml" in " ".join(out.stdout.split())  # shown relative to here
    assert (target / "harli_jax" / "configs" / "replay" / "default.yaml").is_file()


def test_current_install_maps_kernels(tmp_path):
    """The environment the tests run in imports this checkout's `kernels/` as `harli_jax.kernels` and nothing
    as a top-level `kernels` (checked in a fresh interpreter outside the repo, so the repo is not on sys.path)."""
    import harli_jax
    import harli_jax.kernels

    assert harli_jax.__file__ == str(REPO / "harli_jax" / "__init__.py")
    assert harli_jax.kernels.__file__ == str(REPO / "kernels" / "__init__.py")
    code = ("import importlib.util, json, sys; "
            "import harli_jax, harli_jax.kernels, harli_jax.model, harli_jax.lora, harli_jax.runtime, harli_jax.cli; "
            "print(json.dumps({'kernels': harli_jax.kernels.__file__, "
            "'attention': harli_jax.kernels.paged_attention_kernel.__file__, "
            "'top_level_spec': importlib.util.find_spec('kernels') is not None, "
            "'top_level_loaded': sorted(m for m in sys.modules if m.split('.')[0] == 'kernels')}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["kernels"] == str(REPO / "kernels" / "__init__.py")
    assert found["attention"] == str(REPO / "kernels" / "paged_attention_kernel.py")
    assert not found["top_level_spec"], "a top-level `kernels` package is importable outside the repo"
    assert found["top_level_loaded"] == [], "the project imports `kernels` instead of `harli_jax.kernels`"


def test_readme_has_exactly_two_setup_commands():
    quickstart = REPO.joinpath("README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(?:pip|python|harli|bash|pytest)\b.*$", quickstart, flags=re.M)
    assert len(commands) == 2, commands
    main, tests = commands
    assert "harli " in main and "pytest" in tests
    assert tests in REPO.joinpath(".ci", "run").read_text(), ".ci/run must run the README's test command"
