"""Run tables simulated from a known law: for testing fitters, checking interval coverage, and planning
how many runs a study needs to separate formats."""
from __future__ import annotations

import numpy as np
import pandas as pd

from capscale.capacity import BASELINE
from capscale.capacity.runtable import BACKWARD_MARK, NO_BACKWARD

from .laws import law_loss

TRUTH = {"A": 400.0, "B": 1800.0, "E": 1.7, "alpha": 0.34, "beta": 0.37}


def simulate_runs(eff: dict, sizes=(2e7, 5e7, 1e8, 2e8, 4e8), tokens_per_param=(20, 50, 100), noise: float = 0.005,
                  seed: int = 0, law: dict | None = None, specs: dict | None = None,
                  eff_d: dict | None = None, drift: dict | None = None, saturation: float = np.inf,
                  reference_ratio: float = 100.0) -> pd.DataFrame:
    """One run per (format, N, D): loss from the decoupled law times exp(N(0, noise)) (log-normal scatter).
    `eff` maps labels to true efficiencies (the baseline label must be there with 1); `specs` optionally maps
    labels to (w_format, a_format) spec strings. `eff_d` maps backward labels to true data efficiencies (`none`,
    exact gradients, with 1): every forward format is then crossed with every backward one, D scaled by effD.
    `drift` maps labels to a drift of log efficiency per doubling of D/N (the drift law's truth): eff at D/N = r is
    eff exp(drift log2(min(r, saturation) / reference_ratio))."""
    law = {**TRUTH, **(law or {})}
    rng = np.random.default_rng(seed)
    rows = []
    for label, e in eff.items():
        w, a = (specs or {}).get(label, (label, None))
        for backward, e_d in (eff_d or {NO_BACKWARD: 1.0}).items():
            for n in sizes:
                for ratio in tokens_per_param:
                    d = n * ratio
                    shift = (drift or {}).get(label, 0.0) * np.log2(min(ratio, saturation) / reference_ratio)
                    loss = law_loss(law, n, d * e_d, e * np.exp(shift))
                    rows.append({"format": label + ("" if backward == NO_BACKWARD else BACKWARD_MARK + backward),
                                 "params": n, "tokens": d, "loss": loss * np.exp(rng.normal(0, noise)),
                                 "w_format": w if label != BASELINE else BASELINE, "a_format": a or "none",
                                 "forward": label, "backward": backward})
    frame = pd.DataFrame(rows)
    return frame if eff_d else frame.drop(columns=["forward", "backward"])  # the label says it all without effD
