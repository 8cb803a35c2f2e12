"""Train-step mechanics on a tiny loss: accumulation, loss scaling, modes, optimizers, sampling, precision."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from mindflux import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from mindflux.lora import LoraConfig
from mindflux.training import (
    DynamicLossScale,
    FlowMatchingSampler,
    LoRATrainStep,
    create_loss_scaler,
    create_optimizer,
    freeze,
    get_scheduler,
    resolve_weight_dtype,
)
from tests.conftest import FIXTURES


class TinyLoss(nn.Cell):
    """A batch-mean MSE of one Dense layer: gradients of half-batches average to the full batch's."""

    def __init__(self, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.dense = nn.Dense(3, 2)
        self.dense.weight.set_data(ms.Tensor(rng.standard_normal((2, 3)).astype(np.float32)))
        self.dense.bias.set_data(ms.Tensor(rng.standard_normal(2).astype(np.float32)))

    def construct(self, x, y):
        return ops.square(self.dense(x) - y).mean()


def batch(seed: int = 1, n: int = 4):
    rng = np.random.default_rng(seed)
    return ms.Tensor(rng.standard_normal((n, 3)).astype(np.float32)), ms.Tensor(rng.standard_normal((n, 2))
                                                                                .astype(np.float32))


def trainer(accumulation=1, loss_scaler=None, max_grad_norm=1.0, schedule=("constant", 0.1), optimizer="AdamW"):
    net = TinyLoss()
    opt = create_optimizer(optimizer, net.trainable_params(), weight_decay=1e-2)
    lr = get_scheduler(schedule[0], schedule[1], num_warmup_steps=4, num_training_steps=10)
    return net, LoRATrainStep(net, opt, lr, max_grad_norm, accumulation, loss_scaler)


def weights(net):
    return [p.asnumpy().copy() for p in net.trainable_params()]


def test_accumulation_equals_the_full_batch_and_the_schedule_steps_per_update():
    x, y = batch()
    full_net, full = trainer(schedule=("linear", 0.1))
    acc_net, acc = trainer(accumulation=2, schedule=("linear", 0.1))
    outs = []
    for _ in range(3):
        full(x, y)
        outs += [acc(x[:2], y[:2]), acc(x[2:], y[2:])]
    for a, b in zip(weights(full_net), weights(acc_net)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert [o.sync_gradients for o in outs] == [False, True] * 3
    assert [o.lr for o in outs] == [0.0, 0.0, 0.025, 0.025, 0.05, 0.05]  # linear warmup over 4 updates
    assert acc.global_step == full.global_step == 3
    assert outs[1].grad_norm is not None and outs[0].grad_norm is None
    early = acc(x[:2], y[:2], end_of_epoch=True)  # an epoch's last batch completes the update, as accelerate
    assert early.sync_gradients and acc.global_step == 4 and acc.micro_step == 0


def test_loss_scaling_is_exact_and_skips_overflowing_updates():
    x, y = batch()
    plain_net, plain = trainer()
    scaler = DynamicLossScale(init_scale=2.0**16, growth_interval=2)
    scaled_net, scaled = trainer(loss_scaler=scaler)
    for _ in range(2):
        a, b = plain(x, y), scaled(x, y)
        assert a.loss == b.loss
    for p, q in zip(weights(plain_net), weights(scaled_net)):
        np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-7)  # a power-of-two scale cancels
    assert float(scaler.scale.asnumpy()) == 2.0**17  # two finite updates in a row: the scale doubled
    before = weights(scaled_net)
    huge = np.float32(3e38)
    scaler.scale.set_data(ms.Tensor(huge))  # the scaled gradients overflow to inf
    out = scaled(x, y)
    assert not np.isfinite(out.grad_norm)
    for p, q in zip(before, weights(scaled_net)):
        np.testing.assert_array_equal(p, q)  # the update was skipped
    assert scaler.scale.asnumpy() == huge / 2 and int(scaler.growth_tracker.asnumpy()) == 0
    assert int(scaled.optimizer.step.asnumpy()) == 2  # the optimizer did not count the skipped update


@pytest.mark.parametrize("optimizer, scaled", [("AdamW", False), ("prodigy", False), ("AdamW", True)])
def test_graph_and_pynative_give_the_same_numbers(graph_mode, optimizer, scaled):
    """Also compiles the fp16 path: loss scaling and its conditional update inside the graph."""
    x, y = batch()
    scaler = (lambda: DynamicLossScale(growth_interval=2)) if scaled else (lambda: None)
    graph_net, graph = trainer(accumulation=2, optimizer=optimizer, loss_scaler=scaler())
    graph_losses = [graph(x[:2], y[:2]).loss for _ in range(4)]
    ms.set_context(mode=ms.PYNATIVE_MODE)
    py_net, py = trainer(accumulation=2, optimizer=optimizer, loss_scaler=scaler())
    py_losses = [py(x[:2], y[:2]).loss for _ in range(4)]
    np.testing.assert_allclose(graph_losses, py_losses, rtol=1e-6)
    for a, b in zip(weights(graph_net), weights(py_net)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_adamweightdecay_first_step_is_larger_than_adamw():
    """MindSpore's AdamWeightDecay has no bias correction: its first step is (1 - b1) / sqrt(1 - b2) = 3.16x."""
    grads = (ms.Tensor(np.array([0.5, -2.0, 3e-3], np.float32)),)
    moves = {}
    for name in ("AdamW", "AdamWeightDecay"):
        param = ms.Parameter(ms.Tensor(np.zeros(3, np.float32)), name=f"w_{name}")
        opt = create_optimizer(name, [param], weight_decay=0.0)
        opt(grads, ms.Tensor(1e-3, ms.float32))
        moves[name] = np.abs(param.asnumpy())
    np.testing.assert_allclose(moves["AdamW"], 1e-3, rtol=1e-4)  # bias-corrected: lr * g / |g|
    np.testing.assert_allclose(moves["AdamWeightDecay"] / moves["AdamW"], 0.1 / np.sqrt(0.001), rtol=1e-4)


def test_unknown_optimizer_and_schedule_are_named():
    with pytest.raises(ValueError, match="AdamW, AdamWeightDecay"):
        create_optimizer("sgd", TinyLoss().trainable_params())
    with pytest.raises(ValueError, match="lr_scheduler must be one of"):
        get_scheduler("exponential", 1e-4)
    with pytest.raises(ValueError, match="requires `num_training_steps`"):
        get_scheduler("cosine", 1e-4, num_warmup_steps=0)


# ---- sampling ---------------------------------------------------------------------------------------------
def sampler(**kwargs):
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(FIXTURES / "scheduler" / "dev"))
    return FlowMatchingSampler(scheduler, generator=0, **kwargs)


def test_host_sampling_has_the_scheme_statistics():
    draws = sampler(weighting_scheme="logit_normal", logit_mean=0.3, logit_std=1.2).sample((20000, 1, 2, 2))
    logits = np.log((1 - draws.sigmas) / draws.sigmas)  # sigma = 1 - u on the 1/1000 grid
    assert abs(logits.mean() - 0.3) < 0.03 and abs(logits.std() - 1.2) < 0.03
    uniform = sampler().sample((20000, 1, 2, 2))
    assert abs(uniform.sigmas.mean() - 0.5) < 0.01 and uniform.sigmas.min() > 0 and uniform.sigmas.max() <= 1
    assert abs(uniform.noise.std() - 1) < 0.02
    mode = sampler(weighting_scheme="mode").sample((20000, 1, 2, 2))
    assert mode.sigmas.std() < uniform.sigmas.std()  # mode_scale > 0 concentrates sigmas in the middle
    np.testing.assert_array_equal(uniform.timesteps, uniform.sigmas)  # timestep / 1000 on this schedule


def test_dynamic_shift_grows_with_resolution_and_sampler_state_resumes():
    plain = sampler().sample((64, 16, 64, 64)).sigmas
    s = sampler(dynamic_shift=True)
    state = s.state_dict()
    shifted = s.sample((64, 16, 64, 64))
    assert np.all(shifted.sigmas >= plain) and np.mean(shifted.sigmas - plain) > 0.05
    np.testing.assert_allclose(shifted.timesteps, shifted.sigmas, rtol=1e-6)
    s.load_state_dict(state)  # a resumed run draws the same numbers
    again = s.sample((64, 16, 64, 64))
    np.testing.assert_array_equal(again.noise, shifted.noise)
    np.testing.assert_array_equal(again.sigmas, shifted.sigmas)


# ---- precision ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16"])
def test_half_precision_on_cpu_is_a_clear_error(mixed_precision):
    with pytest.raises(ValueError, match="needs a GPU or Ascend device"):
        resolve_weight_dtype(mixed_precision)
    assert resolve_weight_dtype("no") == ms.float32 and resolve_weight_dtype(None) == ms.float32
    assert isinstance(create_loss_scaler("fp16"), DynamicLossScale) and create_loss_scaler("bf16") is None


def test_freeze_casts_frozen_weights_and_keeps_lora_fp32():
    transformer = FluxTransformer2DModel.from_pretrained(str(FIXTURES / "transformer" / "flux_dev"))
    freeze(transformer, dtype=ms.bfloat16)  # casting works on the CPU; only bf16 matmuls do not
    transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    base = [p for n, p in transformer.named_parameters() if ".lora_" not in n]
    assert {p.dtype for p in base} == {ms.bfloat16} and not any(p.requires_grad for p in base)
    assert {p.dtype for p in transformer.lora_parameters()} == {ms.float32}
    assert all(p.requires_grad for p in transformer.lora_parameters())
    layer = dict(transformer.lora_layers())["transformer_blocks.0.attn.to_q"]
    assert layer.lora_A["default"].get_flags()["bf16"] and layer.lora_B["default"].get_flags()["bf16"]  # compute
