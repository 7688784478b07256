"""Supervised fine-tuning, the stage before RL, on the learner's kind of DeepSpeed ranks.

Examples become token ids and labels in the driver (`encode_example`): a conversation is rendered
with the model's own chat template and only the assistant turns' tokens are targets (the template's
end-of-turn token included, so the model learns to stop); a plain prompt/response pair is
`prompt + response + EOS` with the response and EOS as targets. Every other label is -100.

`SFTGroup` starts `num_ranks` `SFTRank` Ray actors as the RL learner's do (`learner.rank_group`: one
placement group, every wait with a timeout, a dead rank a one-line error, never a hang) and
initialises DeepSpeed with the RL learner's config builder (`learner.rank.deepspeed_config`). One
optimizer step takes `batch_size` examples; each rank runs its micro-batches. The step's loss is
the mean over all its target tokens (each micro-batch contributes sum(token NLL) / targets in the
step), so the result does not depend on how the step is cut into ranks and micro-batches.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contract import chat
from learner.sft_config import SFTConfig

IGNORE = -100


class SFTDataError(ValueError):
    """An example that cannot be encoded; the message names the row."""


# ---- examples -> ids and labels (driver side, no Ray) ------------------------------------------

def conversation_labels(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the conversation in `tok`'s chat template and labels that keep only the
    assistant turns. Each assistant turn is located as the text between the rendering of the
    messages before it (with the generation prompt) and the rendering up to it, which is how
    every mainstream template behaves (each rendering a prefix of the next)."""
    full = chat.render(tok, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = chat.render(tok, messages[:i], add_generation_prompt=True) if i else ""
        end = chat.render(tok, messages[:i + 1], add_generation_prompt=False)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise chat.ChatError("the chat template does not render the conversation as growing prefixes, so the "
                                 "assistant tokens cannot be located")
        spans.append((len(start), len(end)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [t if any(s <= off[0] < e for s, e in spans) else IGNORE
              for t, off in zip(enc["input_ids"], enc["offset_mapping"])]
    return list(enc["input_ids"]), labels


def plain_labels(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """`prompt + response + EOS`; the response and EOS are the targets."""
    p = tok(prompt)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    r = r + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    return list(p) + list(r), [IGNORE] * len(p) + list(r)


def encode_example(tok, row: dict, max_length: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of one `contract.datasets.load_sft` row, cut to max_length from the right."""
    if row.get("messages") is not None:
        ids, labels = conversation_labels(tok, chat.from_json(row["messages"]))
    else:
        ids, labels = plain_labels(tok, row["prompt"], row["response"])
    return ids[:max_length], labels[:max_length]


@dataclass
class Encoded:
    ids: list[list[int]]
    labels: list[list[int]]
    dropped: int  # examples left with no target token after the cut
    end_of_turn: frozenset[int] = frozenset()  # special tokens that close an assistant turn in the targets

    def __len__(self) -> int:
        return len(self.ids)


def encode_table(tok, table, max_length: int, source: str) -> Encoded:
    """Every row of a `load_sft` table; an example that cannot be encoded is an SFTDataError naming it."""
    ids, labels, dropped, ends = [], [], 0, set()
    special = set(tok.all_special_ids)
    for i, row in enumerate(table.to_pylist()):
        try:
            x, y = encode_example(tok, row, max_length)
        except chat.ChatError as e:
            raise SFTDataError(f"{source}: row {i}: {e}") from None
        if all(v == IGNORE for v in y):
            dropped += 1
            continue
        ids.append(x)
        labels.append(y)
        ends |= turn_ends(y, special)
    return Encoded(ids, labels, dropped, frozenset(ends))


def turn_ends(labels: list[int], special: set[int]) -> set[int]:
    """The last special token of each run of targets: what ends an assistant turn (<|im_end|>,
    <|eot_id|>, EOS)."""
    ends, last = set(), None
    for y in [*labels, IGNORE]:
        if y == IGNORE:
            if last is not None:
                ends.add(last)
            last = None
        elif y in special:
            last = y
    return ends


def stop_at_turn_ends(model_dir: Path, ends: frozenset[int]) -> list[int]:
    """Make `generation_config.json` end generation at every token that ends an assistant turn in
    the SFT targets, as instruct checkpoints ship it (vLLM and `generate` stop at its eos_token_id
    list): a base model whose EOS is not its template's end of turn would otherwise run on."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen = GenerationConfig()
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else (
        [] if gen.eos_token_id is None else [gen.eos_token_id])
    merged = eos + sorted(set(ends) - set(eos))
    if merged != eos:
        gen.eos_token_id = merged
        gen.save_pretrained(model_dir)
    return merged


def pad_examples(ids: list[list[int]], labels: list[list[int]], n_rows: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of `n_rows` rows; rows past the examples are weightless (labels all -100)."""
    width = max(len(x) for x in ids)
    out = {"input_ids": torch.full((n_rows, width), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((n_rows, width), dtype=torch.long),
           "labels": torch.full((n_rows, width), IGNORE, dtype=torch.long)}
    for i in range(n_rows):
        x, y = ids[i % len(ids)], labels[i % len(ids)]
        out["input_ids"][i, :len(x)] = torch.tensor(x)
        out["attention_mask"][i, :len(x)] = 1
        if i < len(ids):
            out["labels"][i, :len(y)] = torch.tensor(y)
    return out


def nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p(label) over target tokens, number of target tokens) of [b, L, V] logits; the
    logits at position t predict token t+1, and -100 labels contribute nothing (no gradient)."""
    logits, target = logits[:, :-1], labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            ignore_index=IGNORE, reduction="sum")
    return nll, (target != IGNORE).sum()


def token_nll_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return nll_from_logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["labels"])


# ---- one rank (a Ray actor) ---------------------------------------------------------------------

class SFTRank:
    def __init__(self, rank: int, cfg_json: str, device: str):
        self.rank, self.cfg, self.device = rank, SFTConfig.model_validate_json(cfg_json), device
        self.world = self.cfg.num_ranks

    def endpoint(self, local_only: bool) -> tuple[str, int]:
        from learner.rank_group import rank_endpoint

        return rank_endpoint(local_only)

    def setup(self, master_addr: str, master_port: int) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM

        from learner.rank import deepspeed_config
        from learner.rank_group import join_deepspeed_group

        join_deepspeed_group(self.rank, self.world, master_addr, master_port, self.device, self.cfg.dist_timeout_s,
                             self.cfg.seed)
        model = AutoModelForCausalLM.from_pretrained(self.cfg.base_model, dtype=torch.float32)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=deepspeed_config(self.cfg.learner_config(), self.cfg.lr))

    def _mine(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of a step (rows are cut evenly over ranks, then into micro-batches)."""
        shard = batch["input_ids"].shape[0] // self.world
        rows = slice(self.rank * shard, (self.rank + 1) * shard)
        micro = self.cfg.micro_batch_size
        return [{k: v[rows][s:s + micro].to(self.device) for k, v in batch.items()} for s in range(0, shard, micro)]

    def train_step(self, batch: dict[str, torch.Tensor], step_targets: int) -> float:
        """One optimizer step over `batch` (all ranks' rows); returns this rank's summed token NLL.
        DeepSpeed averages gradients over ranks, hence the world-size factor (as in the RL learner)."""
        self.engine.train()
        total = 0.0
        for mb in self._mine(batch):
            nll, _ = token_nll_sum(self.engine, mb)
            self.engine.backward(nll / max(step_targets, 1) * self.world, scale_wrt_gas=False)
            self.engine.step()
            total += float(nll.detach())
        return total

    @torch.no_grad()
    def eval_sums(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(summed token NLL, target tokens) over this rank's rows; every rank runs the same number of
        forwards (ZeRO-3 gathers parameters collectively)."""
        self.engine.eval()
        nll, n = 0.0, 0
        for mb in self._mine(batch):
            a, b = token_nll_sum(self.engine, mb)
            nll, n = nll + float(a), n + int(b)
        return nll, n

    def save(self, path: str) -> None:
        """Rank 0 writes the full model as an HF safetensors directory (ZeRO-3 shards gathered)."""
        import deepspeed

        named = list(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None,
                                               enabled=self.cfg.zero_stage == 3):
            if self.rank == 0:
                self.engine.module.save_pretrained(path, state_dict={n: p.detach().cpu() for n, p in named},
                                                   safe_serialization=True)


# ---- the group (driver side) --------------------------------------------------------------------

class SFTGroup:
    """`num_ranks` SFTRank actors started as a `learner.rank_group.Ranks` (one placement group, DeepSpeed
    initialised on all of them); every call awaited with a timeout, a dead rank a one-line error."""

    def __init__(self, cfg: SFTConfig, device, namespace: str | None = None):
        from learner.rank_group import start_ranks

        self.cfg = cfg
        self._ranks = start_ranks(SFTRank, lambda r: (r, cfg.model_dump_json(), device.kind), cfg.num_ranks, device,
                                  cfg.cpus_per_rank, cfg.gpus_per_rank, {}, cfg.init_timeout_s, namespace, "sft-rank")

    def train_step(self, batch_ref, step_targets: int) -> float:
        """Mean token loss of the step (all ranks)."""
        sums = self._ranks.all(lambda r: r.train_step.remote(batch_ref, step_targets), self.cfg.step_timeout_s,
                               "sft step")
        return sum(sums) / max(step_targets, 1)

    def eval_loss(self, batch_ref) -> float:
        parts = self._ranks.all(lambda r: r.eval_sums.remote(batch_ref), self.cfg.step_timeout_s, "sft eval")
        return sum(p[0] for p in parts) / max(1, sum(p[1] for p in parts))

    def save(self, path: str) -> None:
        self._ranks.all(lambda r: r.save.remote(path), self.cfg.step_timeout_s, "save")

    def shutdown(self) -> None:
        if getattr(self, "_ranks", None) is not None:
            self._ranks.kill()


def _split(n: int, cfg: SFTConfig) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_eval = max(1, round(cfg.eval_fraction * n))
    return order[n_eval:], order[:n_eval]


def load_examples(cfg: SFTConfig, tok) -> tuple[Encoded, Encoded]:
    """(train, held-out) encoded examples; raises DatasetError / SFTDataError / ValueError on bad input."""
    from contract.datasets import load_sft

    table = load_sft(cfg.data, cfg.columns)
    if cfg.eval_data is None:
        if table.num_rows < 2:
            raise ValueError(f"data: {cfg.data} has {table.num_rows} example(s), too few to hold one out for the "
                             f"eval loss; add examples or give eval_data")
        train_idx, eval_idx = _split(table.num_rows, cfg)
        train_t, eval_t = table.take(train_idx), table.take(eval_idx)
        eval_src = cfg.data
    else:
        train_t, eval_t, eval_src = table, load_sft(cfg.eval_data, cfg.columns), cfg.eval_data
    train = encode_table(tok, train_t, cfg.max_length, cfg.data)
    held = encode_table(tok, eval_t, cfg.max_length, eval_src)
    for name, enc, src in (("training", train, cfg.data), ("held-out", held, eval_src)):
        if not len(enc):
            raise ValueError(f"{src}: no {name} example has a target token within max_length={cfg.max_length} "
                             f"({enc.dropped} dropped)")
    return train, held


def train_sft(cfg: SFTConfig, device, log=print, namespace: str | None = None,
              examples: tuple[Encoded, Encoded] | None = None) -> dict:
    """Fine-tune cfg.base_model on cfg.data with Ray already initialised; write cfg.output_dir
    atomically; return the metrics (held-out loss before and after, per-epoch train loss).
    `examples`: (train, held-out) from `load_examples` when the caller already encoded them."""
    import ray
    from transformers import AutoTokenizer

    from contract.atomic import staged_dir

    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    train, held = examples or load_examples(cfg, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    step_rows = cfg.batch_size
    eval_rows = math.ceil(len(held) / (cfg.num_ranks * cfg.micro_batch_size)) * cfg.num_ranks * cfg.micro_batch_size
    eval_ref = ray.put(pad_examples(held.ids, held.labels, eval_rows, pad_id))
    log(f"sft: {len(train)} training / {len(held)} held-out examples ({train.dropped + held.dropped} dropped: no "
        f"target within max_length), {cfg.num_ranks} rank(s), ZeRO-{cfg.zero_stage}")
    t0 = time.perf_counter()
    group = SFTGroup(cfg, device, namespace=namespace)
    try:
        eval_before = group.eval_loss(eval_ref)
        log(f"sft: held-out loss before training {eval_before:.4f}")
        rng = np.random.default_rng(cfg.seed + 1)
        epoch_losses, steps = [], 0
        for epoch in range(cfg.epochs):
            order = rng.permutation(len(train))
            losses = []
            for s in range(0, len(order), step_rows):
                idx = order[s:s + step_rows].tolist()
                ids, labels = [train.ids[i] for i in idx], [train.labels[i] for i in idx]
                targets = sum(sum(v != IGNORE for v in y[1:]) for y in labels)
                losses.append(group.train_step(ray.put(pad_examples(ids, labels, step_rows, pad_id)), targets))
                steps += 1
            epoch_losses.append(float(np.mean(losses)))
            eval_now = group.eval_loss(eval_ref)
            log(f"sft: epoch {epoch + 1}/{cfg.epochs}: train loss {epoch_losses[-1]:.4f}, held-out loss {eval_now:.4f}")
        with staged_dir(Path(cfg.output_dir)) as tmp:
            group.save(str(tmp))
            tok.save_pretrained(tmp)
            stops = stop_at_turn_ends(tmp, train.end_of_turn)
        log(f"sft: generation ends at {[tok.convert_ids_to_tokens(t) for t in stops]}")
    finally:
        group.shutdown()
    return {"eval_loss_before": eval_before, "eval_loss": eval_now, "train_loss": epoch_losses, "steps": steps,
            "num_train": len(train), "num_eval": len(held), "dropped": train.dropped + held.dropped,
            "wall_s": time.perf_counter() - t0, "output_dir": str(cfg.output_dir)}
