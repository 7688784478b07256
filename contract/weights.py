"""The weight-sync protocol between the learner (sender, rank 0) and the rollout workers.

Versions: 0 is the initial checkpoint; the learner increments on each publish; a receiver refuses
a version older than the one it holds (equal is a no-op re-send, e.g. to a re-joined worker).

Transports:
  * broadcast: a side process group (gloo on CPU, NCCL on GPU) between learner rank 0 (group
    rank 0) and every worker (ranks 1..N), formed apart from each side's default group. The
    sender and receivers agree on a `WeightManifest` (names, shapes, dtypes, bucket plan) first,
    then tensors travel as a few large flat buckets (flat buckets beat per-tensor sends ~2x).
    The group is re-formed under a new name whenever the worker set changes.
  * object store: one `ray.put` of a `PackedStateDict`; each worker fetches it.
Every rendezvous and collective carries a timeout: a dead peer becomes an error, never a hang.

Tied parameters (`lm_head.weight` is `model.embed_tokens.weight`) travel once, under their first
name, and receivers get every alias back (`tied_aliases`): vLLM's `reload_weights` unties a tied
output embedding, so an engine not sent the alias kept sampling from its step-0 LM head.

LoRA adapters: with `adapter` set (the adapter's PEFT adapter_config.json), the tensors are a LoRA
adapter under PEFT's saved names (adapter_model.safetensors) rather than the model's weights; a
receiver serves the base model with that adapter on top (vLLM's runtime LoRA), and the sync moves
only the adapter's bytes. Both transports carry it unchanged.
"""
from __future__ import annotations

import datetime as _dt
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


class StaleVersionError(ValueError):
    """A receiver was offered weights older than the version it already serves."""


def check_version(current: int, incoming: int) -> bool:
    """True if `incoming` must be loaded, False if it is the version already held."""
    if incoming < current:
        raise StaleVersionError(f"weight version {incoming} is older than the current version {current}")
    return incoming > current


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32", "bfloat16"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()


@dataclass(frozen=True)
class WeightManifest:
    """What the receivers allocate before a broadcast: specs in send order, grouped in buckets."""

    specs: tuple[TensorSpec, ...]
    buckets: tuple[tuple[int, ...], ...]  # indices into specs; one dtype per bucket
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, name sent): see `tied_aliases`
    adapter: str = ""  # a LoRA adapter's adapter_config.json: see the module docstring; "" for full weights

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def make_manifest(specs: Iterable[TensorSpec], bucket_bytes: int = 256 << 20,
                  aliases: tuple[tuple[str, str], ...] = (), adapter: str = "") -> WeightManifest:
    """Greedy buckets of at most `bucket_bytes` (a larger tensor gets a bucket of its own)."""
    specs = tuple(specs)
    buckets: list[list[int]] = []
    open_by_dtype: dict[str, tuple[list[int], int]] = {}
    for i, s in enumerate(specs):
        cur, size = open_by_dtype.get(s.dtype, (None, 0))
        if cur is None or size + s.nbytes > bucket_bytes:
            cur, size = [], 0
            buckets.append(cur)
        cur.append(i)
        open_by_dtype[s.dtype] = (cur, size + s.nbytes)
    return WeightManifest(specs=specs, buckets=tuple(tuple(b) for b in buckets), aliases=aliases, adapter=adapter)


def tied_aliases(module: torch.nn.Module) -> tuple[tuple[str, str], ...]:
    """(alias, first name) for every parameter registered under a second name; `named_parameters()`
    lists the first name only, which is what is sent."""
    first: dict[int, str] = {}
    aliases = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    return tuple(aliases)


def _with_aliases(named: Iterable[tuple[str, torch.Tensor]], aliases: tuple[tuple[str, str], ...]
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Each (name, tensor), followed by the same tensor under each of its aliases."""
    by_source: dict[str, list[str]] = {}
    for alias, source in aliases:
        by_source.setdefault(source, []).append(alias)
    for name, t in named:
        yield name, t
        for alias in by_source.get(name, ()):
            yield alias, t


def specs_of(named: Iterable[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    return [TensorSpec(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in named]


@dataclass(frozen=True)
class PackedStateDict:
    """A state dict laid out for the Ray object store: one raw byte array per tensor.

    Ray writes numpy arrays straight into shared memory on `ray.put` and maps them without a copy
    on a same-node `ray.get`, whereas torch tensors are pickled (a clone, a serialise and a
    deserialise: 0.17-0.27x of a raw broadcast). Bytes rather than typed arrays because numpy has
    no bfloat16; each tensor's spec travels beside it."""

    specs: tuple[TensorSpec, ...]
    arrays: tuple[np.ndarray, ...]
    aliases: tuple[tuple[str, str], ...] = ()
    adapter: str = ""  # as `WeightManifest.adapter`

    @classmethod
    def pack(cls, tensors: dict[str, torch.Tensor], aliases: tuple[tuple[str, str], ...] = (),
             adapter: str = "") -> PackedStateDict:
        """Views, not copies (for contiguous CPU tensors): `ray.put` makes the one copy."""
        items = [(n, t.detach().cpu().contiguous()) for n, t in tensors.items()]
        return cls(tuple(specs_of(items)), tuple(t.reshape(-1).view(torch.uint8).numpy() for _, t in items), aliases,
                   adapter)

    @property
    def total_bytes(self) -> int:
        """Bytes of the tensors (what one sync moves to each worker)."""
        return sum(s.nbytes for s in self.specs)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) views over the arrays; read-only when fetched from the object store, which is
        fine for loaders that copy into their own parameters."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            yield from _with_aliases(((s.name, torch.from_numpy(a).view(s.torch_dtype).view(s.shape))
                                     for s, a in zip(self.specs, self.arrays)), self.aliases)


@dataclass(frozen=True)
class GroupAddress:
    """Where and how to form one side group. `name` must be unique per formation."""

    host: str
    port: int
    world_size: int  # 1 sender + number of receivers
    name: str
    backend: str = "gloo"
    timeout_s: float = 120.0


def join_group(addr: GroupAddress, rank: int):
    """Form (collectively, all ranks call this) a process group that leaves the default one alone."""
    timeout = _dt.timedelta(seconds=addr.timeout_s)
    store = dist.TCPStore(addr.host, addr.port, addr.world_size, is_master=(rank == 0), timeout=timeout,
                          wait_for_workers=False)
    prefixed = dist.PrefixStore(addr.name, store)
    if addr.backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, addr.world_size, timeout)
    elif addr.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, addr.world_size, opts)
    else:
        raise ValueError(f"weight sync backend: expected gloo or nccl (got {addr.backend!r})")
    # A cheap collective proves every member arrived before any large transfer starts.
    _broadcast(pg, torch.zeros(1, device=_device_for(addr.backend)))
    return _Group(pg, store)


@dataclass
class _Group:
    pg: object
    store: object  # keep the TCPStore alive as long as the group


def _device_for(backend: str) -> str:
    return "cuda" if backend == "nccl" else "cpu"


def _broadcast(pg, t: torch.Tensor, src: int = 0) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = src
    opts.rootTensor = 0
    pg.broadcast([t], opts).wait()


def leave_group(group) -> None:
    try:
        group.pg.shutdown()
    except Exception:  # noqa: BLE001 - a peer may already be gone; leaving must not raise
        pass


def send_weights(group, manifest: WeightManifest, tensors: dict[str, torch.Tensor]) -> None:
    """Sender side (group rank 0): one flat broadcast per bucket."""
    for bucket in manifest.buckets:
        parts = [tensors[manifest.specs[i].name].detach().reshape(-1) for i in bucket]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
        _broadcast(group.pg, flat)


def receive_weights(group, manifest: WeightManifest, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver side: yields (name, tensor) as buckets arrive, so loading can stream."""
    yield from _with_aliases(_received(group, manifest, device), manifest.aliases)


def _received(group, manifest: WeightManifest, device: str) -> Iterator[tuple[str, torch.Tensor]]:
    for bucket in manifest.buckets:
        specs = [manifest.specs[i] for i in bucket]
        flat = torch.empty(sum(s.numel for s in specs), dtype=specs[0].torch_dtype, device=device)
        _broadcast(group.pg, flat)
        offset = 0
        for s in specs:
            yield s.name, flat[offset:offset + s.numel].view(s.shape)
            offset += s.numel
