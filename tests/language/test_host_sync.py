"""On an accelerator the model's forward and backward never read a tensor's values on the host (each read would wait
for every queued kernel), and the LM head writes its logits without a transposed copy.

No GPU is needed: the model runs on the CPU through the paths it takes on an accelerator (fused.host_reads_are_free
patched to False) under a dispatch mode that fails on every aten op whose result depends on tensor values on the
host (`item`/`bool`/`int`, nonzero, unique, boolean indexing, masked_select, equal), with `tolist` and `numpy`
patched to fail too. On a real GPU the same Python code runs, except the branches that `fused.linear`,
`linear_nt` and `attention` choose by device type: each CUDA branch is one plain op (the layer itself, F.linear,
scaled_dot_product_attention); the first and last also run in these CPU passes, and linear_nt's is checked on the
meta device below. A synchronisation inside an aten CUDA kernel itself (none is known for the ops used) is out of
reach on a CPU; with CUDA present, the last test runs the pass under torch.cuda.set_sync_debug_mode('error').
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lm_human_preferences.language import fused
from lm_human_preferences.language.model import GPT2, GPT2Config, KVCache
from lm_human_preferences.policy import Policy

aten = torch.ops.aten
PAD = 303
HOST_READS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.nonzero, aten.nonzero_static,
              aten.argwhere, aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive,
              aten.masked_select, aten.equal, aten.allclose}


class HostReadError(AssertionError):
    pass


class FailOnHostReads(TorchDispatchMode):
    """Raises HostReadError at any aten op whose result needs tensor values on the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func is aten.index.Tensor and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if func.overloadpacket in HOST_READS or bool_index:
            raise HostReadError(f"{func} reads tensor values on the host")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def accelerator_paths(monkeypatch):
    """The CPU run takes the accelerator's branches, and every host read fails."""
    fused.onednn_linear()  # its one-off probe (torch.equal on CPU tensors) runs before the check starts
    monkeypatch.setattr(fused, "host_reads_are_free", lambda device: False, raising=False)

    def fail(self, *args, **kwargs):
        raise HostReadError("tolist/numpy read tensor values on the host")

    monkeypatch.setattr(torch.Tensor, "tolist", fail)
    monkeypatch.setattr(torch.Tensor, "numpy", fail)
    return FailOnHostReads


def small_policy(seed=0):
    torch.manual_seed(seed)
    model = GPT2(GPT2Config(n_vocab=301, n_ctx=40, n_embd=48, n_head=4, n_layer=2), ["value"])
    return Policy(model, temperature=0.7, padding_token=PAD, prefix_tokens=[5, 6], suffix_tokens=[7])


def queries_and_responses(seed=1):
    torch.manual_seed(seed)
    queries = torch.randint(0, 30, (4, 10))  # few distinct ids: the embedding gradient sums repeated rows
    queries[0, 6:] = PAD
    return queries, torch.randint(0, 301, (4, 12))  # responses: sampled, so never pads


def scored_tokens():
    """Query + response with pads in both, as the reward model scores them."""
    queries, responses = queries_and_responses()
    responses[2, 8:] = PAD
    return torch.cat([queries, responses], dim=1)


def policy_loss(policy, queries, responses):
    out = policy(queries, responses)
    return out["logprobs"].mean() + 0.1 * out["entropies"].mean() + out["values"].square().mean()


def test_the_check_catches_host_reads(accelerator_paths):
    """Not vacuous: each kind of host read the old code made (and its relatives) is caught."""
    t = torch.tensor([3, 1, 3])
    for read in (lambda: t.max().item(), lambda: bool(t.min() < 0), lambda: t[t != 1], lambda: torch.unique(t),
                 lambda: t.nonzero(), lambda: t.tolist(), lambda: int(t.sum()), lambda: t.masked_select(t > 1)):
        with pytest.raises(HostReadError), accelerator_paths():
            read()


def test_policy_training_pass_reads_nothing_on_the_host(accelerator_paths):
    """Forward (token check, pads, tied LM head, fused logprobs/entropies, value head) and backward (tied
    embedding gradient) of the policy, as PPO's update runs them."""
    policy = small_policy()
    queries, responses = queries_and_responses()
    with accelerator_paths():
        policy_loss(policy, queries, responses).backward()
    assert policy.model.wte.weight.grad.abs().sum() > 0


def test_scoring_and_decoding_passes_read_nothing_on_the_host(accelerator_paths):
    """A reward-model style pass (scalar head only) with its backward, and a KV-cache decode of two steps."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_vocab=301, n_ctx=40, n_embd=48, n_head=4, n_layer=2), ["reward"])
    queries, responses = queries_and_responses()
    with accelerator_paths():
        model(scored_tokens(), padding_token=PAD)["reward"][:, -1].sum().backward()
        cache = KVCache(model.config, 4, 12, "cpu")
        with torch.no_grad():
            model(queries, padding_token=PAD, cache=cache, lm_positions=slice(-1, None))
            model(responses[:, :1], padding_token=PAD, cache=cache, lm_positions="all", check_tokens=False)


def test_the_accelerator_paths_give_the_cpu_paths_gradients(monkeypatch):
    """The tied embedding's row-by-row gradient is the CPU path's within float32 rounding."""
    queries, responses = queries_and_responses()
    grads = []
    for free in (True, False):
        monkeypatch.setattr(fused, "host_reads_are_free", lambda device, free=free: free)
        policy = small_policy()
        policy_loss(policy, queries, responses).backward()
        grads.append({n: p.grad for n, p in policy.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_bad_token_ids_still_fail_on_the_accelerator_path(monkeypatch):
    """The token check becomes an asynchronous assert; on the CPU's implementation of it, it raises at once."""
    monkeypatch.setattr(fused, "host_reads_are_free", lambda device: False)
    model = small_policy().model
    with pytest.raises(RuntimeError, match=r"outside the vocabulary \[0, 301\)"):
        model(torch.tensor([[1, 2, 400]]), padding_token=PAD)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        model(torch.tensor([[1, -1, 2]]), padding_token=PAD)
    model(torch.tensor([[1, 2, PAD]]), padding_token=PAD)  # the pad id is fine


def test_lm_head_off_the_cpu_writes_logits_without_a_transposed_copy():
    """Off the CPU (here the meta device) the head is one product into a contiguous (N, V): no clone, no copy."""
    h, w = torch.empty(96, 48, device="meta"), torch.empty(50257, 48, device="meta")
    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket)
            return func(*args, **(kwargs or {}))

    with Record():
        logits = fused.lm_logits(h.view(2, 48, 48), w)
    assert logits.shape == (2, 48, 50257) and logits.is_contiguous()
    assert not {aten.clone, aten.copy_, aten.contiguous} & set(ops), ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.set_sync_debug_mode)")
def test_no_synchronisation_on_cuda():
    policy = small_policy().cuda()
    queries, responses = (t.cuda() for t in queries_and_responses())
    policy_loss(policy, queries, responses).backward()  # warm-up: cuBLAS handles, caching allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        policy_loss(policy, queries, responses).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
