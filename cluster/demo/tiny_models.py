"""Tiny random-init models and locally trained tokenizers, for tests and the demo (no hub).

Written with `save_pretrained`, so they load through exactly the code path a real checkpoint
takes (transformers `from_pretrained`, `vllm.LLM(model=dir)`). head_dim is 32 because vLLM's
CPU attention supports only head sizes 32, 64, 80, ... .

Two families:
- `llama` (sizes tiny, tiny-tied, m100): Llama-shaped policy and reward model sharing one
  tokenizer, plain text, no chat template.
- `chat` (size tiny-chat): what a user with an instruct model has. The policy is Qwen2-shaped
  (qkv bias, tied embeddings, grouped-query attention) with a ChatML tokenizer: the real
  Qwen2-Instruct chat template, `<|im_start|>`/`<|im_end|>` special tokens, `<|im_end|>` as EOS
  and `generation_config.json` listing the end-of-turn ids, as the real checkpoints ship. The
  reward model is Llama-3-shaped with a DIFFERENT tokenizer (its own BPE, other ids) and the
  real Llama-3-Instruct template (`<|start_header_id|>`, `<|eot_id|>`), so anything that
  re-tokenizes policy ids instead of re-rendering the conversation fails loudly.
"""
from __future__ import annotations

import json
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from contract.atomic import staged_dir
from reward_service.functions import COLOURS, FILLER

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
# Qwen2's special tokens (no BOS; <|endoftext|> pads) and Qwen2-Instruct's chat template, verbatim.
CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-3's special tokens and Llama-3-Instruct's chat template, verbatim.
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|finetune_right_pad_id|>"]
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    max_position_embeddings: int = 512
    tokenizer_vocab: int = 512
    tie_word_embeddings: bool = False
    family: str = "llama"  # "llama": plain-text Llama pair; "chat": Qwen2 ChatML policy + Llama-3-template RM


SIZES = {
    "tiny": TinySpec(),
    # Tied input/output embeddings, as most small real LMs have: the weight sync must carry the
    # shared matrix once and the engine must tie it again.
    "tiny-tied": TinySpec(tie_word_embeddings=True),
    # The compute-bound size of the benchmarks, shaped like STACK.md's anchor (110M parameters): a
    # real 32000-token vocabulary with tied embeddings, as small real LMs have, so the LM head and
    # the log-softmax over the vocabulary cost what they cost in real RLHF.
    "m100": TinySpec(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                     tokenizer_vocab=32000, tie_word_embeddings=True),
    # A chat model as users have them: Qwen2-shaped ChatML policy, Llama-3-template reward model
    # with its own tokenizer (see the module docstring).
    "tiny-chat": TinySpec(tie_word_embeddings=True, family="chat"),
}
# Which transformers model_type each role of a family is built as (a directory of another type is rebuilt).
MODEL_TYPES = {"llama": {"policy": "llama", "reward": "llama"}, "chat": {"policy": "qwen2", "reward": "llama"}}


def synthetic_corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = list(COLOURS) + list(FILLER)
    return [" ".join(rng.choice(words) + ("" if rng.random() < 0.8 else str(rng.randint(0, 99)))
                     for _ in range(rng.randint(4, 24))) for _ in range(n_lines)]


def random_word_corpus(vocab_size: int, seed: int = 0) -> list[str]:
    """Lines of random alphanumeric words: enough distinct text for BPE to reach `vocab_size`
    (the colour corpus runs out of merges near 530 tokens)."""
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + string.digits
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 7))) for _ in range(2 * vocab_size)]
    return [" ".join(rng.choice(words) for _ in range(30)) for _ in range(vocab_size * 5 // 4)]


def _train_bpe(vocab_size: int, special: list[str], seed: int, extra_lines: list[str] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=special[0] if special[0] == "<unk>" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    extra = random_word_corpus(vocab_size, seed) if vocab_size > SIZES["tiny"].tokenizer_vocab else []
    tok.train_from_iterator(synthetic_corpus(seed=seed) + extra + list(extra_lines), trainer)
    return tok


def train_tokenizer(vocab_size: int, seed: int = 0):
    """Byte-level BPE trained with `tokenizers` on synthetic text, wrapped for transformers. Beyond
    the tiny vocabulary, random words let BPE reach the size asked for; the colour words, far more
    frequent, are still merged into whole tokens first."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_train_bpe(vocab_size, SPECIAL, seed), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# Role words and template text, so the chat tokenizers merge them like real ones do.
_CHAT_LINES = ["system user assistant You are a helpful assistant."] * 50


def chatml_tokenizer(vocab_size: int, seed: int = 0):
    """Qwen2-Instruct-style: no BOS, `<|im_end|>` ends a turn and is the EOS, `<|endoftext|>` pads."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_train_bpe(vocab_size, CHATML_SPECIAL, seed, _CHAT_LINES),
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=CHATML_TEMPLATE)


def llama3_tokenizer(vocab_size: int, seed: int = 0):
    """Llama-3-Instruct-style: BOS `<|begin_of_text|>` written by the template, `<|eot_id|>` ends a turn."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bpe = _train_bpe(vocab_size, LLAMA3_SPECIAL, seed, _CHAT_LINES)
    bos = ("<|begin_of_text|>", bpe.token_to_id("<|begin_of_text|>"))
    # As the real one: plain `tok(text)` prepends BOS, so rendered chat text (whose template wrote
    # BOS already) must be tokenized without special tokens (contract/chat.py).
    bpe.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                                       special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>",
                                   additional_special_tokens=["<|end_of_text|>", "<|start_header_id|>",
                                                              "<|end_header_id|>"],
                                   chat_template=LLAMA3_TEMPLATE)


def _llama_config(spec: TinySpec, vocab_size: int, **extra):
    from transformers import LlamaConfig

    extra = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, **extra}
    return LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                       num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_attention_heads,
                       max_position_embeddings=spec.max_position_embeddings,
                       tie_word_embeddings=spec.tie_word_embeddings, **extra)


def _qwen2_config(spec: TinySpec, tok):
    """Qwen2-shaped: qkv bias (always on in Qwen2), tied embeddings, one KV head per two query heads."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                       num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                       num_key_value_heads=max(1, spec.num_attention_heads // 2),
                       max_position_embeddings=spec.max_position_embeddings,
                       bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=spec.tie_word_embeddings, use_sliding_window=False)


def _chat_generation_config(tok):
    """As Qwen2-Instruct ships it: generation ends at <|im_end|> or <|endoftext|> (vLLM and
    `generate` both read the list)."""
    from transformers import GenerationConfig

    end = tok.convert_tokens_to_ids("<|endoftext|>")
    return GenerationConfig(bos_token_id=end, eos_token_id=[tok.eos_token_id, end], pad_token_id=end)


def _built_from(spec: TinySpec, model_dir: Path, model_type: str) -> bool:
    """A complete directory written from this very spec (a directory left by an older spec is rebuilt,
    not silently reused)."""
    if not ((model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()):
        return False
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("model_type") == model_type and all(
        config.get(k) == v for k, v in asdict(spec).items() if k not in ("tokenizer_vocab", "family"))


def _builds(spec: TinySpec, seed: int) -> dict:
    """role -> (tokenizer, model factory) of one family."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification, Qwen2ForCausalLM

    if spec.family == "chat":
        ptok = chatml_tokenizer(spec.tokenizer_vocab, seed)
        # The RM's own tokenizer: another vocabulary size and corpus seed, so its ids differ.
        rtok = llama3_tokenizer(spec.tokenizer_vocab + 64, seed + 1)

        def policy():
            model = Qwen2ForCausalLM(_qwen2_config(spec, ptok))
            model.generation_config = _chat_generation_config(ptok)
            return model

        rcfg = dict(bos_token_id=rtok.bos_token_id, eos_token_id=rtok.eos_token_id, pad_token_id=rtok.pad_token_id)
        return {"policy": (ptok, policy),
                "reward": (rtok, lambda: LlamaForSequenceClassification(
                    _llama_config(spec, len(rtok), num_labels=1, **rcfg)))}
    tok = train_tokenizer(spec.tokenizer_vocab, seed)
    return {"policy": (tok, lambda: LlamaForCausalLM(_llama_config(spec, len(tok)))),
            "reward": (tok, lambda: LlamaForSequenceClassification(_llama_config(spec, len(tok), num_labels=1)))}


def make_tiny_models(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """Write `policy/` (causal LM) and `reward/` (1-output sequence classifier) under out_dir.

    The llama family shares one tokenizer; the chat family gives each its own (see the module
    docstring). Returns {"policy": path, "reward": path}. Idempotent: existing complete
    directories are reused.
    """
    import torch

    spec = SIZES[size]
    out = Path(out_dir)
    paths = {"policy": out / "policy", "reward": out / "reward"}
    types = MODEL_TYPES[spec.family]
    if all(_built_from(spec, p, types[role]) for role, p in paths.items()):
        return paths
    torch.manual_seed(seed)
    for name, (tok, build) in _builds(spec, seed).items():
        with staged_dir(paths[name]) as tmp:
            build().save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    return paths
