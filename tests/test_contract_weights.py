"""The weight-sync protocol: bucket plans, version rule, and a real side gloo group between
processes that each already own a default torch.distributed group."""
import multiprocessing as mp

import pytest
import torch

from contract.weights import (GroupAddress, PackedStateDict, StaleVersionError, TensorSpec, check_version, join_group,
                              leave_group, make_manifest, receive_weights, send_weights, specs_of)
from contract.net import free_port


def test_bucket_plan_respects_size_and_dtype():
    specs = [TensorSpec("a", (10,), "float32"), TensorSpec("b", (20,), "float32"), TensorSpec("c", (5,), "bfloat16"),
             TensorSpec("d", (100,), "float32"), TensorSpec("e", (1,), "float32")]
    m = make_manifest(specs, bucket_bytes=160)
    assert m.buckets == ((0, 1), (2,), (3,), (4,))
    assert m.total_bytes == 4 * 131 + 2 * 5
    for b in m.buckets:
        assert len({specs[i].dtype for i in b}) == 1


def test_packed_state_dict_round_trips_through_the_object_store(ray_local):
    """Every dtype the learner publishes (bf16 has no numpy twin), scalars and transposed views come
    back bit-exact, and a same-node fetch maps shared memory instead of copying it."""
    g = torch.Generator().manual_seed(0)
    sent = {"w": torch.randn(6, 4, generator=g).t(), "b16": torch.randn(7, generator=g).to(torch.bfloat16),
            "scale": torch.tensor(0.5), "ids": torch.arange(5)}
    packed = ray_local.get(ray_local.put(PackedStateDict.pack(sent, aliases=(("w_tied", "w"),))), timeout=60)
    got = dict(packed.tensors())
    assert list(got) == ["w", "w_tied", "b16", "scale", "ids"]  # an alias follows its source
    for name, t in sent.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t), name
    assert got["w_tied"].data_ptr() == got["w"].data_ptr()  # the tied bytes travelled once
    assert len(packed.arrays) == len(sent)
    assert not any(a.flags.writeable or a.flags.owndata for a in packed.arrays)  # views of the object store


def test_tied_aliases_name_each_second_registration_of_a_parameter():
    from transformers import LlamaConfig, LlamaForCausalLM

    from contract.weights import tied_aliases

    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1)
    tied = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=True))
    assert tied_aliases(tied) == (("lm_head.weight", "model.embed_tokens.weight"),)
    assert tied_aliases(LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))) == ()


def test_version_rule():
    assert check_version(3, 4) is True
    assert check_version(3, 3) is False
    with pytest.raises(StaleVersionError, match="older than the current version 3"):
        check_version(3, 2)


def _member(rank, world, group_port, default_port, q):
    import torch.distributed as dist

    # Each process has its own default group (world 1), as a DeepSpeed rank or a vLLM engine does.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{default_port + rank}", rank=0, world_size=1)
    torch.manual_seed(0)
    tensors = {"w": torch.randn(3, 4), "b": torch.randn(4), "h": torch.randn(2, 2).to(torch.bfloat16)}
    manifest = make_manifest(specs_of(tensors.items()), bucket_bytes=40, aliases=(("w_tied", "w"),))
    group = join_group(GroupAddress("127.0.0.1", group_port, world, "wsync-test-1", timeout_s=30), rank)
    if rank == 0:
        send_weights(group, manifest, tensors)
        q.put((rank, True))
    else:
        got = {n: t.clone() for n, t in receive_weights(group, manifest)}
        q.put((rank, all(torch.equal(got[n], tensors[n]) for n in tensors) and torch.equal(got["w_tied"], tensors["w"])
               and list(got) == ["w", "w_tied", "b", "h"]))
    leave_group(group)
    q.put((rank, dist.get_world_size()))  # default group untouched
    dist.destroy_process_group()


def test_side_group_broadcast_between_processes():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    world, gport, dport = 3, free_port(), free_port()
    procs = [ctx.Process(target=_member, args=(r, world, gport, dport + 10 * r, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in range(2 * world)]
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(r for r in results if r[1] is True) == [(0, True), (1, True), (2, True)]
    assert sorted(r for r in results if r[1] is not True) == [(0, 1), (1, 1), (2, 1)]


def test_rendezvous_with_missing_peer_times_out():
    with pytest.raises(Exception, match="(?i)timeout|timed out"):
        join_group(GroupAddress("127.0.0.1", free_port(), 2, "alone", timeout_s=2), 0)
