"""Tiny random-init models and a locally trained tokenizer, for tests and the demo (no hub).

Written with `save_pretrained`, so they load through exactly the code path a real checkpoint
takes (transformers `from_pretrained`, `vllm.LLM(model=dir)`). head_dim is 32 because vLLM's
CPU attention supports only head sizes 32, 64, 80, ... .
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


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    max_position_embeddings: int = 512
    tokenizer_vocab: int = 512
    tie_word_embeddings: bool = False


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
}


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


def train_tokenizer(vocab_size: int, seed: int = 0):
    """Byte-level BPE trained with `tokenizers` on synthetic text, wrapped for transformers. Beyond
    the tiny vocabulary, random words let BPE reach the size asked for; the colour words, far more
    frequent, are still merged into whole tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    extra = random_word_corpus(vocab_size, seed) if vocab_size > SIZES["tiny"].tokenizer_vocab else []
    tok.train_from_iterator(synthetic_corpus(seed=seed) + extra, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _llama_config(spec: TinySpec, vocab_size: int, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                       num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_attention_heads,
                       max_position_embeddings=spec.max_position_embeddings, bos_token_id=1, eos_token_id=2,
                       pad_token_id=3, tie_word_embeddings=spec.tie_word_embeddings, **extra)


def _built_from(spec: TinySpec, model_dir: Path) -> bool:
    """A complete directory written from this very spec (a directory left by an older spec is rebuilt,
    not silently reused)."""
    if not ((model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()):
        return False
    config = json.loads((model_dir / "config.json").read_text())
    return all(config.get(k) == v for k, v in asdict(spec).items() if k != "tokenizer_vocab")


def make_tiny_models(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """Write `policy/` (causal LM) and `reward/` (1-output sequence classifier) under out_dir.

    Both share the tokenizer. Returns {"policy": path, "reward": path}. Idempotent: existing
    complete directories are reused.
    """
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    spec = SIZES[size]
    out = Path(out_dir)
    paths = {"policy": out / "policy", "reward": out / "reward"}
    if all(_built_from(spec, p) for p in paths.values()):
        return paths
    tok = train_tokenizer(spec.tokenizer_vocab, seed)
    vocab = len(tok)
    torch.manual_seed(seed)
    builds = {"policy": lambda: LlamaForCausalLM(_llama_config(spec, vocab)),
              "reward": lambda: LlamaForSequenceClassification(_llama_config(spec, vocab, num_labels=1))}
    for name, build in builds.items():
        with staged_dir(paths[name]) as tmp:
            build().save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    return paths
