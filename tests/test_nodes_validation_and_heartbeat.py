"""Node-level checks a new user meets: ODE + window refused at prompt validation, and the
in-step progress lines a long DNO step writes to the console."""
from __future__ import annotations

import logging
import re

import pytest
import torch

from comfy_host import import_comfy
from node_pack import load_node_pack
from toy_models import Brightness

SDE, ODE = "SDE (eta=1, paper default)", "ODE (eta=0)"


@pytest.fixture(scope="module")
def pack():
    import_comfy()
    return load_node_pack()


def test_modes_are_the_node_choices(pack):
    assert list(pack.nodes.sampler.MODES) == [SDE, ODE]


@pytest.mark.parametrize("sampler_mode,opt_window,steps,refused", [
    (ODE, 2, 4, True),        # a window of the last 2 of 4 ODE steps: no noise in it, no x_T
    (ODE, 1, 50, True),
    (ODE, 0, 4, False),       # every step and x_T
    (ODE, 4, 4, False),       # the window reaches x_T
    (SDE, 2, 4, False),       # SDE: the per-step noises of the window
    (ODE, 2, None, False),    # steps linked from another node: not decidable, the run checks it
    (ODE, None, 4, False),    # opt_window linked
    (None, 2, 4, False),      # sampler_mode linked
])
def test_ksampler_validation_of_ode_and_window(pack, sampler_mode, opt_window, steps, refused):
    answer = pack.nodes.sampler.DNOKSampler.VALIDATE_INPUTS(sampler_mode=sampler_mode, opt_window=opt_window,
                                                             steps=steps)
    if refused:
        assert isinstance(answer, str), answer
        assert "opt_window" in answer and "sampler_mode" in answer and f"steps {steps}" in answer
        assert "Set opt_window to 0" in answer
    else:
        assert answer is True


@pytest.mark.parametrize("sampler_mode,opt_window,refused", [
    (ODE, 1, True), (ODE, 1000, True), (ODE, 0, False), (SDE, 3, False), (None, 3, False), (ODE, None, False)])
def test_dno_sampler_validation_of_ode_and_window(pack, sampler_mode, opt_window, refused):
    """DNO Sampler's steps come from SamplerCustomAdvanced's SIGMAS, unknown at validation: with
    ODE any opt_window > 0 is refused (one covering every step is opt_window 0 anyway)."""
    answer = pack.nodes.sampler.DNOSampler.VALIDATE_INPUTS(sampler_mode=sampler_mode, opt_window=opt_window)
    if refused:
        assert isinstance(answer, str) and "opt_window" in answer and "sampler_mode" in answer, answer
        assert "SIGMAS" in answer
    else:
        assert answer is True


def test_validation_keeps_comfyuis_own_checks_for_the_inputs_it_takes(pack):
    """ComfyUI skips its combo and min/max checks for a VALIDATE_INPUTS' inputs: ours does them."""
    validate = pack.nodes.sampler.DNOKSampler.VALIDATE_INPUTS
    assert "sampler_mode" in validate(sampler_mode="SDE", opt_window=0, steps=4)
    assert "minimum" in validate(sampler_mode=SDE, opt_window=-1, steps=4)
    assert re.search(r"steps: 0 is smaller", validate(sampler_mode=SDE, opt_window=0, steps=0))
    assert "maximum" in validate(sampler_mode=SDE, opt_window=0, steps=10001)
    assert "sampler_mode" in pack.nodes.sampler.DNOSampler.VALIDATE_INPUTS(sampler_mode="x", opt_window=0)


def test_long_steps_log_which_sampling_step_the_model_is_at(pack, monkeypatch, caplog):
    from test_nodes_inprocess import load
    from tiny_checkpoints import sd15_checkpoint

    model, vae, pos, neg = load(None, sd15_checkpoint(vae="taesd"))
    monkeypatch.setattr(pack.nodes.progress.RunReporter, "heartbeat_every", 0.0)  # every call is "long"
    node = pack.nodes.sampler.DNOKSampler()
    with caplog.at_level(logging.INFO, logger="DNO"), torch.inference_mode():
        node.sample(model, pos, neg, {"samples": torch.zeros(1, 4, 8, 8)}, 1, 3, 3.0, "normal", 1.0,
                    vae=vae, reward=Brightness(), sampler_mode=SDE, opt_steps=1, lr=0.05, method="auto",
                    precision="fp32", time_budget=0.0, reward_prompt="", memory_mode="fastest (store every step)")
    beats = re.findall(r"DNO: step (\d+)/1 in progress, model call at sampling step (\d+)/3", caplog.text)
    assert beats, caplog.text
    seen = {(int(a), int(b)) for a, b in beats}
    assert {(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)} <= seen, seen
    # the step lines stay parseable by demo.comfy_run (the heartbeat is no "DNO step" line)
    assert not any(line.startswith("DNO step") for line in re.findall(r"DNO: step[^\n]*", caplog.text))


def test_no_heartbeat_while_steps_are_quick(pack, caplog):
    from test_nodes_inprocess import load
    from tiny_checkpoints import sd15_checkpoint

    model, vae, pos, neg = load(None, sd15_checkpoint(vae="taesd"))
    assert pack.nodes.progress.RunReporter.heartbeat_every >= 10
    node = pack.nodes.sampler.DNOKSampler()
    with caplog.at_level(logging.INFO, logger="DNO"), torch.inference_mode():
        node.sample(model, pos, neg, {"samples": torch.zeros(1, 4, 8, 8)}, 1, 2, 3.0, "normal", 1.0,
                    vae=vae, reward=Brightness(), sampler_mode=SDE, opt_steps=1, lr=0.05, method="auto",
                    precision="fp32", time_budget=0.0, reward_prompt="")
    assert "in progress" not in caplog.text and "DNO step 1/1" in caplog.text
