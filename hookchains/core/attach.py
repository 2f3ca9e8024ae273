"""``attach(model)``: put NeuroChains' learnable quantities on any model with hooks only.

The model's classes, code and weights are never modified: forward hooks multiply filter outputs by
their scores ``S`` (Eq. 3) and mix gated layers as ``G * F(H) + (1 - G) * H`` with
``G = sigmoid(alpha / T)`` (Eq. 6-7). ``detach()`` (or leaving the ``with`` block) removes every hook,
after which the model's state_dict and outputs are exactly what they were.

The hooks apply the scores in one of these maskings (:data:`MASKINGS`; called "modes" before 0.3):

* ``"soft"``  -- the relaxed network of Eq. 8 (``S`` as is, ``G`` in (0, 1));
* ``"hard"``  -- the thresholded network of section 3.2 (``S * [S >= tau]``, ``G`` rounded to 0/1);
* ``"ste"``   -- hard values forward, soft gradients backward (straight-through), so training sees
  exactly the network that will be extracted;
* ``"mask"``  -- the binary sub-network of Eq. 1 (``[S >= tau]``, ``G`` rounded): kept filters at scale 1;
* ``"off"``   -- hooks pass everything through (the original model);
* ``"recipe"`` -- filter multipliers from ``recipe_values(name)`` (set by a fit recipe, e.g. ``z * m``
  of :class:`hookchains.core.recipes.Mask`), gates as in ``"ste"``.
"""
from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from hookchains.adapters import default_example, discover
from hookchains.core.deprecation import renamed_keyword
from hookchains.core.folding import folded_affine, norm_folds
from hookchains.core.guard import verify
from hookchains.core.sites import FilterSite, GateSite, SiteMap
from hookchains.inputs.forward import call

__all__ = ["ScoreHooks", "HookOwner", "attach", "strip_hooks", "MASKINGS", "MODES"]

MASKINGS = ("soft", "hard", "ste", "mask", "off", "recipe")
MODES = MASKINGS  # the name before 0.3


def _broadcast_shape(ndim: int, channel_dim: Optional[int]) -> List[int]:
    """Shape that makes per-channel values (``channel_dim``) or one gate value broadcast over ``ndim`` dims."""
    shape = [1] * ndim
    if channel_dim is not None:
        shape[channel_dim] = -1
    return shape


class HookOwner:
    """What every set of hookchains hooks shares: ``detach()`` removes them all (also on leaving a
    ``with`` block) and ``attached`` says whether they are still on the model. Subclasses fill
    ``self._handles`` and may override :meth:`_forget` to drop per-call state."""

    model: nn.Module
    _handles: List[torch.utils.hooks.RemovableHandle]

    def _forget(self) -> None:
        """Drop state kept between hook calls (nothing by default)."""

    def detach(self) -> nn.Module:
        """Remove every hook; the model is exactly as before it was attached. Returns the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._forget()
        return self.model

    @property
    def attached(self) -> bool:
        """Whether the hooks are still on the model."""
        return bool(self._handles)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


class ScoreHooks(HookOwner):
    """Hooks plus the learnable tensors of one model (filter scores, gate logits). (Named ``Chains``
    before 0.2; a chain is a path through the sub-network, see :mod:`hookchains.analysis.chains`.)

    Create it with :func:`attach`. Attributes ``scores`` and ``gate_logits`` map site names to
    ``nn.Parameter`` s on the model's device.

    With ``tasks=T`` the hooks hold ``T`` independent sets of scores and gates (``scores[name]`` is
    ``T x channels``, ``gate_logits[name]`` has ``T`` entries) and a batch must be the ``T`` tasks'
    images concatenated, the same number per task: image ``i`` is scaled by the scores of task
    ``i // (batch / T)``. One forward pass then fits several tasks (:func:`hookchains.core.fit.fit_tasks`),
    each exactly as if it ran alone with ``fold_norms = False`` (:meth:`forward`; a single task's fit folds its
    scores into the norms, equal up to float rounding), which keeps a GPU busy.

    Example:
        >>> import hookchains, timm, torch
        >>> model, images = timm.create_model("test_resnet", num_classes=2).eval(), torch.randn(4, 3, 32, 32)
        >>> with hookchains.attach(model) as hooks:
        ...     result = hookchains.fit(hooks, images, steps=2, progress=False)
        >>> small, report = hookchains.materialize(result, model, images)
    """

    def __init__(self, model: nn.Module, sites: SiteMap, *, tau: float = 0.1, temperature: float = 0.2,
                 score_max: Optional[float] = 1.0, tasks: Optional[int] = None) -> None:
        if tau < 0 or temperature <= 0:
            raise ValueError(f"need tau >= 0 and temperature > 0, got tau={tau}, temperature={temperature}")
        if tasks is not None and tasks < 1:
            raise ValueError(f"tasks must be at least 1 (or None for one task), got {tasks}")
        self.model, self.sites, self.tasks = model, sites, tasks
        self.tau, self.temperature, self.score_max = tau, temperature, score_max
        self.masking = "soft"
        device = next(model.parameters()).device
        lead = () if tasks is None else (tasks,)
        self.scores: Dict[str, nn.Parameter] = {
            s.name: nn.Parameter(torch.ones(*lead, s.channels, device=device)) for s in sites.filters}
        self.gate_logits: Dict[str, nn.Parameter] = {
            g.name: nn.Parameter(torch.zeros(lead, device=device)) for g in sites.gates}
        self._span_inputs: Dict[str, List[torch.Tensor]] = {}
        # masking "recipe": site name -> multipliers, installed by a fit recipe (hookchains.core.recipes)
        self.recipe_values: Optional[Callable[[str], torch.Tensor]] = None
        self.means: Dict[str, torch.Tensor] = {}  # mean ablation (hookchains.core.ablation); empty: zero ablation
        self.fold_norms = True  # forward(): multipliers enter the norms' affine parameters (hookchains.core.folding)
        self._norm_folds = norm_folds(model, sites.filters)
        self._folding: Dict[str, str] = {}  # the folds forward() applies in its current call
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._register()

    # ------------------------------------------------------------------ values per masking
    @renamed_keyword(mode="masking")
    def filter_values(self, name: str, masking: Optional[str] = None) -> torch.Tensor:
        """Multipliers of filter site ``name`` under ``masking`` (default: the current masking)."""
        s, masking = self.scores[name], masking or self.masking
        if masking == "recipe":
            if self.recipe_values is None:
                raise RuntimeError("masking 'recipe' applies the values a fit recipe installs (hookchains.core.recipes.Mask); "
                                   "none is installed: use masking 'hard' or 'soft'")
            return self.recipe_values(name)
        if masking == "soft":
            return s
        keep = (s >= self.tau).to(s.dtype)
        if masking == "mask":
            return keep
        hard = s * keep
        return hard if masking == "hard" else s + (hard - s).detach()

    @renamed_keyword(mode="masking")
    def gate_values(self, name: str, masking: Optional[str] = None) -> torch.Tensor:
        """Gate ``G`` of gate site ``name`` under ``masking`` (Eq. 6; rounded in hard maskings)."""
        g, masking = torch.sigmoid(self.gate_logits[name] / self.temperature), masking or self.masking
        if masking == "soft":
            return g
        hard = (g >= 0.5).to(g.dtype)
        return g + (hard - g).detach() if masking in ("ste", "recipe") else hard

    # ------------------------------------------------------------------ hooks
    def _register(self) -> None:
        get = self.model.get_submodule

        def add(handle_of, hook) -> None:
            hook.hookchains = True  # lets strip_hooks() clean a deep copy of a hooked model
            self._handles.append(handle_of(hook))

        for site in self.sites.filters:
            if site.on_input:  # an attention head: its context vector, entering the output projection
                add(get(site.hook_module).register_forward_pre_hook, self._input_hook(site))
            else:
                add(get(site.hook_module).register_forward_hook, self._filter_hook(site))
        for gate in self.sites.gates:  # a block is a span whose first and last module are the same
            add(get(gate.first).register_forward_pre_hook, self._span_start_hook(gate))
            add(get(gate.last).register_forward_hook, self._span_end_hook(gate))

    def _scaled(self, x: torch.Tensor, values: torch.Tensor, channel_dim: Optional[int] = None,
                width: int = 1) -> torch.Tensor:
        """``x`` times per-channel ``values`` (``channel_dim``; each value covering ``width`` consecutive
        channels) or a gate value; with ``tasks``, each task's block of the batch times that task's values."""
        shape = _broadcast_shape(x.ndim, channel_dim)
        values = values.repeat_interleave(width, dim=-1) if width > 1 else values
        if self.tasks is None:
            return x * values.reshape(shape).to(x.dtype)
        if x.shape[0] % self.tasks:
            raise ValueError(f"a batch of {x.shape[0]} cannot be split into {self.tasks} tasks of equal size: "
                             "concatenate the tasks' images, the same number per task")
        grouped = x.reshape(self.tasks, x.shape[0] // self.tasks, *x.shape[1:])
        return (grouped * values.reshape(self.tasks, *shape).to(x.dtype)).reshape(x.shape)

    def _filter_hook(self, site: FilterSite):
        def hook(module, args, out):
            if self.masking == "off" or site.name in self._folding:
                return None
            scaled = self._scaled(out, self.filter_values(site.name), site.channel_dim, site.width)
            return scaled if site.name not in self.means else scaled + self._ablated(out, site)
        return hook

    def _input_hook(self, site: FilterSite):
        def hook(module, args):
            if self.masking == "off":
                return None
            return (self._scaled(args[0], self.filter_values(site.name), site.channel_dim, site.width), *args[1:])
        return hook

    def _ablated(self, out: torch.Tensor, site: FilterSite) -> torch.Tensor:
        """Mean ablation's term ``(1 - k) * mean`` (k: the kept indicator in the current masking)."""
        s = self.scores[site.name]
        keep = s if self.masking == "soft" else (s >= self.tau).to(s.dtype)
        keep = s + (keep - s).detach() if self.masking == "ste" else keep
        mean = self.means[site.name].to(out.device, out.dtype)
        return self._scaled(torch.ones_like(out), 1 - keep, site.channel_dim) * mean.reshape(
            [-1 if d == site.channel_dim % out.ndim else 1 for d in range(out.ndim)])

    def _mix(self, gate: GateSite, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        g = self.gate_values(gate.name)
        return self._scaled(out, g) + self._scaled(h, 1 - g)

    def _span_start_hook(self, gate: GateSite):
        def hook(module, args):
            if self.masking != "off":
                # clone: H as it was before the layer/block ran; an in-place op inside it (an in-place
                # activation at the top of a block, ``out += x``) must not alter H
                self._span_inputs.setdefault(gate.name, []).append(args[0].clone())
        return hook

    def _span_end_hook(self, gate: GateSite):
        def hook(module, args, out):
            if self.masking == "off":
                return None
            return self._mix(gate, self._span_inputs[gate.name].pop(), out)
        return hook

    # ------------------------------------------------------------------ public API
    def forward(self, inputs):
        """The hooked model on ``inputs`` (a tensor, or a tuple/dict: :func:`hookchains.inputs.forward.call`)
        in the current masking, the sites scored after a norm layer folded into that norm.

        Folding (:mod:`hookchains.core.folding`) computes the same network as the hooks' multiplications,
        up to float rounding, in less time; the fit runs through it. It applies while ``fold_norms`` is
        true (the default), with one task, to sites without mean ablation; the others are multiplied
        by their hooks as in ``model(inputs)``.

        Example:
            >>> import hookchains, timm, torch
            >>> model, x = timm.create_model("test_resnet", num_classes=2).eval(), torch.randn(2, 3, 32, 32)
            >>> with hookchains.attach(model, example=x) as hooks, hooks.using("hard"), torch.no_grad():
            ...     _ = [s.uniform_() for s in hooks.scores.values()]
            ...     folded, hooked = hooks.forward(x), model(x)
            >>> torch.allclose(folded, hooked, atol=1e-5)
            True
        """
        plain = self.masking == "off" or self.tasks is not None or not self.fold_norms or torch.jit.is_tracing()
        folds = {} if plain else {
            name: path for name, path in self._norm_folds.items() if name not in self.means}
        if not folds:
            return call(self.model, inputs)
        affine = folded_affine(self.model, folds, self.filter_values)
        self._folding = folds
        try:
            return call(lambda *args, **kwargs: torch.func.functional_call(self.model, affine, args, kwargs), inputs)
        finally:
            self._folding = {}

    def parameters(self) -> Iterator[nn.Parameter]:
        """All learnable tensors (scores, then gate logits)."""
        yield from self.scores.values()
        yield from self.gate_logits.values()

    @renamed_keyword(mode="masking")
    @contextmanager
    def using(self, masking: str) -> Iterator[ScoreHooks]:
        """Temporarily apply the scores in ``masking`` (one of :data:`MASKINGS`; keyword ``mode`` before 0.3)."""
        if masking not in MASKINGS:
            raise ValueError(f"unknown masking {masking!r}; choose one of {MASKINGS}")
        previous, self.masking = self.masking, masking
        try:
            yield self
        finally:
            self.masking = previous
            self._span_inputs.clear()

    def clamp_(self, gate_bound: Optional[float] = None) -> None:
        """Project scores onto ``[0, score_max]`` (``score_max=None``: only ``>= 0``) and, when
        ``gate_bound`` is given, gate logits onto ``[-gate_bound, gate_bound]``."""
        with torch.no_grad():
            for s in self.scores.values():
                s.clamp_(min=0.0, max=self.score_max)
            if gate_bound is not None:
                for a in self.gate_logits.values():
                    a.clamp_(-gate_bound, gate_bound)

    def fit(self, images: torch.Tensor, config=None, **options):
        """Deprecated since 0.2 (it made this module import the fit above it): ``hookchains.fit(hooks, images)``."""
        warnings.warn("ScoreHooks.fit(images) is deprecated; call hookchains.fit(hooks, images)", DeprecationWarning,
                      stacklevel=2)
        import hookchains  # the public facade, at call time: core.attach does not depend on core.fit
        return hookchains.fit(self, images, config, **options)

    @property
    def task_count(self) -> int:
        """How many tasks the hooks hold (1 unless created with ``tasks=``)."""
        return self.tasks or 1

    def per_task(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (a score vector, a gate value, or such a tensor per task) with a leading task axis."""
        return values if self.tasks else values.unsqueeze(0)

    def task_state(self, task: int = 0):
        """Detached CPU copies ``(scores, gate_logits)`` of one task, shaped as for a single task."""
        with torch.no_grad():
            return ({k: self.per_task(v)[task].detach().cpu().clone() for k, v in self.scores.items()},
                    {k: self.per_task(v)[task].detach().cpu().clone() for k, v in self.gate_logits.items()})

    def load_state(self, scores: Dict[str, torch.Tensor], gate_logits: Dict[str, torch.Tensor],
                   task: int = 0) -> None:
        """Copy scores and gate logits (e.g. a saved :class:`~hookchains.Subnetwork`'s) into the
        hooks (into ``task`` when the hooks hold several)."""
        with torch.no_grad():
            for name, p in self.scores.items():
                self.per_task(p)[task].copy_(scores[name])
            for name, p in self.gate_logits.items():
                self.per_task(p)[task].copy_(gate_logits[name])

    def kept_counts(self, task: int = 0) -> Dict[str, int]:
        """Filters with ``S >= tau`` outside removed blocks, and open gates, right now (what the
        progress bar shows; the same rule as :meth:`Subnetwork.counts`), of one task."""
        with torch.no_grad():
            closed = {g.name for g in self.sites.gates if self.per_task(self.gate_logits[g.name])[task] < 0}
            hidden = {f for g in self.sites.gates if g.name in closed for f in g.filter_sites}
            kept = {n: int((self.per_task(s)[task] >= self.tau).sum())
                    for n, s in self.scores.items() if n not in hidden}
        return {"filters": sum(kept.values()), "layers": sum(1 for k in kept.values() if k),
                "gates": len(self.gate_logits) - len(closed)}

    def _forget(self) -> None:
        self._span_inputs.clear()


def strip_hooks(model: nn.Module) -> nn.Module:
    """Remove hookchains' hooks from ``model`` (e.g. a ``copy.deepcopy`` of a hooked model); others stay."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "hookchains", False)]:
                del hooks[key]
    return model


def _uncompiled(model: nn.Module) -> Tuple[nn.Module, List[str]]:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, with a note; else ``model``.
    Compiled code does not run hooks added after compilation, so hookchains runs the original module."""
    inner = getattr(model, "_orig_mod", None)
    if not isinstance(inner, nn.Module):
        return model, []
    return inner, [f"{type(model).__name__} from torch.compile: compiled code would not run hookchains' hooks, so "
                   f"they sit on the module it wraps ({type(inner).__name__}, model._orig_mod), which the fit runs; "
                   "call chains.model, not the compiled wrapper, to see the sub-network"]


def attach(model: nn.Module, adapter: str = "auto", *, example=None, sites: Optional[SiteMap] = None,
           use_fx: bool = True, tau: float = 0.1, temperature: float = 0.2, score_max: Optional[float] = 1.0,
           tasks: Optional[int] = None, output=None, output_kind: str = "auto",
           check: Optional[bool] = None) -> ScoreHooks:
    """Find the sites of ``model`` and hook them; nothing of the model is modified.

    Args:
        model: any torch.fx-compatible or timm model (others work through a probe pass); a
            ``torch.compile`` wrapper is attached through the module it wraps (see ``sites.notes``).
        adapter: ``"auto"`` or a family name (``resnet``, ``vgg``, ``mobilenet``, ``vit``, ``generic``).
        example: input batch used to probe shapes (default: zeros of the model's input size); a
            tuple or dict of inputs for a model with several (:mod:`hookchains.inputs.forward`).
        sites: a :class:`SiteMap` found earlier (skips discovery).
        output: where the class scores are when the model returns a dict/tuple/list: a key, an index
            or a callable (:func:`hookchains.inputs.forward.select`).
        output_kind: ``"auto"`` (detected), ``"logits"``, ``"probabilities"`` or ``"log_probabilities"``.
        check: run the exactness self-check (:func:`hookchains.core.guard.verify`) on ``example`` before
            returning: sites that break it are dropped and named in ``sites.notes``/``sites.refused``.
            Default: check when the sites are discovered here, not when ``sites`` are given (a saved
            result's sites were checked when it was fitted); ``False`` skips it.
        tau: score threshold of section 3.2 (filters with ``S < tau`` are removed).
        temperature: ``T`` of the gate sigmoid (Eq. 6).
        score_max: upper bound of the scores (paper: 1); ``None`` leaves them unbounded above.
        tasks: hold this many independent score sets, one per task, for batched fitting
            (:func:`hookchains.core.fit.fit_tasks`); ``None``: one task.

    Raises:
        ValueError: the model's forward fails on ``example``, its output needs ``output=``, it has
            nothing to score, or (:class:`hookchains.core.guard.InexactModelError`) the hooks with every
            score kept do not reproduce it.

    Example:
        >>> import timm
        >>> hooks = attach(timm.create_model("resnet18"), example=torch.zeros(1, 3, 64, 64))
        >>> len(hooks.scores), len(hooks.gate_logits)        # gates: the 5 shape-preserving blocks
        (20, 5)
        >>> hooks.detach().__class__.__name__
        'ResNet'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
    model, notes = _uncompiled(model)
    if next(model.parameters(), None) is None:
        raise ValueError(f"{type(model).__name__} has no parameters: nothing to explain")
    example = default_example(model) if example is None else example
    check = sites is None if check is None else check
    if sites is None:
        sites = discover(model, adapter, example=example, use_fx=use_fx, output=output, output_kind=output_kind)
    if notes:
        sites = dataclasses.replace(sites, notes=sites.notes + notes)
    if check:
        sites = sites.without(verify(model, sites, example, lambda checked, count: ScoreHooks(
            model, checked, tau=tau, temperature=temperature, score_max=score_max, tasks=count)))
    return ScoreHooks(model, sites, tau=tau, temperature=temperature, score_max=score_max, tasks=tasks)
