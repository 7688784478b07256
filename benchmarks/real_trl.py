"""TRL's GRPOTrainer on the same model, data, verifier and budget as our job (benchmarks/real_learning.py).

Run as its own process (torch threads, memory and the clock are its own):
    python -m benchmarks.real_trl SPEC.json
SPEC: model_dir, train_file, out_dir, steps, save_every, lr, prompts_per_step, n, max_new_tokens,
kl_coef, temperature, dtype, seed, verifier. It writes OUT_DIR/checkpoint-STEP (HF dirs, TRL's own
saving) and OUT_DIR/trl_log.json: per step the wall time since training began and TRL's metrics.

The reward is the same verifier function our reward service runs (reward_service/verifiers.py),
called in this process's main thread, as TRL calls reward functions. TRL on CPU generates with
transformers' `generate` (its vLLM integration needs the CUDA `vllm` distribution: trl[vllm]).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def load_dataset_rows(path: str):
    from datasets import Dataset

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    # TRL's conversational format: `prompt` is the list of messages; extra columns reach reward functions
    return Dataset.from_list([{"prompt": r["messages"], "answer": str(r["answer"])} for r in rows])


def main(spec_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reward_service.verifiers import VERIFIERS

    spec = json.loads(Path(spec_path).read_text())
    verify = VERIFIERS[spec["verifier"]][0]

    def verifier_reward(completions, answer, **_):
        out = []
        for c, a in zip(completions, answer):
            text = c[-1]["content"] if isinstance(c, list) else c
            try:
                out.append(float(verify(text, a)))
            except Exception:  # noqa: BLE001 - counted as wrong, as a verifier error would be
                out.append(0.0)
        return out

    torch.manual_seed(spec["seed"])
    dtype = getattr(torch, spec["dtype"])
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype)
    n, k = spec["n"], spec["prompts_per_step"]
    args = GRPOConfig(
        output_dir=spec["out_dir"], learning_rate=spec["lr"], max_steps=spec["steps"], save_steps=spec["save_every"],
        save_only_model=True, per_device_train_batch_size=k * n, num_generations=n, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"], beta=spec["kl_coef"], loss_type="dapo", use_cpu=True,
        bf16=spec["dtype"] == "bfloat16", use_vllm=False, gradient_checkpointing=False, logging_steps=1,
        report_to="none", seed=spec["seed"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, dataloader_num_workers=0, disable_tqdm=True)
    log: list[dict] = []

    class Clock(TrainerCallback):
        t0 = None

        def on_train_begin(self, *a, **kw):
            Clock.t0 = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            log.append({"step": state.global_step, "wall_s": time.perf_counter() - Clock.t0, **(logs or {})})

    trainer = GRPOTrainer(model=model, args=args, reward_funcs=verifier_reward, processing_class=tok,
                          train_dataset=load_dataset_rows(spec["train_file"]), callbacks=[Clock()])
    trainer.train()
    (Path(spec["out_dir"]) / "trl_log.json").write_text(json.dumps(log))
    for ckpt in Path(spec["out_dir"]).glob("checkpoint-*"):
        tok.save_pretrained(ckpt)  # the evaluator renders prompts with the checkpoint's own chat template


if __name__ == "__main__":
    main(sys.argv[1])
