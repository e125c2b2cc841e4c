"""The learners' keyword options: one frozen dataclass per algorithm, the one home of its defaults.

A learner is built as ``Learner(<modules>, **options)``. Its class names an options type
(:attr:`~mrmeta.algorithms.base.ChunkedLearner.options_type`) whose fields are the keyword
options with their types and defaults; the learner reads them as ``self.options.<name>``. The
families share their options by inheritance: :class:`LearnerOptions` (every method), then the
head-only and the whole-network ones, then one per algorithm, which re-declares a field only to
give it its own default. A field declared with ``init=False`` is a fixed setting of the method,
not an option (ANIL always meta-learns its head's start, FOMAML is always first order).

Adding an option is one edit: a field where it belongs (and a line in the learner's docstring).
The constructors, :func:`mrmeta.algorithms.algorithm_defaults`, the factory and the CLI's help
all read the fields, and :func:`options_signature` shows them in ``help(Learner)``.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

from mrmeta._per_task import check_loss_name
from mrmeta._validation import check_finite_number, check_positive_int

OptionsT = TypeVar("OptionsT", bound="LearnerOptions")


@dataclass(frozen=True, kw_only=True)
class LearnerOptions:
    """The options every learner takes; each is checked (and normalised) when built.

    Attributes:
        inner_steps: ``K ≥ 0``, the lower level's number of steps (or Newton's cap).
        loss: ``"cross_entropy"`` (classification) or ``"mse"`` (regression).
        chunk_size: tasks processed together (``1`` = one at a time, ``None`` = all).
        meta_lr: the outer optimizer's learning rate that goes with these defaults (the learner
            does not read it; ``mrmeta train`` uses it when ``--lr`` is not given).

    In the subclasses, the fields commented ``# tuned`` were selected on Omniglot 5-way
    1-shot's validation split by the fair comparison's 3x3 study
    (benchmarks/results/fair_tuning_5way1shot_grid3x3.json; a test checks they agree).
    """

    inner_steps: int
    loss: str = "cross_entropy"
    chunk_size: int | None = 1
    meta_lr: float = 1e-3

    def __post_init__(self) -> None:
        self._store("inner_steps", check_positive_int("inner_steps", self.inner_steps, minimum=0))
        self._store("meta_lr", check_finite_number("meta_lr", self.meta_lr, positive=True))
        self._store("loss", check_loss_name(self.loss))
        if self.chunk_size is not None:
            self._store("chunk_size", check_positive_int("chunk_size", self.chunk_size))

    def _store(self, name: str, checked: object) -> None:
        """Keep the checked form of option ``name`` (only while ``__post_init__`` runs)."""
        object.__setattr__(self, name, checked)


def option_defaults(options_type: type[LearnerOptions]) -> dict[str, Any]:
    """The keyword options of ``options_type`` and their defaults (fixed fields left out)."""
    return {f.name: f.default for f in fields(options_type) if f.init}


def parse_options(options_type: type[OptionsT], given: Mapping[str, Any], owner: str) -> OptionsT:
    """``options_type(**given)``, or a TypeError that names the valid options of ``owner``."""
    valid = option_defaults(options_type)
    unknown = [name for name in given if name not in valid]
    if unknown:
        raise TypeError(
            f"{owner} has no option {', '.join(unknown)}; valid options: {', '.join(valid)}"
        )
    return options_type(**given)


def options_signature(
    init: Callable[..., None], options_type: type[LearnerOptions]
) -> inspect.Signature:
    """The signature of a learner class: ``init``'s positional parameters (less ``self``), then
    one keyword-only parameter per option with its type and default (what ``help`` shows)."""
    positional = [
        p
        for p in list(inspect.signature(init).parameters.values())[1:]
        if p.kind is not p.VAR_KEYWORD
    ]
    hints = typing.get_type_hints(options_type)
    keywords = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if f.default is MISSING else f.default,
            annotation=hints.get(f.name, inspect.Parameter.empty),
        )
        for f in fields(options_type)
        if f.init
    ]
    return inspect.Signature([*positional, *keywords])
