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
- "prodigy": the prodigyopt package's Prodigy (v1.1), the learning-rate-free Adam that diffusers'
  script offers, with one parameter group and slice_p=1.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

OPTIMIZERS = ("AdamW", "AdamWeightDecay", "prodigy")

_adamw_update = ops.MultitypeFuncGraph("adamw_update")


@_adamw_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                        "Tensor")
def _adamw_one(beta1, beta2, eps, decay, step_size, bias_correction2_sqrt, param, exp_avg, exp_avg_sq, grad):
    """torch's single-tensor AdamW: decoupled decay, moment updates, bias-corrected step."""
    return _adamw_math(beta1, beta2, eps, decay, step_size, bias_correction2_sqrt, param, exp_avg, exp_avg_sq, grad)


@_adamw_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                        "Tensor", "Tensor", "Tensor")
def _adamw_grouped(beta1, beta2, eps, lr, step_size, bias_correction2_sqrt, lr_scale, weight_decay, param, exp_avg,
                   exp_avg_sq, grad):
    """AdamW for a parameter of its own group: learning rate lr * lr_scale and its own weight decay."""
    group_lr = lr * lr_scale
    return _adamw_math(beta1, beta2, eps, 1 - group_lr * weight_decay, step_size * lr_scale, bias_correction2_sqrt,
                       param, exp_avg, exp_avg_sq, grad)


def _adamw_math(beta1, beta2, eps, decay, step_size, bias_correction2_sqrt, param, exp_avg, exp_avg_sq, grad):
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
    counter. The bias corrections 1 - beta^k are computed in fp32 in the graph. `lr_scales` and
    `weight_decays` (one per parameter) give parameters torch's per-group learning rate
    (the scheduled lr times the scale) and weight decay, as diffusers' text-encoder group.
    """

    def __init__(self, params, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, lr_scales: list[float] | None = None,
                 weight_decays: list[float] | None = None):
        super().__init__()
        self.parameters = ParameterTuple(params)
        self.groups = _group_tensors(len(self.parameters), lr_scales, weight_decays, weight_decay)
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
        if self.groups is not None:
            return self.hyper_map(ops.partial(_adamw_update, self.beta1, self.beta2, self.eps, lr, step_size,
                                              bias_correction2_sqrt), self.groups[0], self.groups[1],
                                  self.parameters, self.exp_avg, self.exp_avg_sq, grads)
        decay = 1 - lr * self.weight_decay
        return self.hyper_map(ops.partial(_adamw_update, self.beta1, self.beta2, self.eps, decay, step_size,
                                          bias_correction2_sqrt), self.parameters, self.exp_avg, self.exp_avg_sq,
                              grads)


def _group_tensors(count: int, lr_scales: list[float] | None, weight_decays: list[float] | None,
                   weight_decay: float) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None:
    """Per-parameter (lr scale, weight decay) tensors, or None when every parameter shares the defaults."""
    if lr_scales is None and weight_decays is None:
        return None
    scales = list(lr_scales) if lr_scales is not None else [1.0] * count
    decays = list(weight_decays) if weight_decays is not None else [weight_decay] * count
    if len(scales) != count or len(decays) != count:
        raise ValueError(f"lr_scales / weight_decays need one value per parameter ({count})")
    return (tuple(Tensor(v, ms.float32) for v in scales), tuple(Tensor(v, ms.float32) for v in decays))


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


_prodigy_moments = ops.MultitypeFuncGraph("prodigy_moments")
_prodigy_step = ops.MultitypeFuncGraph("prodigy_step")


@_prodigy_moments.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                           "Tensor", "Tensor", "Tensor", "Tensor")
def _prodigy_moments_one(beta1, beta2, beta3, d, numerator_scale, s_scale, param, coupled_decay, grad, p0, s, exp_avg,
                         exp_avg_sq):
    """Prodigy's first pass for one tensor: moments and s updated; returns (its d-numerator term, sum |s|)."""
    grad = grad.astype(param.dtype) + coupled_decay * param
    dot = (grad * (p0 - param)).sum()
    new_avg = exp_avg * beta1 + grad * (d * (1 - beta1))
    new_avg_sq = exp_avg_sq * beta2 + grad * grad * (d * d * (1 - beta2))
    new_s = s * beta3 + grad * s_scale
    ops.assign(exp_avg, new_avg)
    ops.assign(exp_avg_sq, new_avg_sq)
    ops.assign(s, new_s)
    return numerator_scale * dot, ops.abs(new_s).sum()


@_prodigy_step.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _prodigy_step_one(dlr, d_eps, apply, decoupled_decay, param, exp_avg, exp_avg_sq):
    denom = ops.sqrt(exp_avg_sq) + d_eps
    new_param = param - decoupled_decay * dlr * param
    new_param = new_param - dlr * exp_avg / denom
    ops.assign(param, ops.select(apply, new_param, param))
    return True


class Prodigy(nn.Cell):
    """prodigyopt.Prodigy's update (one parameter group, beta1 > 0, slice_p=1, no FSDP).

    Prodigy estimates the step size d from the gradients' correlation with the distance
    travelled since the start (p0), and scales Adam's update by d * lr, so `lr` is a multiplier
    around 1.0. Global state: d, d_max, d_numerator and the step k; per tensor: s, p0 and the
    two moments. prodigyopt keeps the global scalars in float64 on the host; here they are
    fp32 tensors in the graph. Two edge cases of prodigyopt are not reproduced: lr == 0 (where
    it fails) leaves d unchanged here, and all-zero gradients at the first step skip the update
    as it does but also leave the moments untouched.
    """

    def __init__(self, params, betas: tuple[float, float] = (0.9, 0.999), beta3: float | None = None,
                 eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = True,
                 use_bias_correction: bool = False, safeguard_warmup: bool = False, d0: float = 1e-6,
                 d_coef: float = 1.0, growth_rate: float = float("inf"), weight_decays: list[float] | None = None):
        super().__init__()
        if betas[0] <= 0:
            raise ValueError("prodigy with beta1 = 0 is not supported")
        self.parameters = ParameterTuple(params)
        # per-parameter weight decay (diffusers' text-encoder group); the step size d is shared, as in prodigyopt
        decays = list(weight_decays) if weight_decays is not None else [weight_decay] * len(self.parameters)
        if len(decays) != len(self.parameters):
            raise ValueError(f"weight_decays needs one value per parameter ({len(self.parameters)})")
        self.p0 = self.parameters.clone(prefix="prodigy_p0", init="same")
        self.s = self.parameters.clone(prefix="prodigy_s", init="zeros")
        self.exp_avg = self.parameters.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self.parameters.clone(prefix="exp_avg_sq", init="zeros")
        f32 = lambda v: Tensor(v, ms.float32)  # noqa: E731
        self.d = Parameter(f32(d0), name="prodigy_d", requires_grad=False)
        self.d_max = Parameter(f32(d0), name="prodigy_d_max", requires_grad=False)
        self.d_numerator = Parameter(f32(0.0), name="prodigy_d_numerator", requires_grad=False)
        self.k = Parameter(Tensor(0, ms.int32), name="prodigy_k", requires_grad=False)
        self.beta1, self.beta2 = f32(betas[0]), f32(betas[1])
        self.beta3 = f32(beta3 if beta3 is not None else betas[1] ** 0.5)
        self.eps, self.d0, self.d_coef = eps, d0, d_coef
        self.growth_rate = f32(growth_rate)
        self.coupled_decay = tuple(f32(wd if not decouple else 0.0) for wd in decays)
        self.decoupled_decay = tuple(f32(wd if decouple else 0.0) for wd in decays)
        self.use_bias_correction = use_bias_correction
        self.safeguard_warmup = safeguard_warmup
        self.hyper_map = ops.HyperMap()

    def construct(self, grads, lr):
        d = self.d
        k1 = (self.k + 1).astype(ms.float32)
        bias_correction = 1.0
        if self.use_bias_correction:
            bias_correction = ops.sqrt(1 - ops.pow(self.beta2, k1)) / (1 - ops.pow(self.beta1, k1))
        dlr = d * lr * bias_correction
        numerator_scale = ops.select(lr > 0, (d / self.d0) * dlr, ops.zeros_like(dlr))
        s_scale = (d / self.d0) * (d if self.safeguard_warmup else dlr)
        terms = self.hyper_map(ops.partial(_prodigy_moments, self.beta1, self.beta2, self.beta3, d, numerator_scale,
                                           s_scale), self.parameters, self.coupled_decay, grads, self.p0, self.s,
                               self.exp_avg, self.exp_avg_sq)
        delta_numerator = ops.addn([t[0] for t in terms])
        d_denom = ops.addn([t[1] for t in terms])
        apply = d_denom > 0
        numerator = self.d_numerator * self.beta3 + delta_numerator
        d_hat = self.d_coef * numerator / ops.select(apply, d_denom, ops.ones_like(d_denom))
        estimate = (lr > 0) & apply
        new_d = ops.select(d == self.d0, ops.maximum(d, d_hat), d)
        new_d_max = ops.maximum(self.d_max, d_hat)
        new_d = ops.minimum(new_d_max, new_d * self.growth_rate)
        new_d = ops.select(estimate, new_d, d)
        ops.assign(self.d_max, ops.select(estimate, new_d_max, self.d_max))
        ops.assign(self.d_numerator, ops.select(apply, numerator, self.d_numerator))
        ops.assign(self.d, new_d)
        self.hyper_map(ops.partial(_prodigy_step, dlr, new_d * self.eps, apply), self.decoupled_decay,
                       self.parameters, self.exp_avg, self.exp_avg_sq)
        ops.assign(self.k, ops.select(apply, self.k + 1, self.k))
        return True


def create_optimizer(name: str, params, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     weight_decay: float = 1e-4, param_groups: list[dict] | None = None, **prodigy_options) -> nn.Cell:
    """An optimizer by its --optimizer name (case-insensitive, as diffusers' script compares it).
    `prodigy_options` (beta3, decouple, use_bias_correction, safeguard_warmup, ...) go to Prodigy.

    `param_groups`: torch-style groups instead of `params`, each {"params": [...], "lr_scale": s,
    "weight_decay": wd}: the group's learning rate is the scheduled one times s (diffusers'
    --text_encoder_lr group). Prodigy shares one learning rate (diffusers sets every group's to
    --learning_rate), so only the weight decays may differ there.
    """
    known = {n.lower(): cls for n, cls in (("AdamW", AdamW), ("AdamWeightDecay", AdamWeightDecay),
                                            ("prodigy", Prodigy))}
    if name.lower() not in known:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")
    group_options = {}
    if param_groups is not None:
        params, scales, decays = [], [], []
        for group in param_groups:
            members = list(group["params"])
            params += members
            scales += [float(group.get("lr_scale", 1.0))] * len(members)
            decays += [float(group.get("weight_decay", weight_decay))] * len(members)
        if name.lower() == "adamweightdecay":
            raise ValueError("parameter groups (--train_text_encoder) need --optimizer AdamW or prodigy")
        if name.lower() == "prodigy":
            if any(s != 1.0 for s in scales):
                raise ValueError("prodigy takes one learning rate for every parameter group")
            group_options = {"weight_decays": decays}
        else:
            group_options = {"lr_scales": scales, "weight_decays": decays}
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters to optimize")
    if name.lower() == "prodigy":
        return Prodigy(params, betas=betas, eps=eps, weight_decay=weight_decay, **prodigy_options, **group_options)
    return known[name.lower()](params, betas=betas, eps=eps, weight_decay=weight_decay, **group_options)
