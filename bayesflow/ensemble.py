r"""Deep ensembles as stacked parameters and buffers: trained and predicted in one pass."""

from __future__ import annotations

__all__ = ["Ensemble", "ensemble", "stack_modules"]

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from torch import Tensor

from ._checks import Tables, check_callable, check_generator, check_int, check_members
from ._compat import keep_lazy_cuda_seed
from ._engine import draw_state, mark_members, restore_draw_state


class _Fields(NamedTuple):
    module: torch.nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    seeds: list[int] | None = None


class Ensemble(_Fields):
    r"""`K` members of one architecture, each with its own parameters and buffers, stacked
    on a leading dim: what :func:`bayesflow.vmap_call` runs in one pass.

    Run it with `bf.vmap_call(ens.module, ens.params, *args, buffers=ens.buffers)`; train
    it with any torch optimizer over `ens.params.values()`. Save it with `torch.save(ens, f)`
    and `torch.load(f, weights_only=False)`, or save `{"params": ens.params, "buffers":
    ens.buffers}` (torch's default `weights_only=True` loads it) and rebuild it with
    `Ensemble(module, d["params"], d["buffers"])`: a copy trains as the original. The
    parameters an Ensemble holds, however it was made (copied, loaded), are its members'
    own: what the module writes into its own weight (`Embedding(max_norm)`'s renormalized
    rows) is written back into them, as into K separate modules, also in later calls that
    are given those tensors.

    Attributes:
        module: The module the calls run on (its own parameters and buffers are not used).
        params: The members' parameters `{name: (K, *shape)}`: leaf tensors that require
            gradients as the members' own do (a parameter frozen in the members, with
            `requires_grad=False`, stays frozen: optimizers skip it).
        buffers: The members' buffers `{name: (K, *shape)}` (BatchNorm's running
            statistics, say), which the calls update in place, each member its own.
        seeds: The seed each member was built with (:func:`ensemble`), or :py:`None`.
    """

    __slots__ = ()

    def __new__(
        cls,
        module: torch.nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        seeds: list[int] | None = None,
    ) -> Ensemble:
        # Made, copied (copy, pickle and torch.load make it anew) or rebuilt: its
        # parameters are the members' own, into which a call writes back (see _engine).
        ens = super().__new__(cls, module, params, buffers, seeds)
        if isinstance(params, Mapping):
            mark_members({k: v for k, v in params.items() if isinstance(v, Tensor)})
        return ens

    @classmethod
    def _make(cls, iterable: Any) -> Ensemble:  # (`_replace` makes it anew through it)
        values = tuple(iterable)
        if len(values) != len(cls._fields):
            raise TypeError(f"Expected {len(cls._fields)} arguments, got {len(values)}")
        return cls(*values)

    def __reduce__(self) -> tuple[Any, tuple]:
        # Made anew by every pickle protocol (0 and 1 would skip `__new__`).
        return (type(self), tuple(self))


def _stack(
    modules: Sequence[nn.Module], tables: list[Tables], seeds: list[int] | None
) -> Ensemble:
    r"""Stacks the members' parameters and buffers, as :func:`check_members` read them."""

    first, (params, buffers) = modules[0], tables[0]
    with torch.no_grad():
        # A frozen parameter (requires_grad=False) stays frozen: no optimizer moves it.
        params = {
            name: torch.stack([t[0][name].detach() for t in tables]).requires_grad_(
                p.requires_grad
            )
            for name, p in params.items()
        }
        buffers = {name: torch.stack([t[1][name] for t in tables]) for name in buffers}
    return Ensemble(first, params, buffers, seeds)


def _check_initializations(where: str, tables: list[Tables]) -> None:
    r"""Refuses `k > 1` members whose parameters are all equal: trained alike, they stay
    alike, an ensemble with no spread."""

    first = tables[0][0]
    if len(tables) < 2 or any(p.is_meta for p in first.values()):  # meta: no values
        return
    for params, _ in tables[1:]:
        if not all(torch.equal(params[name], p) for name, p in first.items()):
            return
    raise ValueError(
        f"{where}: expected members with different initial parameters, got {len(tables)} "
        "equal ones, which would train identically; make_module must initialize each member "
        "from torch's global random state (not copy a template or fix a seed of its own)"
    )


def ensemble(
    make_module: Callable[[], nn.Module],
    k: int,
    generator: torch.Generator | None = None,
) -> Ensemble:
    r"""Builds a deep ensemble of `k` members, each initialized by `make_module()` under a
    seed of its own, and stacks their parameters and buffers for training in one pass.

    Member `i` is exactly what `torch.manual_seed(ens.seeds[i]); make_module()` builds;
    the global random state is left as it was, but for the draw of the seeds when
    `generator` is :py:`None` (none if the call fails). Trained with an optimizer whose update is
    element-wise (SGD, Adam, AdamW, ...) on the sum of the members' losses, each member
    gets exactly its own gradient and its own optimizer state: `K` independent trainings
    in one vectorized pass. (A clipping of the global gradient norm would couple them.)

    Example:
        >>> ens = ensemble(lambda: torch.nn.Linear(3, 2), 4)
        >>> x = torch.randn(8, 3)
        >>> bayesflow.vmap_call(ens.module, ens.params, x, buffers=ens.buffers).shape
        torch.Size([4, 8, 2])

    Arguments:
        make_module: A function that builds a new member each call, initialized from
            torch's global random state (`lambda: Net()`, not a module, nor a function that
            returns one module or copies of a template).
        k: The number of members.
        generator: The source of the members' seeds; the global one if :py:`None`.

    Returns:
        An :class:`Ensemble`.

    Raises:
        TypeError: If `make_module` is a module, or returns something else.
        ValueError: If `make_module` returns the same module twice, or `k > 1` members with
            equal parameters (they would train identically), or members that differ in
            architecture, mode or settings (see :func:`stack_modules`).

    References:
        | Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles
        | (Lakshminarayanan et al., 2017)
        | https://arxiv.org/abs/1612.01474
    """

    where = "ensemble"
    if isinstance(make_module, nn.Module):  # callable, but its call is a forward pass
        name = type(make_module).__name__
        raise TypeError(
            f"{where}: expected make_module to be a function that builds a module, got the "
            f"module {name}; pass one that builds a new member each call, e.g. "
            f"lambda: {name}(...)"
        )
    check_callable(where, "make_module", make_module, optional=False)
    k = check_int(where, "k", k)
    check_generator(where, generator)

    device = generator.device if generator is not None else torch.device("cpu")
    saved = draw_state(generator, default=True)
    try:
        seeds = torch.randint(0, 2**62, (k,), generator=generator, device=device).tolist()
        members = []
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        for seed in seeds:
            with keep_lazy_cuda_seed(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                member = make_module()
            if not isinstance(member, nn.Module):
                raise TypeError(
                    f"{where}: expected make_module to return a torch.nn.Module, "
                    f"got {type(member).__name__}"
                )
            same = [j for j, m in enumerate(members) if m is member]
            if same:
                raise ValueError(
                    f"{where}: expected make_module to build a new module each call, got "
                    f"the same {type(member).__name__} for members {same[0]} and {len(members)}"
                )
            members.append(member)
        tables = check_members(where, members, equal_buffers=False, equal_frozen=True)
        _check_initializations(where, tables)
    except BaseException:
        restore_draw_state(saved)  # a failed call draws no seeds
        raise

    return _stack(members, tables, seeds)


def stack_modules(modules: Sequence[nn.Module]) -> Ensemble:
    r"""Stacks the parameters and buffers of modules of one architecture (members trained
    apart, say) into an :class:`Ensemble`.

    Unlike :func:`bayesflow.stack_params`, the members may hold different buffers (the
    running statistics of their BatchNorms): each keeps its own in
    :attr:`Ensemble.buffers`. The stacked tensors are copies: the modules are left as they
    are.

    Example:
        >>> nets = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)) for _ in range(3)]
        >>> ens = stack_modules(nets)
        >>> ens.buffers["1.running_mean"].shape
        torch.Size([3, 4])

    Arguments:
        modules: `n >= 1` modules of the same class (a parametrized module's original
            class: weight norm, spectral norm, orthogonal), with the same parameter and
            buffer names, shapes, dtypes and devices, the same parameters frozen, and the
            same submodules (names and classes), each in the same mode (train or eval) and
            with the same settings: the attributes of torch's and zuko's layers
            (BatchNorm's eps and momentum, dropout's `p`, MultiheadAttention's
            `batch_first`, a TransformerEncoderLayer's `norm_first` and `activation`
            function, ...) and the functions of any layer; the other attributes of a
            layer of yours that differ get a `UserWarning`.

    Returns:
        An :class:`Ensemble` whose calls run on `modules[0]`.

    Raises:
        ValueError: If the modules differ in any of these, naming the first difference.
    """  # noqa: E501

    tables = check_members("stack_modules", modules, equal_buffers=False, equal_frozen=True)
    return _stack(list(modules), tables, None)
