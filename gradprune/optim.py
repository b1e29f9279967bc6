"""MaskedAdamW: AdamW that keeps pruned weights at zero inside its own update.

Without it, enforcement zeroes the gradients of pruned weights in a pass of their own before each step
(:meth:`gradprune.MaskRegistry.mask_gradients_`). That pass reads and writes every targeted gradient once
more: about 5-7% of a weight-heavy training step on a CPU (``scripts/bench_overhead.py``). MaskedAdamW
folds the mask into the AdamW update of each masked float32 CPU weight instead, with a small C++ kernel
(``csrc/masked_adamw.cpp``) built by torch's extension loader on first use and cached per machine.
Everything else goes through torch's own AdamW on gradients masked the usual way: parameters without a
mask, other devices and dtypes, amsgrad or maximize, and machines where the kernel cannot be built (no
C++ compiler; a warning says so). The result is the same up to float rounding either way.

The masks come from the model's registry: :meth:`MaskRegistry.attach` hands them over. The optimizer
leaves gradients untouched, so code that reads gradients between backward and the step sees those of
pruned weights too unless it masks them first. For gradient clipping by norm use
:meth:`MaskedAdamW.clip_grad_norm_` (PrunableLM does): it leaves pruned entries out of the norm without
a masking pass, and the kernel applies its factor during the step.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import warnings
from pathlib import Path
from typing import Optional

import torch

from .masks import MaskRegistry, zero_pruned_
from .optimizer_state import SECOND_MOMENTS

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "masked_adamw.cpp"


# without errno and trapping semantics gcc may vectorise sqrt and the masked select
_CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]


def _kernel_name() -> str:
    """The extension's build name, keyed by the source, the flags and the torch installation: checkouts with
    the same source and environment share one build, and two that differ never rebuild over each other
    (torch rebuilds a name whose sources or build file changed, the build file names the environment's
    include paths, and a process killed while it builds leaves that name's lock behind, on which every
    later process waits)."""
    environment = f"{torch.__version__} {Path(torch.__file__).resolve().parent}".encode()
    digest = hashlib.sha1(_SOURCE.read_bytes() + " ".join(_CFLAGS).encode() + environment).hexdigest()[:12]
    return f"gradprune_masked_adamw_{digest}"


@functools.cache
def _kernel():
    """The compiled extension, or None (with a warning) where it cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        log.info("loading gradprune's masked AdamW kernel (built on first use, about 30 s)")
        return load(name=_kernel_name(), sources=[str(_SOURCE)], extra_cflags=_CFLAGS,
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, an unsupported platform
        warnings.warn(
            f"gradprune: the masked AdamW kernel could not be built ({type(error).__name__}: {error}); "
            "gradients of pruned weights are masked in a separate pass instead (same result, slower)",
            RuntimeWarning,
        )
        return None


def _plain(group: dict) -> bool:
    """Whether the kernel implements this parameter group's options."""
    return not (group["amsgrad"] or group["maximize"] or group.get("capturable") or group.get("differentiable"))


def _kernel_fits(param: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor) -> bool:
    return (param.is_cpu and mask.is_cpu and param.dtype == torch.float32 and grad.dtype == torch.float32
            and not grad.is_sparse and param.is_contiguous() and grad.is_contiguous())


def _without_step_hooks(step):
    """``step`` without the wrapper that runs the optimizer's step hooks.

    torch wraps each optimizer class's ``step`` in one that runs the registered step pre- and post-hooks
    (``Optimizer._patch_step_function``, once the class has an instance). MaskedAdamW.step is wrapped so
    already; the AdamW step it delegates to must run unwrapped or every hook would fire twice."""
    return inspect.unwrap(step, stop=lambda function: not getattr(function, "hooked", False))


class MaskedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (same arguments, same state layout: checkpoints load either way) whose update
    of each masked weight uses only its kept gradient entries, without a separate masking pass.

    :meth:`clip_grad_norm_` clips by the norm of the live weights' gradients, also without a pass of its
    own over the masked ones: their scaling is folded into the next :meth:`step`."""

    second_moment_keys = SECOND_MOMENTS[torch.optim.AdamW]  # same update: pruned second moments get a floor

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, **options) -> None:
        """Arguments as torch.optim.AdamW's (``options``: maximize, foreach, capturable, differentiable,
        fused); options the kernel does not implement send the masked weights through torch's update."""
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **options)
        self.mask_registry: Optional[MaskRegistry] = None
        self._names: dict[int, str] = {}  # id(weight) -> target name, for the registry version below
        self._names_of: Optional[tuple[int, int]] = None
        # Set by clip_grad_norm_ for the next step (forgotten after it, or at zero_grad if it is skipped):
        self._grad_scale = 1.0  # clipping's factor for the gradients the kernel reads
        self._grads_masked = False  # the gradients the kernel does not read are masked already

    def use_masks_of(self, registry: Optional[MaskRegistry]) -> None:
        """Enforce ``registry``'s masks from now on, or none (called by :meth:`MaskRegistry.attach` and
        :meth:`MaskRegistry.detach`)."""
        self.mask_registry = registry
        self._names_of = None

    def _masked_names(self) -> dict[int, str]:
        registry = self.mask_registry
        if registry is None:
            return {}
        if self._names_of != (id(registry), registry.version):
            self._names = {id(registry.targets[name].weight): name for name in registry.masks}
            self._names_of = (id(registry), registry.version)
        return self._names

    def _masked_gradients(self):
        """(group, param, mask, whether the kernel updates it) for every masked weight with a gradient;
        the gradients the kernel will not read are masked here (unless clip_grad_norm_ did already)."""
        names = self._masked_names()
        for group in self.param_groups:
            for param in group["params"]:
                name = names.get(id(param))
                if name is None or param.grad is None:
                    continue
                mask = self.mask_registry.masks[name]
                if _plain(group) and _kernel_fits(param, param.grad, mask) and _kernel() is not None:
                    yield group, param, mask, True
                else:
                    if not self._grads_masked:
                        zero_pruned_(param.grad, self.mask_registry.mask_of(name))
                    yield group, param, mask, False

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients by min(1, max_norm / (norm + 1e-6)), where norm is the 2-norm of the live
        weights' gradients (pruned entries left out), as ``torch.nn.utils.clip_grad_norm_`` on masked
        gradients does; returns that norm. The gradients of weights the kernel updates are neither masked
        nor scaled here: the next :meth:`step` applies the factor in its update (``zero_grad`` before a
        step forgets it)."""
        kernel = {id(param): (param.grad, mask) for _, param, mask, by_kernel in self._masked_gradients() if by_kernel}
        self._grads_masked = True
        kernel_grads = [grad for grad, _ in kernel.values()]
        kernel_masks = [mask for _, mask in kernel.values()]
        other = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None and id(p) not in kernel]
        # the kernel's gradients count as already scaled by any factor still pending from an earlier call
        squared = _kernel().kept_squared_norm(kernel_grads, kernel_masks) * self._grad_scale**2 if kernel_grads else 0.0
        if other:
            norms = torch._foreach_norm(other)
            device = other[0].device
            total = (torch.stack([n.to(device) for n in norms]).square().sum() + squared).sqrt()
        else:
            total = torch.tensor(squared, dtype=torch.float64).sqrt().float()
        factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
        if other:
            torch._foreach_mul_(other, factor.to(other[0].dtype))
        if kernel_grads:
            self._grad_scale *= float(factor)
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_scale = 1.0
        self._grads_masked = False
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches: dict[int, tuple] = {}  # per parameter group: the weights for the kernel, their grads and masks
        for group, param, mask, by_kernel in self._masked_gradients():
            if by_kernel:
                params, grads, masks = batches.setdefault(id(group), (group, [], [], []))[1:]
                params.append(param)
                grads.append(param.grad)
                masks.append(mask)
                param.grad = None  # hidden from torch's step below
        try:
            _without_step_hooks(torch.optim.AdamW.step)(self)
        finally:
            for _, params, grads, _ in batches.values():
                for param, grad in zip(params, grads):
                    param.grad = grad
        for group, params, grads, masks in batches.values():
            states = [self._state_of(param) for param in params]
            steps = [state["step"] for state in states]
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            _kernel().masked_adamw_(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                                    masks, steps, float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"],
                                    self._grad_scale)
        self._grad_scale, self._grads_masked = 1.0, False  # a clipping factor serves one step
        return loss

    def _state_of(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:  # as torch's AdamW initialises it
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state
