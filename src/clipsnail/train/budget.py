"""A learning-rate schedule that fits a time budget (train.budget_schedule "fit").

A budget stops a run when it is spent. A cosine schedule laid over the configured epochs would then stop near its top
rate, never decayed. Instead the schedule is laid over the steps that fit: after the first steps the time a step
takes (evaluations and checkpoints included, as they come) is measured, and the steps that fit in what is left of
the budget, less the time of one end-of-epoch (the final evaluation and save), become the schedule's end; it is
estimated again every twentieth of the way. The warmup is kept to a tenth of the steps that fit. The time spent
preparing (encoding frozen towers once, before the first step) counts against the budget and is reported apart.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

FIRST_ESTIMATE_AFTER = 3  # steps timed (after the first one, which pays for warm-up costs) before the first plan
REPLANS = 20  # estimates over the run
MAX_WARMUP_SHARE = 0.1


class BudgetPlan:
    """Plans the steps a run takes under its budget (seconds) from `started` (a time.monotonic() value).
    configured: (warmup, total) steps of the configured schedule, the most the plan can give."""

    def __init__(self, budget: float, started: float, prepared: float, step: int, configured: tuple[int, int]):
        self.budget, self.started, self.configured = budget, started, configured
        self.prepare_s = prepared - started
        self.timed_from: tuple[int, float] | None = None  # (step, time) after this session's first step
        self.next_estimate = step + 1 + FIRST_ESTIMATE_AFTER
        self.end_of_epoch_s = 0.0
        self.planned = False

    def after_step(self, step: int, now: float) -> tuple[int, int] | None:
        """-> the new (warmup, total) when it is time to estimate again, else None. Every rank of a distributed run
        estimates at the same steps; they follow rank 0's estimate (`agreed`)."""
        if self.timed_from is None:
            self.timed_from = (step, now)
            return None
        if step < self.next_estimate:
            return None
        seconds_a_step = (now - self.timed_from[1]) / (step - self.timed_from[0])
        left = self.budget - (now - self.started) - self.end_of_epoch_s
        total = min(self.configured[1], step + max(0, math.floor(left / max(seconds_a_step, 1e-9))))
        warmup = min(self.configured[0], math.floor(MAX_WARMUP_SHARE * total))
        if not self.planned:
            log.info("time budget %.0f s: %.1f s preparing, then %.3f s a step: the schedule spans %d steps (of %d "
                     "configured), warmup %d", self.budget, self.prepare_s, seconds_a_step, total,
                     self.configured[1], warmup)
            self.planned = True
        return warmup, total

    def agreed(self, step: int, total: int) -> None:
        """The plan every rank follows now ends at `total`: the next estimate a twentieth of it later."""
        self.next_estimate = step + max(1, total // REPLANS)
