"""Issue 16: the paper's main experiment in miniature, on our conditional model and a learned reward.

Runs ``demo.alignment`` once on its 8 held-out (prompt, seed) cases (the settings were tuned on
other seeds and prompts, ``demo.alignment.TUNING``), then checks the claims with the margins
stated here and in ``demo/README.md``, and that the README's tables are this run's numbers.

Margins (means over the 8 cases):
* learned reward (ODE sampling, x_T optimised): DNO with the regulariser beats best-of-N's best by
  >= 0.10 at equal denoiser evaluations, with realism within 0.20 of the unoptimised samples and
  its noise typical (P >= 0.9); with gamma = 0 on the same cases the reward rises by more and
  realism falls by >= 0.40, the noise leaving the typical set (P <= 0.7): the hack;
* brightness and JPEG size (ancestral sampling, every noise optimised): DNO with the regulariser
  beats best-of-N; gamma = 0 collapses realism to under half the unoptimised, and the regulariser
  keeps it >= 0.2 above that;
* zeroth-order search at equal evaluations gains less than DNO on every reward.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from demo import alignment as A

README = Path(__file__).resolve().parents[1] / "demo" / "README.md"
OUT = Path(__file__).resolve().parents[1] / "outputs" / "alignment"


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)        # the README's run: 2 threads (JPEG's steps follow float rounding)
    try:
        yield A.run("held_out", A.REWARDS, OUT, "cpu")
    finally:
        torch.set_num_threads(threads)


def m(run, key):
    value = run[key]
    return A.mean(value) if isinstance(value, list) else value


def test_equal_denoiser_evaluations_and_backward_passes_are_counted(results):
    for name, runs in results.items():
        evaluations = {method: runs[method]["evaluations_per_image"] for method in A.METHODS[1:]}
        assert len(set(evaluations.values())) == 1, (name, evaluations)
        steps = A.SETTINGS[name].steps
        assert runs["dno"]["backward_per_image"] == steps and runs["dno_gamma0"]["backward_per_image"] == steps
        assert runs["best_of_n"]["backward_per_image"] == 0 and runs["zeroth_order"]["backward_per_image"] == 0
        assert runs["unoptimised"]["evaluations_per_image"] == A.SAMPLING_STEPS


def test_learned_reward_dno_beats_best_of_n_in_distribution_and_gamma_zero_hacks(results):
    runs = results["preference"]
    before, dno, hack, best, zo = (runs[k] for k in ("unoptimised", "dno", "dno_gamma0", "best_of_n", "zeroth_order"))
    assert m(dno, "reward") >= m(best, "reward") + 0.10, "DNO should beat best-of-N by >= 0.10"
    assert m(dno, "realism") >= m(before, "realism") - 0.20, "regularised DNO left the distribution"
    assert m(dno, "probability") >= 0.9
    # gamma = 0, same cases: the reward rises further, the images leave the distribution
    assert m(hack, "reward") - m(before, "reward") > m(dno, "reward") - m(before, "reward")
    assert m(hack, "realism") <= m(before, "realism") - 0.40, "gamma = 0 should show the hack"
    assert m(hack, "realism") + 0.30 <= m(dno, "realism")
    assert m(hack, "probability") <= 0.7
    assert m(hack, "denoise_err") > m(dno, "denoise_err") > 0
    assert m(zo, "reward") < m(dno, "reward")


@pytest.mark.parametrize("name", ["brightness", "jpeg_incompressibility"])
def test_pixel_rewards_dno_beats_best_of_n_and_gamma_zero_collapses(results, name):
    runs = results[name]
    before, dno, hack, best, zo = (runs[k] for k in ("unoptimised", "dno", "dno_gamma0", "best_of_n", "zeroth_order"))
    assert m(dno, "reward") > m(best, "reward")
    assert m(hack, "realism") <= 0.5 * m(before, "realism")
    assert m(dno, "realism") >= m(hack, "realism") + 0.2
    assert m(zo, "reward") < m(dno, "reward")


def test_learned_reward_with_every_step_noise_is_hacked_inside_the_typical_set(results):
    """The finding behind the learned reward's ODE setting: with ancestral sampling DNO raises the
    reward far beyond best-of-N while its noise stays typical (P ~ 1), so the regulariser, which
    only sees the noise, cannot hold realism there."""
    runs = results["preference_sde"]
    assert m(runs["dno"], "probability") >= 0.9
    assert m(runs["dno"], "reward") > m(runs["best_of_n"], "reward")
    assert m(runs["dno"], "realism") < m(runs["unoptimised"], "realism") - 0.2


def test_the_run_wrote_its_tables_figures_and_results(results):
    for name in A.REWARDS:
        assert (OUT / f"grid_{name}.png").stat().st_size > 1000
    assert (OUT / "reward_curves.png").stat().st_size > 1000
    assert (OUT / "results.json").is_file() and "#### preference" in (OUT / "tables.md").read_text()


# columns: tolerance of a README number against this run (another CPU rounds differently, and the
# JPEG reward is discontinuous in the pixels)
TOLERANCE = {"evals/img": 0, "backward/img": 0, "reward": 0.04, "realism": 0.06, "denoise err": 0.0006,
             "recognised": 0.13, "feature MMD": 0.004, "P": 0.06}


def readme_tables():
    text = README.read_text()
    section = text.split("<!-- alignment tables: begin -->")[1].split("<!-- alignment tables: end -->")[0]
    tables = {}
    for block in section.split("#### ")[1:]:
        name, body = block.split("\n", 1)
        rows = [line for line in body.splitlines() if line.startswith("|")]
        header = [c.strip() for c in rows[0].strip("|").split("|")]
        tables[name.strip()] = {cells[0]: dict(zip(header[1:], cells[1:])) for cells in
                                ([c.strip() for c in r.strip("|").split("|")] for r in rows[2:])}
    return tables


def test_readme_tables_are_this_runs_numbers(results):
    fresh = {}
    for block in (OUT / "tables.md").read_text().split("#### ")[1:]:
        name, body = block.split("\n", 1)
        fresh[name.strip()] = body
    tables = readme_tables()
    assert sorted(tables) == sorted(A.REWARDS)
    for name, rows in tables.items():
        settings = A.SETTINGS[name]
        labels = [A.method_label(method, settings, results[name]) for method in A.METHODS]
        assert list(rows) == labels, (name, list(rows))
        fresh_rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")[1:]]
                      for r in fresh[name].splitlines()[2:] if r.startswith("|")}
        for label, cells in rows.items():
            for (column, cell), new in zip(cells.items(), fresh_rows[label]):
                old_value = float(re.split(r"\s*±\s*", cell)[0])
                new_value = float(re.split(r"\s*±\s*", new)[0])
                assert abs(old_value - new_value) <= TOLERANCE[column] + 1e-9, \
                    f"demo/README.md {name} / {label} / {column}: {cell} there, {new} in a fresh run"
