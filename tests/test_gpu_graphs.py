"""The render replayed as CUDA graphs (dno/graphed.py) against the eager render, on CUDA.

Same seed and settings, graphs on and off: the trajectories must agree to rounding (CUDA's
backward sums in no fixed order), in every memory mode; a render that cannot be captured
must fall back to eager with the reason in the result; ComfyUI's own SD1.5 / SDXL classes
must capture through the node pack's KSampler path.
"""
from __future__ import annotations

import pytest
import torch

from dno import DNOConfig, ProbabilityRegularizer, VP, optimize
from bench_runner import tiny_bench_records
from toy_models import BlockDenoiser, Brightness, block_decode, block_noise, vp_sigmas


def run(den, sigmas, graphs: bool, checkpoint, precision="fp32", steps=4):
    device = torch.device("cuda")
    return optimize(den, sigmas, Brightness(), block_decode, block_noise(sigmas, device), VP, eta=1.0,
                    config=DNOConfig(steps=steps, lr=0.05, precision=precision, checkpoint=checkpoint,
                                     cuda_graphs=graphs),
                    regularizer=ProbabilityRegularizer(gamma=1.0, k=1))


@pytest.mark.gpu
@pytest.mark.parametrize("checkpoint", [False, True, 3, "blocks", "auto"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_run_matches_the_eager_run(checkpoint, precision):
    sigmas = vp_sigmas(8)
    den = BlockDenoiser().cuda()
    eager = run(den, sigmas, False, checkpoint, precision)
    graphed = run(den, sigmas, True, checkpoint, precision)
    assert eager.render_info["cuda_graphs"] is False
    assert graphed.render_info["cuda_graphs"] is True, graphed.render_info
    assert graphed.render_info["grad_rel_err"] <= 1e-2
    tol = 1e-4 if precision == "fp32" else 1e-2
    ra = [h.reward[0] for h in graphed.history]
    rb = [h.reward[0] for h in eager.history]
    assert ra == pytest.approx(rb, rel=tol)
    assert ra[-1] > ra[0]
    err = (graphed.latent - eager.latent).norm() / eager.latent.norm()
    assert float(err) <= (1e-3 if precision == "fp32" else 2e-2)


class SyncingDenoiser(BlockDenoiser):
    """Reads a value back to the host in every call: a CUDA graph cannot capture that."""

    def forward(self, x, sigma):
        if float(sigma[0]) < 0:      # a host sync
            raise AssertionError
        return super().forward(x, sigma)


@pytest.mark.gpu
def test_a_render_that_cannot_be_captured_runs_eagerly_with_the_reason(caplog):
    sigmas = vp_sigmas(6)
    den = SyncingDenoiser().cuda()
    with caplog.at_level("WARNING", logger="DNO"):
        graphed = run(den, sigmas, True, True)
    eager = run(den, sigmas, False, True)
    assert graphed.render_info["cuda_graphs"] is False
    assert "could not be captured" in graphed.render_info["reason"]
    assert "CUDA graphs are off" in caplog.text
    assert [h.reward[0] for h in graphed.history] == pytest.approx([h.reward[0] for h in eager.history],
                                                                   rel=1e-5)


@pytest.mark.gpu
def test_graphs_release_their_memory():
    import gc
    sigmas = vp_sigmas(8)
    den = BlockDenoiser().cuda()
    run(den, sigmas, True, False)
    gc.collect()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    res = run(den, sigmas, True, False)
    assert res.render_info["cuda_graphs"] is True
    del res
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline


@pytest.mark.gpu
def test_comfyui_classes_capture_in_every_memory_mode(tmp_path):
    """ComfyUI's SD1.5 / SDXL classes (tiny UNets) through the node pack's KSampler path, graphs
    against eager in one process (bench --compare)."""
    records = tiny_bench_records(tmp_path / "bench.jsonl", "bf16:auto,bf16:store,fp16:step,bf16:blocks,fp32:auto",
                                 "--compare", timeout=900)
    assert len(records) == 10
    for i, r in enumerate(records):
        assert "error" not in r, r
        assert r["cuda_graphs"], r["render"]
        assert r["finite"], r
        # the first graphed run of a process leaves the capture stream's library workspaces
        # (cuBLAS keeps one per stream for the process); every later run gives back all it took
        if i % 5:
            assert r["released"], r
        assert r["compare"]["latent_rel_err"] <= 2e-2, r["compare"]
        assert r["reward_last"] > r["reward_first"], r


@pytest.mark.gpu
def test_channels_last_weights_change_speed_not_results(tmp_path, monkeypatch):
    """The pack's channels-last convolution weights (dno/layout.py; forced on here, as the tiny
    UNets' convolution share differs from the real ones') against the NCHW layout
    (DNO_CHANNELS_LAST=0), same seed, through the node pack's path with ComfyUI's SD1.5 / SDXL
    classes: the same trajectory to bf16 rounding, graphs in both."""
    monkeypatch.setenv("BENCH_CHANNELS_LAST", "1")
    records = tiny_bench_records(tmp_path / "bench.jsonl", "bf16:auto,bf16:auto/nchw,fp32:blocks,fp32:blocks/nchw")
    assert len(records) == 8
    for nhwc, nchw in zip(records[0::2], records[1::2]):
        assert "error" not in nhwc and "error" not in nchw, (nhwc, nchw)
        assert nhwc["dno_channels_last"] and not nchw["dno_channels_last"]
        assert nhwc["cuda_graphs"] and nchw["cuda_graphs"], (nhwc["render"], nchw["render"])
        tolerance = 2e-2 if nhwc["precision"] == "bf16" else 1e-4
        assert nhwc["reward_last"] == pytest.approx(nchw["reward_last"], rel=tolerance), (nhwc, nchw)
        assert nhwc["reward_first"] == pytest.approx(nchw["reward_first"], rel=tolerance)
    # the first run of each process keeps the capture stream's cuBLAS workspace (see above)
    assert all(r["released"] for i, r in enumerate(records) if i % 4), records
