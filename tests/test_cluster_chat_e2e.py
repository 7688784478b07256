"""The paper's pipeline on a chat model, end to end through the CLI: `rlhf train-sft` on the tiny
Qwen2-shaped ChatML policy (2 DeepSpeed ranks, ZeRO-2: this is also the suite's one SFT run, checked
for what SFT must do: held-out and training loss down, an HF directory that stops at the end of a
turn), then `rlhf train` (PPO) from its output with chat prompts and a Llama-3-template reward model
that has its own tokenizer, then `rlhf generate` on the result.

Both training commands attach (`--address`) to the session's local Ray cluster instead of each
starting one: a node start is most of a short job's time on a small box, and under load it can
miss Ray's fixed 30 s registration limit."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from contract.net import free_port
from support_jobs import rlhf

pytestmark = pytest.mark.slow
COLOURS = ["red", "blue", "green", "yellow", "orange", "purple"]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_sft_dir(d: Path, base_dir: Path) -> None:
    """An HF directory: weights, config, generation config, chat template, tokenizer; generation stops at
    the template's end of turn; the tied embedding stays tied, and training moved it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    assert {"model.safetensors", "config.json", "generation_config.json", "chat_template.jinja",
            "tokenizer.json"} <= {p.name for p in d.iterdir()}
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.convert_tokens_to_ids("<|im_end|>") in GenerationConfig.from_pretrained(d).eos_token_id
    tuned = AutoModelForCausalLM.from_pretrained(d)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert tuned.config.tie_word_embeddings and tuned.lm_head.weight.data_ptr() == tuned.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(tuned.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_sft_then_ppo_on_a_chat_model_with_a_different_template_rm(tiny_chat_models, tmp_path, ray_local):
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    from cluster.outputs.run_dir import RunDir
    from reward_service.model import RewardModel

    address = ray_local.get_runtime_context().gcs_address
    # 1. SFT: short colour answers, each assistant turn ending in <|im_end|>.
    sft_rows = [{"messages": [{"role": "user", "content": f"Name colours, please ({i})."},
                              {"role": "assistant", "content": f"{COLOURS[i % 6]} {COLOURS[(i + 2) % 6]}"}]}
                for i in range(48)]
    # a step: 8 rows = 2 ranks x micro-batch 2 x 2 accumulated; 8 of 48 held out: 40 train, 5 steps an epoch
    sft_cfg = {"base_model": str(tiny_chat_models["policy"]), "data": str(jsonl(tmp_path / "sft.jsonl", sft_rows)),
               "output_dir": str(tmp_path / "sft"), "epochs": 4, "lr": 3e-3, "batch_size": 8, "micro_batch_size": 2,
               "num_ranks": 2, "zero_stage": 2, "max_length": 64, "eval_fraction": 1 / 6, "device": "cpu",
               "ray": {"namespace": "chat-e2e-sft"}}
    (tmp_path / "sft.yaml").write_text(json.dumps(sft_cfg))
    t0 = time.perf_counter()
    r = rlhf("train-sft", str(tmp_path / "sft.yaml"), "--address", address, timeout=600)
    print(f"train-sft {time.perf_counter() - t0:.0f}s")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    before, after = map(float, re.search(r"held-out loss ([\d.]+) -> ([\d.]+)", r.stdout).groups())
    assert after < 0.5 * before, r.stdout
    assert "(8 held-out, 40 training examples, 20 steps," in r.stdout, r.stdout
    assert "2 rank(s), ZeRO-2" in r.stdout, r.stdout
    train_loss = [float(x) for x in re.findall(r"sft: epoch \d+/4: train loss ([\d.]+)", r.stdout)]
    assert len(train_loss) == 4 and train_loss[-1] < train_loss[0], r.stdout
    check_sft_dir(tmp_path / "sft", tiny_chat_models["policy"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sft.tmp")]  # written atomically

    # 2. PPO from the SFT model: chat prompts in, the Llama-3-template RM scores.
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"id": f"q{i}", "messages": [
        {"role": "user", "content": f"Name colours, please ({100 + i})."}]} for i in range(8)])
    run = tmp_path / "run"
    job = {"name": "chat-e2e", "run_dir": str(run), "device": "cpu",
           "model": {"policy": str(tmp_path / "sft")},
           "data": {"prompts": str(prompts), "prompts_per_step": 4},
           "rollout": {"num_workers": 1, "sampling": {"n": 2, "max_new_tokens": 12}},
           "reward": {"model_dir": str(tiny_chat_models["reward"]), "http_port": free_port(), "max_retries": 1},
           "learner": {"num_ranks": 1, "lr": 1e-4, "critic_lr": 1e-3,
                       "rl": {"algorithm": "ppo", "minibatch_size": 8, "micro_batch_size": 8}},
           "loop": {"steps": 2},
           "ray": {"namespace": "chat-e2e"}}
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    t0 = time.perf_counter()
    r = rlhf("train", str(tmp_path / "job.yaml"), "--address", address, timeout=600)
    print(f"train {time.perf_counter() - t0:.0f}s")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    table = RunDir(run).read_rollouts()
    assert table.num_rows == 2 * 4 * 2
    tok = AutoTokenizer.from_pretrained(tmp_path / "sft")
    msgs = table.column("messages").to_pylist()
    for prompt, m in zip(table.column("prompt").to_pylist(), msgs):
        conv = json.loads(m)
        assert conv[0]["role"] == "user" and conv[0]["content"].startswith("Name colours")
        assert prompt == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    # generation stops at the template's end of turn, and that token is what the learner trains on
    reasons = table.column("finish_reason").to_pylist()
    stopped = [ids for ids, why in zip(table.column("response_ids").to_pylist(), reasons) if why == "stop"]
    assert stopped, reasons
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # Qwen2's generation_config ends generation at <|im_end|> or <|endoftext|>; the SFT taught <|im_end|>
    assert all(ids[-1] in (im_end, tok.convert_tokens_to_ids("<|endoftext|>")) for ids in stopped), stopped
    assert any(ids[-1] == im_end for ids in stopped), stopped
    # the reward model scored each conversation in its own (Llama-3) template, re-rendered from the messages
    rm = RewardModel(tiny_chat_models["reward"], max_length=512)
    rows = table.slice(0, 4)
    offline = rm.score(rows.column("prompt").to_pylist(), rows.column("response").to_pylist(),
                       rows.column("messages").to_pylist())
    served = [dict(p)["model"] for p in rows.column("reward_parts").to_pylist()]
    assert offline == pytest.approx(served, abs=1e-4)
    metrics = RunDir(run).read_metrics()
    assert len(metrics) == 2 and all("truncated_frac" in m for m in metrics)
    assert pc.sum(table.column("trained")).as_py() == table.num_rows

    # 3. See what the trained policy says (the run directory resolves to its latest checkpoint).
    out = tmp_path / "samples.jsonl"
    t0 = time.perf_counter()
    r = rlhf("generate", str(run), str(prompts), "--limit", "2", "--n", "2", "--max-new-tokens", "12",
             "--reward-model", str(tiny_chat_models["reward"]), "--out", str(out), "--max-model-len", "512", "--quiet")
    print(f"generate {time.perf_counter() - t0:.0f}s")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(samples) == 4 and all(isinstance(s["reward"], float) and s["messages"] for s in samples)
    assert "rlhf generate: 4 samples" in r.stdout
