"""The `harli` command."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import train_bpe_tokenizer
from harli_jax.cli import main


def test_generate_on_yaml_config(tiny_yaml, capsys):
    assert main(["generate", "--model", str(tiny_yaml), "--prompt", "hello", "--max-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert "6 prompt tokens, 5 new tokens" in err  # BOS + 5 bytes


def test_generate_on_hf_checkpoint(hf_checkpoint, tmp_path, capsys):
    _, src = hf_checkpoint("qwen2-tied")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    train_bpe_tokenizer(path)
    assert main(["generate", "--model", str(path), "--prompt", "hi", "--max-tokens", "3", "--dtype", "bfloat16"]) == 0
    assert "bfloat16" in capsys.readouterr().err


def test_chat_needs_a_chat_template(tiny_yaml, capsys):
    assert main(["generate", "--model", str(tiny_yaml), "--chat", "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert "--chat: " in err and "has no chat template" in err


def test_bad_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harli: error: ") and "nope" in err and "Traceback" not in err


def test_console_script_entry_point(tmp_path):
    """The `harli` script pip installed next to this interpreter (not `python -m`), run outside the repo."""
    import harli_jax

    script = shutil.which("harli", path=Path(sys.executable).parent)
    assert script is not None, f"no `harli` console script in {Path(sys.executable).parent}"
    assert harli_jax.__version__ == importlib.metadata.version("harli_jax")
    out = subprocess.run([script, "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert (out.returncode, out.stdout, out.stderr) == (0, f"harli_jax {harli_jax.__version__}\n", "")
    out = subprocess.run([script, "generate", "--prompt", "hi"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.startswith("usage: harli generate ")
    assert out.stderr.endswith("harli generate: error: the following arguments are required: --model\n"), out.stderr


def test_finetune_exports_a_peft_adapter(tiny_yaml, tmp_path, capsys):
    """The exported adapter holds the weights the same job trains through the Python API (the engine and job
    `_finetune` builds from these flags; non-default --lr/--alpha/--seed so that a dropped flag shows)."""
    import numpy as np

    from harli_jax import Engine, EngineConfig, FinetuneJob, LoRAConfig
    from harli_jax.lora import load_peft
    from harli_jax.lora.adapters import init_lora
    from harli_jax.model import ModelConfig

    out = tmp_path / "adapter"
    args = ["finetune", "--model", str(tiny_yaml), "--steps", "2", "--rows", "2", "--seq-len", "32", "--rank", "4",
            "--alpha", "8", "--lr", "1e-2", "--seed", "3", "--targets", "q_proj,down_proj", "--out", str(out)]
    assert main(args) == 0
    assert "step 2/2" in capsys.readouterr().err
    cfg = ModelConfig.from_yaml(tiny_yaml)
    lora, exported = load_peft(out, cfg)
    assert lora == LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))

    engine = Engine.from_config(tiny_yaml, EngineConfig(max_batch=1, max_seq_len=32, num_pages=2), seed=3,
                                warmup=False)
    handle = engine.finetune(FinetuneJob(lora=lora, learning_rate=1e-2, micro_batch_rows=2, seq_len=32,
                                         total_steps=2, seed=3, eval_interval=1))
    assert handle.wait().step == 2 and handle.done()
    trained = handle.adapters
    initial = init_lora(cfg, lora, seed=3)
    assert set(exported) == set(trained) == {"q_proj", "down_proj"}
    for target, pair in trained.items():
        for name in ("a", "b"):
            got, want = np.asarray(getattr(exported[target], name)), np.asarray(getattr(pair, name))
            assert got.shape == want.shape == (cfg.num_layers, *want.shape[1:])
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{target}.{name}")
        assert exported[target].scale == pair.scale == 2.0
        # B starts at zero, so a non-zero B is training, not the initialisation. (A has not moved yet: its
        # gradient is zero while B is, and the first step's warmup learning rate is 0.)
        assert not np.any(np.asarray(initial[target].b))
        assert np.abs(np.asarray(exported[target].b)).max() > 1e-4, target


@pytest.mark.parametrize("flags, chat, want", [
    ([], True, {"learning_rate": 1e-3, "total_steps": 30, "eval_interval": 7}),  # the extraction task's schedule
    (["--lr", "2e-3"], True, {"learning_rate": 2e-3, "total_steps": 30}),  # a flag wins
    ([], False, {"learning_rate": 3e-3, "total_steps": 200, "eval_interval": 50}),  # upper-casing: FinetuneJob's
    (["--dataset", "DATA"], True, {"learning_rate": 3e-3, "total_steps": 200}),  # the user's data: FinetuneJob's
])
def test_finetune_trains_the_default_task_at_its_schedule(tiny_yaml, tmp_path, monkeypatch, flags, chat, want):
    from harli_jax import cli
    from harli_jax.runtime.engine import Engine

    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    flags = [str(data) if f == "DATA" else f for f in flags]

    def load_model(*args, **kwargs):  # the tiny model, with a chat template where `chat`
        model = real_load(*args, **kwargs)
        model.tokenizer.chat_template = object() if chat else None
        return model

    class Registered(Exception):
        pass

    def finetune(self, job):
        raise Registered(job)

    real_load = cli.load_model
    monkeypatch.setattr(cli, "load_model", load_model)
    monkeypatch.setattr(Engine, "finetune", finetune)
    with pytest.raises(Registered) as registered:
        main(["finetune", "--model", str(tiny_yaml), *flags])
    job = registered.value.args[0]
    assert {k: getattr(job, k) for k in want} == want


def test_generate_with_an_adapter_gives_the_engines_tokens_with_it(tiny_yaml, tmp_path, capsys):
    import jax

    from harli_jax import Engine, EngineConfig, LoRAConfig, SamplingParams
    from harli_jax.lora.adapters import export_peft, init_lora
    from harli_jax.model import ModelConfig
    from harli_jax.model.params import LoRAPair

    cfg, lora = ModelConfig.from_yaml(tiny_yaml), LoRAConfig(rank=4, alpha=8, targets=("q_proj", "up_proj"))
    adapters = {k: LoRAPair(p.a, 0.5 * jax.random.normal(jax.random.key(1), p.b.shape), p.scale)
                for k, p in init_lora(cfg, lora).items()}
    export_peft(adapters, lora, cfg, tmp_path / "adapter")
    assert main(["generate", "--model", str(tiny_yaml), "--prompt", "hello", "--max-tokens", "6",
                 "--adapter", str(tmp_path / "adapter")]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    engine = Engine.from_config(tiny_yaml, EngineConfig(max_batch=1, max_seq_len=32, num_pages=4, max_loras=1),
                                warmup=False)
    engine.add_adapter("a", tmp_path / "adapter")
    greedy = SamplingParams(max_tokens=6)
    with_adapter, base = (engine.generate("hello", greedy, adapter=a)[0].text for a in ("a", None))
    assert text == with_adapter != base


def test_finetune_bad_dataset_is_a_clear_error(tiny_yaml, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["finetune", "--model", str(tiny_yaml), "--dataset", str(missing), "--steps", "1"]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_trace_synth_writes_a_loadable_trace(tmp_path):
    from harli_jax.replay.trace import load_trace

    out = tmp_path / "t.csv"
    assert main(["trace", "synth", "--kind", "bursts", "--requests", "50", "--rate", "4", "--out", str(out)]) == 0
    trace = load_trace(out)
    assert len(trace) == 50 and out.read_text().startswith("# harli trace synth")


def test_generate_refuses_an_empty_prompt_as_the_api_does(tiny_yaml, capsys):
    assert main(["generate", "--model", str(tiny_yaml), "--prompt", ""]) == 2
    assert "the prompt is empty" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "--prompt", "hello", "--max-tokens", "2"],
                                     ["finetune", "--steps", "1", "--rows", "1", "--seq-len", "16"]])
def test_generate_and_finetune_fill_the_compilation_cache_they_are_given(tiny_yaml, tmp_path, command):
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "true", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cache = tmp_path / "xla"
    subprocess.run([sys.executable, "-m", "harli_jax.cli", *command, "--model", str(tiny_yaml),
                    "--compilation-cache", str(cache)], env=env, capture_output=True, text=True, timeout=300,
                   check=True)
    assert any(cache.iterdir())
