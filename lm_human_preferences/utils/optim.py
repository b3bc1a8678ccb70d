"""TF1-style Adam (ORIGINAL §13.1): epsilon is added to sqrt(v) without bias correction ("epsilon hat").

    m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
    lr_t = lr sqrt(1 - b2^t) / (1 - b1^t),  theta -= lr_t m / (sqrt(v) + eps)

torch.optim.Adam(eps=1e-5) is not the same: it adds eps after bias-correcting v, i.e. a TF eps of
1e-5 sqrt(1 - b2^t), and so takes much larger early steps.
"""
from collections import defaultdict

import torch

# On CPU the update runs over pieces of at most this many elements: the step's temporaries stay small and each
# piece's params, grads, m and v stay in cache across the update's passes instead of streaming from memory per pass.
CPU_CHUNK = 1 << 18


def _tf_adam_update(ps, gs, ms, vs, *, dtype, lr_t, beta1, beta2, eps):
    """TF's kernel on aligned lists: m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2); var -= lr_t m / (sqrt(v) + eps)."""
    if dtype != torch.float32:
        gs = [g.float() for g in gs]
    torch._foreach_lerp_(ms, gs, 1.0 - beta1)
    torch._foreach_lerp_(vs, torch._foreach_mul(gs, gs), 1.0 - beta2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_add_(denom, eps)
    if dtype == torch.float32:
        torch._foreach_addcdiv_(ps, ms, denom, value=-lr_t)
    else:
        updates = torch._foreach_div(ms, denom)
        torch._foreach_mul_(updates, -lr_t)
        for p, u in zip(ps, updates):
            p.copy_((p.float() + u).to(dtype))


def _pieces(ps, gs, ms, vs, chunk: int):
    """Splits aligned lists of params, grads, m, v into groups of flat views of at most `chunk` elements in all
    (a non-contiguous tensor stays whole). The update is elementwise, so it is the same on the pieces."""
    group, size = ([], [], [], []), 0
    for tensors in zip(ps, gs, ms, vs):
        if not all(t.is_contiguous() for t in tensors):
            yield tuple([t] for t in tensors)
            continue
        flat = [t.view(-1) for t in tensors]
        n = flat[0].numel()
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            for lst, t in zip(group, flat):
                lst.append(t[start:stop])
            size += stop - start
            if size >= chunk:
                yield group
                group, size = ([], [], [], []), 0
    if size:
        yield group


class TFAdam(torch.optim.Optimizer):
    """tf.train.AdamOptimizer: one step counter per optimizer, no weight decay, no clipping.

    Set `param_groups[i]['lr']` before a step to anneal. m and v are kept in float32 whatever the param dtype.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-5):
        if not lr >= 0.0:
            raise ValueError(f"TFAdam lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"TFAdam betas must lie in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"TFAdam eps must be >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))
        self.step_count = 0  # TF's beta1_power/beta2_power: shared by every variable of this optimizer

    @torch.no_grad()
    def step(self, closure=None):
        """Apply one Adam update to every param that has a gradient; the step counter advances once."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_count += 1
        t = self.step_count
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr_t = group["lr"] * (1.0 - beta2 ** t) ** 0.5 / (1.0 - beta1 ** t)
            buckets = defaultdict(lambda: ([], [], [], []))  # (device, dtype) -> params, grads, m, v
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("TFAdam does not support sparse gradients; use a dense embedding gradient")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                ps, gs, ms, vs = buckets[(p.device, p.dtype)]
                ps.append(p)
                gs.append(p.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
            for (device, dtype), tensors in buckets.items():
                pieces = _pieces(*tensors, CPU_CHUNK) if device.type == "cpu" else [tensors]
                for ps, gs, ms, vs in pieces:
                    _tf_adam_update(ps, gs, ms, vs, dtype=dtype, lr_t=lr_t, beta1=beta1, beta2=beta2,
                                    eps=group["eps"])
        return loss

    def state_dict(self):
        """torch's optimizer state dict plus the shared step counter (plain tensors, floats and ints only)."""
        state = super().state_dict()
        state["step_count"] = self.step_count
        return state

    def load_state_dict(self, state_dict):
        """Restore m, v (kept in float32) and the step counter."""
        state_dict = dict(state_dict)
        if "step_count" not in state_dict:
            raise ValueError(f"not a TFAdam state dict (no 'step_count'; keys {sorted(state_dict)})")
        step_count = int(state_dict.pop("step_count"))
        super().load_state_dict(state_dict)
        # torch casts loaded state to each param's dtype; put m and v back in float32 from the saved tensors
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in saved:
                    self.state[p][k] = saved[k].to(device=p.device, dtype=torch.float32, copy=True)
        self.step_count = step_count
