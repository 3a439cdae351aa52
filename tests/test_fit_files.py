"""A saved fit is verified, not trusted: a forger who edits constants and recomputes the checksum is refused."""
import hashlib
import json

import numpy as np
import pytest

import capscale
from capscale.analysis.runs import load_runs
from capscale.analysis.simulate import simulate_runs
from capscale.capacity import InputError


def _checksum(content: dict) -> str:
    body = {k: v for k, v in content.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    runs = load_runs(simulate_runs({"bf16": 1.0, "int4": 0.8, "int2": 0.4}, noise=0.003))
    fit = capscale.fit(runs, bootstrap=12, progress=False, n_jobs=1)
    path = fit.save(tmp_path_factory.mktemp("fits") / "fit.json")
    return runs, fit, path


def test_an_honest_saved_fit_loads_with_its_replicates_reproduced(saved):
    runs, fit, path = saved
    loaded = capscale.LawFit.load(path, runs)
    assert loaded.law.values() == pytest.approx(fit.law.values())
    assert loaded.boot.replicates == fit.boot.replicates and loaded.boot.unit == "formats"


def test_edited_constants_with_a_recomputed_checksum_are_refused(saved, tmp_path):
    runs, fit, path = saved
    from capscale.analysis.laws import DecoupledLaw
    content = json.loads(path.read_text())
    theta = np.array(content["law"]["theta"])
    k = len(content["law"]["formats"])
    i = content["law"]["formats"].index("int4")
    theta[i] = theta[0] - theta[-2] * np.log(0.999)  # eff[int4] = 0.999
    law = DecoupledLaw().restore(theta, runs)
    content["law"].update(theta=theta.tolist(), params=law.params_, eff=law.eff_, objective=law.objective_)
    content["checksum"] = _checksum(content)
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(content))
    with pytest.raises(InputError, match="not a fit of these runs"):
        capscale.LawFit.load(forged, runs)
    assert k == 3


def test_forged_replicates_are_refused(saved, tmp_path):
    runs, fit, path = saved
    content = json.loads(path.read_text())
    samples = content["bootstrap"]["samples"]
    point = content["law"]["eff"]["int4"]
    samples["eff[int4]"] = [point + 0.5 * (v - point) for v in samples["eff[int4]"]]  # half-width intervals
    content["checksum"] = _checksum(content)
    forged = tmp_path / "forged_boot.json"
    forged.write_text(json.dumps(content))
    with pytest.raises(InputError, match="replicate .* is not what refitting that resample gives"):
        capscale.LawFit.load(forged, runs)
