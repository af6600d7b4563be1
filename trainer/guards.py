"""Loss-spike and non-finite guard: decide, per step, to step, to skip, or to roll back."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

STEP, SKIP, ROLLBACK = "step", "skip", "rollback"


class SpikeGuard:
    """Judges each step's loss and gradient norm before the optimizer sees them.

    A non-finite loss or gradient norm skips the optimizer step; ``max_nonfinite`` of them in
    a row, or a loss more than ``z_threshold`` standard deviations above the mean of the
    last ``window`` healthy losses, asks for a rollback. Only healthy losses enter the window.
    """

    def __init__(
        self,
        window: int = 50,
        min_history: int = 10,
        z_threshold: float = 6.0,
        max_nonfinite: int = 3,
        max_rollbacks: int = 3,
    ):
        if min_history < 2 or min_history > window:
            raise ValueError(f"guard.min_history {min_history} must be in 2..window ({window})")
        self.window = window
        self.min_history = min_history
        self.z_threshold = z_threshold
        self.max_nonfinite = max_nonfinite
        self.max_rollbacks = max_rollbacks
        self.history: deque[float] = deque(maxlen=window)
        self.nonfinite_in_a_row = 0

    def z_score(self, loss: float) -> float | None:
        """How many standard deviations ``loss`` lies above the window's mean (None: too few)."""
        if len(self.history) < self.min_history:
            return None
        mean = sum(self.history) / len(self.history)
        var = sum((x - mean) ** 2 for x in self.history) / (len(self.history) - 1)
        # A floor on the deviation keeps a flat window from calling every wiggle a spike.
        std = max(math.sqrt(var), 1e-3 * abs(mean), 1e-8)
        return (loss - mean) / std

    def judge(self, loss: float, grad_norm: float) -> tuple[str, str]:
        """(STEP, SKIP or ROLLBACK, the reason) for a step with this loss and gradient norm."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.nonfinite_in_a_row += 1
            what = f"non-finite loss {loss} / grad norm {grad_norm}"
            if self.nonfinite_in_a_row >= self.max_nonfinite:
                return ROLLBACK, f"{what}, {self.nonfinite_in_a_row} steps in a row"
            return SKIP, what
        self.nonfinite_in_a_row = 0
        z = self.z_score(loss)
        if z is not None and z > self.z_threshold:
            return ROLLBACK, f"loss spike {loss:.4f}, z-score {z:.1f} > {self.z_threshold}"
        self.history.append(loss)
        return STEP, ""

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
