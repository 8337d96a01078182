"""The full-forward greedy loop against transformers' greedy generate."""

import copy

import numpy as np
import pytest
import torch

from harli_jax.errors import ConfigError
from harli_jax.model import greedy_generate, load_hf_checkpoint


@pytest.mark.parametrize("variant", ["llama-gqa4", "qwen2-tied"])
def test_greedy_matches_transformers(hf_checkpoint, variant):
    model, path = hf_checkpoint(variant)
    cfg, params = load_hf_checkpoint(path)
    prompt = list(np.random.default_rng(0).integers(3, cfg.vocab_size, 13))
    with torch.no_grad():
        model = copy.deepcopy(model)  # generate() stops at the generation config's EOS whatever it is passed
        model.generation_config.eos_token_id = None
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert len(ref) == 32
    assert greedy_generate(params, cfg, prompt, 32) == ref


def test_stops_at_eos(hf_checkpoint):
    _, path = hf_checkpoint("llama-gqa4")
    cfg, params = load_hf_checkpoint(path)
    free = greedy_generate(params, cfg, [5, 6, 7], 10)
    stopped = greedy_generate(params, cfg, [5, 6, 7], 10, stop_ids=[free[3]])
    assert stopped == free[: free.index(free[3]) + 1]


@pytest.mark.parametrize("prompt, max_new, message", [
    ([], 4, "the prompt is empty"),
    ([1, 10_000], 4, "outside the vocabulary"),
    ([1, 2], 0, "max_new_tokens must be > 0"),
    ([1] * 250, 10, "exceeds the context length 256"),
])
def test_rejects_bad_requests(hf_checkpoint, prompt, max_new, message):
    cfg, params = load_hf_checkpoint(hf_checkpoint("llama-gqa4")[1])
    with pytest.raises(ConfigError, match=message):
        greedy_generate(params, cfg, prompt, max_new)
