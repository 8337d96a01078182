"""The `harli` command."""

import shutil
import subprocess
import sys

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


def test_bad_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harli: error: ") and "nope" in err and "Traceback" not in err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "harli_jax.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("harli_jax ")


def test_finetune_exports_a_peft_adapter(tiny_yaml, tmp_path, capsys):
    from harli_jax.lora import load_peft
    from harli_jax.model import ModelConfig

    out = tmp_path / "adapter"
    args = ["finetune", "--model", str(tiny_yaml), "--steps", "2", "--rows", "2", "--seq-len", "32", "--rank", "4",
            "--targets", "q_proj,down_proj", "--out", str(out)]
    assert main(args) == 0
    assert "step 2/2" in capsys.readouterr().err
    lora, adapters = load_peft(out, ModelConfig.from_yaml(tiny_yaml))
    assert lora.rank == 4 and set(adapters) == {"q_proj", "down_proj"}


def test_finetune_bad_dataset_is_a_clear_error(tiny_yaml, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["finetune", "--model", str(tiny_yaml), "--dataset", str(missing), "--steps", "1"]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_trace_synth_writes_a_loadable_trace(tmp_path):
    from harli_jax.runtime.trace import load_trace

    out = tmp_path / "t.csv"
    assert main(["trace", "synth", "--kind", "bursts", "--requests", "50", "--rate", "4", "--out", str(out)]) == 0
    trace = load_trace(out)
    assert len(trace) == 50 and out.read_text().startswith("# harli trace synth")
