"""The LoRA train step: forward, flow-matching loss, gradients, clipping and the optimizer in one Cell.

    loss_net = FluxFlowMatchingLoss(transformer, weighting_scheme="none")
    optimizer = create_optimizer("AdamW", transformer.lora_parameters(), weight_decay=1e-4)
    step = LoRATrainStep(loss_net, optimizer, lr_scheduler, max_grad_norm=1.0)
    out = step(model_input, noise, sigmas, timesteps, prompt_embeds, pooled_prompt_embeds, img_ids, txt_ids,
               guidance)            # guidance only for transformers with guidance_embeds (FLUX.1-dev)

In graph mode `UpdateStep` compiles once (per input shape) into one graph: transformer forward,
loss, backward for the LoRA parameters only, fp16 unscaling and the finite check, clip by global
norm, optimizer. With gradient accumulation a second Cell, `AccumulateStep`, runs the other
micro-batches (forward, backward, add into fp32 accumulators); the update step adds the
accumulated gradients to its own. Random inputs (noise, sigmas) come from the host, so the step
itself is deterministic and the same in graph and PyNative mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import ParameterTuple, Tensor, nn, ops

from ..latents import pack_latents
from .flow_matching import compute_loss_weighting_for_sd3, flow_matching_loss
from .lr_schedules import LRScheduler
from .precision import DynamicLossScale

_TORCH_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6)


class FluxFlowMatchingLoss(nn.Cell):
    """Latents, noise and sigmas -> diffusers' DreamBooth flow-matching loss for a FluxTransformer2DModel.

    model_input: normalized VAE latents (B, C, h, w) in the weight dtype; noise like it; sigmas and
    timesteps (B,) float32 from FlowMatchingSampler; text conditioning as FluxPipeline.encode_prompt
    returns it; img_ids / txt_ids (seq, 3). Noisy input and target are computed in the weight dtype
    (as diffusers does), the loss in fp32. Packing into 2x2 patches is a permutation of the
    elements, so the per-sample mean is taken on the packed prediction and target directly.
    Kontext: `cond_model_input` (B, C, h, w), the reference image's normalized latents, and img_ids
    for the target's tokens then the reference's (first axis 1).
    """

    def __init__(self, transformer: nn.Cell, weighting_scheme: str = "none", with_prior_preservation: bool = False,
                 prior_loss_weight: float = 1.0):
        super().__init__()
        self.transformer = transformer
        self.weighting_scheme = weighting_scheme
        self.with_prior_preservation = with_prior_preservation
        self.prior_loss_weight = prior_loss_weight

    def construct(self, model_input, noise, sigmas, timesteps, encoder_hidden_states, pooled_projections, img_ids,
                  txt_ids, guidance=None, cond_model_input=None):
        dtype = model_input.dtype
        sigmas = sigmas.astype(dtype)
        s = sigmas.reshape(-1, 1, 1, 1)
        noise = noise.astype(dtype)
        noisy_model_input = (1.0 - s) * model_input + s * noise
        hidden_states = pack_latents(noisy_model_input)
        if cond_model_input is not None:
            # Kontext: the reference image's clean tokens follow the noisy target's (img_ids cover both); the
            # loss covers the target tokens only
            hidden_states = ops.concat((hidden_states, pack_latents(cond_model_input)), axis=1)
        model_pred = self.transformer(hidden_states, encoder_hidden_states, pooled_projections, timesteps, img_ids,
                                      txt_ids, guidance, return_dict=False)[0]
        target = pack_latents(noise - model_input)
        if cond_model_input is not None:
            model_pred = model_pred[:, : target.shape[1]]
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)
        return flow_matching_loss(model_pred, target, weighting, self.with_prior_preservation, self.prior_loss_weight)


class FluxTextEncoderLoss(nn.Cell):
    """The flow-matching loss with CLIP inside the graph (--train_text_encoder): the pooled projection
    comes from CLIP token ids (B, 77), so gradients reach CLIP's LoRA layers. T5 stays frozen, so its
    embeddings are inputs, as with FluxFlowMatchingLoss."""

    def __init__(self, loss_net: FluxFlowMatchingLoss, text_encoder: nn.Cell):
        super().__init__()
        self.loss_net = loss_net
        self.text_encoder = text_encoder

    def construct(self, model_input, noise, sigmas, timesteps, encoder_hidden_states, clip_input_ids, img_ids,
                  txt_ids, guidance=None):
        pooled = self.text_encoder(clip_input_ids, return_dict=False)[1]
        return self.loss_net(model_input, noise, sigmas, timesteps, encoder_hidden_states,
                             pooled.astype(model_input.dtype), img_ids, txt_ids, guidance)


class _ScaledLoss(nn.Cell):
    """(loss * sens, loss): the backward pass starts from the scaled loss, the plain one is reported."""

    def __init__(self, loss_net: nn.Cell):
        super().__init__()
        self.loss_net = loss_net

    def construct(self, sens, *inputs):
        loss = self.loss_net(*inputs)
        return loss * sens, ops.stop_gradient(loss)


def global_norm(grads) -> Tensor:
    """sqrt(sum of squares) over every gradient, in fp32 (torch's 2-norm of the per-tensor norms)."""
    squares = [ops.square(g.astype(ms.float32)).sum() for g in grads]
    return ops.sqrt(ops.addn(squares))


def clip_grad_norm(grads, max_norm: float | None):
    """(grads scaled by min(1, max_norm / (norm + 1e-6)), norm), as torch.nn.utils.clip_grad_norm_;
    `max_norm` None leaves them as they are."""
    norm = global_norm(grads)
    if max_norm is None:
        return grads, norm
    coef = ops.clamp(max_norm / (norm + _TORCH_CLIP_EPS), max=1.0)
    return tuple(g * coef.astype(g.dtype) for g in grads), norm


class FlatGradReducer(nn.Cell):
    """Data parallelism: the mean over the processes of a loss and every gradient, in ONE AllReduce.

    The gradients (684 LoRA tensors for diffusers' default targets) are cast to fp32, flattened into
    one buffer with the loss at its end, summed across the processes once and split back. One large
    collective instead of one per tensor: per-call latency dominates small AllReduces on HCCL/NCCL,
    and fusion attributes are honoured only by some backends and jit levels, a single buffer by all.
    The buffer holds every LoRA gradient once more in fp32 (180 MB at rank 16 on FLUX.1-dev).
    """

    def __init__(self, parameters, world_size: int, all_reduce=None):
        super().__init__()
        self.shapes = tuple(tuple(p.shape) for p in parameters)
        self.sizes = tuple(int(np.prod(s)) for s in self.shapes) + (1,)
        self.world_size = world_size
        # `all_reduce` replaceable so that the packing can be tested in one process
        self.all_reduce = all_reduce if all_reduce is not None else ops.AllReduce()

    def construct(self, loss, grads):
        flat = ops.cat([g.astype(ms.float32).reshape(-1) for g in grads] + [loss.astype(ms.float32).reshape(1)])
        flat = self.all_reduce(flat) / self.world_size
        parts = ops.split(flat, self.sizes)
        out = tuple(parts[i].reshape(self.shapes[i]).astype(grads[i].dtype) for i in range(len(self.shapes)))
        return parts[-1].reshape(()).astype(loss.dtype), out


class _StepBase(nn.Cell):
    def __init__(self, loss_net: nn.Cell, weights: ParameterTuple, accumulators: ParameterTuple | None,
                 gradient_accumulation_steps: int, loss_scaler: DynamicLossScale | None, world_size: int = 1):
        super().__init__()
        self.scaled_loss = _ScaledLoss(loss_net)
        self.weights = weights
        self.accumulators = accumulators
        self.accumulation_steps = gradient_accumulation_steps
        self.loss_scaler = loss_scaler
        self.grad_fn = ops.value_and_grad(self.scaled_loss, None, self.weights, has_aux=True)
        self.hyper_map = ops.HyperMap()
        self.world_size = world_size
        self.all_reduce = ops.AllReduce() if world_size > 1 else None

    def forward_backward(self, inputs):
        """loss, grads of loss * loss_scale / accumulation_steps (what torch's backward leaves in .grad),
        both for this process alone (see average_loss and UpdateStep for the mean over processes)."""
        sens = ops.ones((), ms.float32) / self.accumulation_steps
        if self.loss_scaler is not None:
            sens = sens * self.loss_scaler.scale
        (_, loss), grads = self.grad_fn(sens, *inputs)
        return loss, grads

    def average_loss(self, loss):
        """Under data parallelism the reported loss is the mean over the processes."""
        if self.all_reduce is None:
            return loss
        return (self.all_reduce(loss.reshape(1)) / self.world_size).reshape(())  # 0-d AllReduce is not portable


class AccumulateStep(_StepBase):
    """A micro-batch that does not update: forward, backward, gradients added into the accumulators."""

    def construct(self, *inputs):
        loss, grads = self.forward_backward(inputs)
        self.hyper_map(ops.partial(ops.assign_add), self.accumulators, grads)
        return self.average_loss(loss)


class UpdateStep(_StepBase):
    """The micro-batch that completes an update: forward, backward, (+ accumulated), unscale, clip, optimizer."""

    def __init__(self, loss_net, weights, accumulators, gradient_accumulation_steps, loss_scaler, optimizer,
                 max_grad_norm: float | None, world_size: int = 1):
        super().__init__(loss_net, weights, accumulators, gradient_accumulation_steps, loss_scaler, world_size)
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm if max_grad_norm is not None and max_grad_norm > 0 else None
        self.reducer = FlatGradReducer(weights, world_size, self.all_reduce) if world_size > 1 else None

    def construct(self, lr, *inputs):
        loss, grads = self.forward_backward(inputs)
        if self.accumulators is not None:
            grads = self.hyper_map(ops.add, grads, self.accumulators)
            self.hyper_map(ops.assign, self.accumulators, self.hyper_map(ops.zeros_like, self.accumulators))
        if self.reducer is not None:
            # Once per update, after accumulation: the sum is linear, so this equals averaging every
            # micro-batch with 1/N the traffic. Each process's loss is the mean over its equal share of
            # the global batch, so the mean gradient is the global batch's, as one process computes it.
            loss, grads = self.reducer(loss, grads)
        if self.loss_scaler is not None:
            inverse = 1.0 / self.loss_scaler.scale
            grads = self.hyper_map(ops.partial(ops.mul, inverse), grads)
        grads, norm = clip_grad_norm(grads, self.max_grad_norm)
        if self.loss_scaler is None:
            loss = ops.depend(loss, self.optimizer(grads, lr))
            return loss, norm
        finite = ops.isfinite(norm)
        if finite:
            loss = ops.depend(loss, self.optimizer(grads, lr))
        loss = ops.depend(loss, self.loss_scaler(finite))
        return loss, norm


@dataclass
class StepOutput:
    loss: float              # this micro-batch's loss (what diffusers logs)
    lr: float                # the learning rate of the update this micro-batch belongs to
    sync_gradients: bool     # True when this call updated the weights (accelerate's name)
    grad_norm: float | None  # the global gradient norm before clipping, on update calls


class LoRATrainStep:
    """Host driver: feeds the LR schedule, counts micro-batches, and calls the compiled Cells.

    `gradient_accumulation_steps` micro-batches make one update, as with accelerate: each adds
    grad(loss) / accumulation_steps, the last one clips and steps the optimizer, and the LR
    schedule advances once per update. `global_step` counts updates.
    """

    def __init__(self, loss_net: nn.Cell, optimizer: nn.Cell, lr_scheduler: LRScheduler,
                 max_grad_norm: float | None = 1.0, gradient_accumulation_steps: int = 1,
                 loss_scaler: DynamicLossScale | None = None, world_size: int = 1):
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1; got {gradient_accumulation_steps}")
        weights = optimizer.parameters
        accumulators = None
        if gradient_accumulation_steps > 1:
            accumulators = weights.clone(prefix="grad_accum", init="zeros")
        self.update_step = UpdateStep(loss_net, weights, accumulators, gradient_accumulation_steps, loss_scaler,
                                      optimizer, max_grad_norm, world_size)
        self.accumulate_step = (AccumulateStep(loss_net, weights, accumulators, gradient_accumulation_steps,
                                               loss_scaler, world_size) if accumulators is not None else None)
        for cell in (self.update_step, self.accumulate_step):
            if cell is not None:
                cell.set_train(True)
        self.optimizer = optimizer
        self.loss_scaler = loss_scaler
        self.lr_scheduler = lr_scheduler
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.micro_step = 0
        self.global_step = 0

    def __call__(self, *inputs: Tensor, end_of_epoch: bool = False) -> StepOutput:
        """One micro-batch. `end_of_epoch` completes the update early on an epoch's last batch, as
        accelerate does when the dataloader ends (each micro-batch still counts 1/accumulation_steps)."""
        lr = self.lr_scheduler.get_lr()
        self.micro_step += 1
        if self.micro_step < self.gradient_accumulation_steps and not end_of_epoch:
            loss = self.accumulate_step(*inputs)
            return StepOutput(float(loss.asnumpy()), lr, False, None)
        self.micro_step = 0
        loss, norm = self.update_step(Tensor(lr, ms.float32), *inputs)
        self.lr_scheduler.step()
        self.global_step += 1
        return StepOutput(float(loss.asnumpy()), lr, True, float(norm.asnumpy()))
