"""Optimizers for the LoRA parameters, as Cells called inside the compiled train step.

Every optimizer here has the call `optimizer(grads, lr) -> True`: `grads` is a tuple in the order
of `optimizer.parameters`, `lr` a float32 scalar Tensor from the host's LR schedule (so a new
learning rate never recompiles). They are written with elementwise ops and reductions only, so
they run on CPU, GPU and Ascend (`mint.optim.AdamW` has no CPU kernel).

- "AdamW": torch.optim.AdamW's update, bias correction included, so learning rates from
  diffusers recipes carry over.
- "AdamWeightDecay": MindSpore's nn.AdamWeightDecay, which has no bias correction: its first
  update is about 1 / sqrt(1 - beta2) * (1 - beta1) = 3.16 times larger than AdamW's with the
  default betas. Kept for users of MindSpore recipes; not diffusers' numbers.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

OPTIMIZERS = ("AdamW", "AdamWeightDecay")

_adamw_update = ops.MultitypeFuncGraph("adamw_update")


@_adamw_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                        "Tensor")
def _adamw_one(beta1, beta2, eps, decay, step_size, bias_correction2_sqrt, param, exp_avg, exp_avg_sq, grad):
    """torch's single-tensor AdamW: decoupled decay, moment updates, bias-corrected step."""
    grad = grad.astype(param.dtype)
    new_param = param * decay
    new_avg = exp_avg + (grad - exp_avg) * (1 - beta1)  # torch's lerp_(grad, 1 - beta1)
    new_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    denom = ops.sqrt(new_avg_sq) / bias_correction2_sqrt + eps
    new_param = new_param - step_size * new_avg / denom
    ops.assign(exp_avg, new_avg)
    ops.assign(exp_avg_sq, new_avg_sq)
    ops.assign(param, new_param)
    return True


class AdamW(nn.Cell):
    """torch.optim.AdamW (amsgrad=False, maximize=False), one parameter group.

    State per parameter: exp_avg and exp_avg_sq (fp32, like the LoRA parameters), plus one step
    counter. The bias corrections 1 - beta^k are computed in fp32 in the graph.
    """

    def __init__(self, params, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__()
        self.parameters = ParameterTuple(params)
        self.exp_avg = self.parameters.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self.parameters.clone(prefix="exp_avg_sq", init="zeros")
        self.step = Parameter(Tensor(0, ms.int32), name="adamw_step", requires_grad=False)
        self.beta1 = Tensor(betas[0], ms.float32)
        self.beta2 = Tensor(betas[1], ms.float32)
        self.eps = Tensor(eps, ms.float32)
        self.weight_decay = float(weight_decay)
        self.hyper_map = ops.HyperMap()

    def construct(self, grads, lr):
        step = self.step + 1
        ops.assign(self.step, step)
        k = step.astype(ms.float32)
        bias_correction1 = 1 - ops.pow(self.beta1, k)
        bias_correction2_sqrt = ops.sqrt(1 - ops.pow(self.beta2, k))
        step_size = lr / bias_correction1
        decay = 1 - lr * self.weight_decay
        return self.hyper_map(ops.partial(_adamw_update, self.beta1, self.beta2, self.eps, decay, step_size,
                                          bias_correction2_sqrt), self.parameters, self.exp_avg, self.exp_avg_sq,
                              grads)


class AdamWeightDecay(nn.Cell):
    """MindSpore's nn.AdamWeightDecay behind the (grads, lr) call: no bias correction (see the module doc)."""

    def __init__(self, params, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__()
        self.optimizer = nn.AdamWeightDecay(list(params), learning_rate=1e-3, beta1=betas[0], beta2=betas[1],
                                            eps=eps, weight_decay=weight_decay)
        self.parameters = self.optimizer.parameters

    def construct(self, grads, lr):
        ops.assign(self.optimizer.learning_rate, lr)
        return self.optimizer(grads)


def create_optimizer(name: str, params, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     weight_decay: float = 1e-4) -> nn.Cell:
    """An optimizer by its --optimizer name (case-insensitive, as diffusers' script compares it)."""
    known = {n.lower(): cls for n, cls in (("AdamW", AdamW), ("AdamWeightDecay", AdamWeightDecay))}
    if name.lower() not in known:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters to optimize")
    return known[name.lower()](params, betas=betas, eps=eps, weight_decay=weight_decay)
