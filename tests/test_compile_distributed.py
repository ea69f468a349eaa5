"""Whole models under torch.compile(fullgraph=True) and DistributedDataParallel; modules that
copy, pickle and move like torch's."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_parity

import fastattn
from fastattn.models import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        max_seq_len=64)  # fmt: skip


def test_reference_transformer_compiles_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(CFG, kernels="fastattn")
    ref = Transformer(CFG).double()
    ref.load_state_dict(model.state_dict())
    idx, tgt = torch.randint(0, 64, (2, 24)), torch.randint(0, 64, (2, 24))
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    logits, loss = compiled(idx, tgt)
    want, want_loss = ref(idx, tgt)
    assert_parity(logits, want.detach())
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(grads, torch.autograd.grad(want_loss, list(ref.parameters())), strict=True):
        assert_parity(a, b)


COMPILE_WARNINGS = textwrap.dedent(
    """
    import warnings, torch, torch.nn.functional as F
    import fastattn
    from fastattn.models import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                            max_seq_len=16)
    idx = torch.randint(0, 64, (2, 8))

    def run(kernels, sm, norm, sdpa):
        torch._dynamo.reset()
        def f(x, w, q):
            return norm(sm(x), w) + sdpa(q, q, q).sum()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.compile(f, fullgraph=True)(torch.randn(4, 16), torch.ones(16),
                                             torch.randn(1, 2, 4, 8))
            torch.compile(Transformer(cfg, kernels=kernels), fullgraph=True)(idx)
        return {(w.category.__name__, str(w.message)) for w in rec}

    # torch's own warnings (deprecations inside torch, first-compile notices) come with torch's
    # kernels too: only what appears with fastattn's and not with torch's counts.
    base = run("eager", lambda x: torch.softmax(x, -1), lambda y, w: F.rms_norm(y, (16,), w),
               F.scaled_dot_product_attention)
    ours = run("fastattn", lambda x: fastattn.softmax(x, causal=True),
               lambda y, w: fastattn.rms_norm(y, 16, w), fastattn.attention)
    for cat, msg in sorted(ours - base):
        print(f"NEW {cat}: {msg[:300]}")
    print("DONE")
    """
)


def test_torch_compile_of_fastattn_warns_no_more_than_torchs_own_kernels():
    # Every compile used to warn that Dynamo traced through an lru_cache in dispatch.select.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", COMPILE_WARNINGS], capture_output=True, text=True,
                       env=env, timeout=600)  # fmt: skip
    assert "DONE" in r.stdout, r.stdout + r.stderr
    new = [ln for ln in r.stdout.splitlines() if ln.startswith("NEW")]
    assert not new, "\n".join(new)


def test_patched_hf_model_compiles_fullgraph():
    import transformers  # pinned in requirements-dev.txt: a missing install fails the test

    from fastattn.integrations import transformers as fa_hf

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    ref = copy.deepcopy(model).double()
    fa_hf.apply(model)
    ids = torch.randint(0, 97, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(input_ids=ids, attention_mask=mask).logits
    want = ref(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert_parity(got[keep], want[keep].detach())


def _ddp_worker(rank, world, port, state, batch, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = Transformer(CFG, kernels="fastattn")
    model.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    shard = batch.chunk(world)[rank]
    for _ in range(3):
        _, loss = ddp(shard[:, :-1], shard[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(out_dir, "ddp.pt"))
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    # Three SGD steps on a global batch of 4 split over 2 ranks == one process on all 4.
    torch.manual_seed(0)
    model = Transformer(CFG, kernels="fastattn")
    state = copy.deepcopy(model.state_dict())
    batch = torch.randint(0, 64, (4, 33))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(2, port, state, batch, str(tmp_path)), nprocs=2, join=True)
    ddp_state = torch.load(tmp_path / "ddp.pt")
    for name, p in model.state_dict().items():
        torch.testing.assert_close(ddp_state[name], p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fastattn.nn.MultiheadAttention(16, 2, batch_first=True),
        lambda: fastattn.nn.LayerNorm(16),
        lambda: Transformer(CFG, kernels="fastattn"),
    ],
)
def test_modules_copy_pickle_and_move(make):
    m = make()
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is type(m)
        for (n, a), (_, b) in zip(m.state_dict().items(), clone.state_dict().items(), strict=True):
            assert torch.equal(a, b), n
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False)) is type(m)
    moved = copy.deepcopy(m).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in moved.parameters())
    moved.to("meta")  # device moves keep the module usable as torch's do
    assert all(p.device.type == "meta" for p in moved.parameters())
