"""The tiny models load through the real loaders: transformers and a real vLLM engine."""
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from reward_service.functions import COLOURS


def test_tokenizer_has_whole_colour_words(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    for w in COLOURS:
        assert len(tok(" " + w, add_special_tokens=False).input_ids) == 1, w
    assert tok.decode(tok(" red blue", add_special_tokens=False).input_ids) == " red blue"


def test_transformers_loads_both(tiny_models):
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"])
    tok = AutoTokenizer.from_pretrained(tiny_models["reward"])
    ids = tok(["the cat"], return_tensors="pt")
    assert lm(**ids).logits.shape[-1] == len(tok)
    assert rm(**ids).logits.shape == (1, 1)
    assert lm.config.hidden_size // lm.config.num_attention_heads == 32


def test_vllm_generates_and_matches_transformers_logprobs(tiny_models):
    import vllm

    llm = vllm.LLM(model=str(tiny_models["policy"]), dtype="float32", enforce_eager=True, max_model_len=128,
                   kv_cache_memory_bytes=32 << 20, seed=0)
    out = llm.generate(["the quick brown fox"], vllm.SamplingParams(temperature=1.0, max_tokens=8, logprobs=0,
                                                                     ignore_eos=True))[0]
    sample = out.outputs[0]
    assert len(sample.token_ids) == 8
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32)
    ids = torch.tensor([list(out.prompt_token_ids) + list(sample.token_ids)])
    logp = torch.log_softmax(lm(ids).logits[0, :-1], -1)
    n = len(out.prompt_token_ids)
    ref = logp[n - 1:, :].gather(-1, torch.tensor(sample.token_ids)[:, None]).squeeze(-1)
    got = torch.tensor([lp[t].logprob for lp, t in zip(sample.logprobs, sample.token_ids)])
    assert torch.allclose(got, ref, atol=1e-4), (got, ref)


def test_a_directory_built_from_another_size_is_rebuilt_not_reused(tmp_path):
    import json

    from cluster.demo.tiny_models import make_tiny_models

    untied = make_tiny_models(tmp_path, size="tiny")
    assert json.loads((untied["policy"] / "config.json").read_text())["tie_word_embeddings"] is False
    tied = make_tiny_models(tmp_path, size="tiny-tied")
    lm = AutoModelForCausalLM.from_pretrained(tied["policy"])
    assert lm.config.tie_word_embeddings and lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()


def test_chat_family_is_qwen2_chatml_policy_and_llama3_template_reward(tiny_chat_models):
    import json

    from transformers import GenerationConfig

    ptok = AutoTokenizer.from_pretrained(tiny_chat_models["policy"])
    rtok = AutoTokenizer.from_pretrained(tiny_chat_models["reward"])
    lm = AutoModelForCausalLM.from_pretrained(tiny_chat_models["policy"])
    assert lm.config.model_type == "qwen2" and lm.config.tie_word_embeddings
    assert lm.model.layers[0].self_attn.q_proj.bias is not None  # qkv bias, as Qwen2 has
    assert lm.config.num_key_value_heads < lm.config.num_attention_heads
    assert ptok.eos_token == "<|im_end|>" and lm.config.eos_token_id == ptok.eos_token_id
    gen = GenerationConfig.from_pretrained(tiny_chat_models["policy"])
    assert ptok.eos_token_id in gen.eos_token_id  # vLLM stops at the end of the assistant turn
    conv = [{"role": "user", "content": "hi"}]
    assert ptok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert rtok.apply_chat_template(conv, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")
    rm = json.loads((tiny_chat_models["reward"] / "config.json").read_text())
    assert rm["model_type"] == "llama" and rm["pad_token_id"] == rtok.pad_token_id != rtok.eos_token_id
    assert rtok("red blue", add_special_tokens=False).input_ids != ptok("red blue", add_special_tokens=False).input_ids
