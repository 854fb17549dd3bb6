"""precision "auto": fp32 on a CPU, the model's compute dtype on a GPU (core, nodes)."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from dno import DNOConfig, DNOError, DNONoise, VP, optimize
from dno.precision import CHOICES, module_dtype, resolve_precision
from tests.toy_models import Brightness, ToyDenoiser, to_image, vp_sigmas


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
@pytest.mark.parametrize("model_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_auto_is_fp32_on_a_cpu_whatever_the_model(device, model_dtype):
    assert resolve_precision("auto", device, model_dtype) == "fp32"


@pytest.mark.parametrize("model_dtype,expected", [
    (torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32"),
    (None, "fp32"), (torch.float64, "fp32"), (torch.float8_e4m3fn, "fp32")])
def test_auto_is_the_model_dtype_on_a_gpu(model_dtype, expected):
    # torch.device("cuda") needs no GPU to exist; resolving is pure
    assert resolve_precision("auto", "cuda", model_dtype) == expected
    assert resolve_precision("auto", torch.device("cuda", 1), model_dtype) == expected


@pytest.mark.parametrize("explicit", ["fp32", "bf16", "fp16"])
def test_an_explicit_choice_is_kept(explicit):
    for device in ("cpu", "cuda"):
        assert resolve_precision(explicit, device, torch.float16) == explicit


def test_unknown_precision_is_named():
    assert CHOICES[0] == "auto"
    with pytest.raises(DNOError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")


def test_module_dtype():
    assert module_dtype(torch.nn.Linear(2, 2).to(torch.bfloat16)) == torch.bfloat16
    assert module_dtype(lambda x, s: x) is None
    assert module_dtype(torch.nn.ReLU()) is None


def test_core_auto_on_cpu_runs_exactly_as_fp32():
    sig = vp_sigmas(6)

    def run(precision):
        noise = DNONoise.from_seed((2, 4, 8, 8), 6, seed=0, sde=True)
        return optimize(ToyDenoiser("eps"), sig, Brightness(), to_image, noise, VP, eta=1.0,
                        config=DNOConfig(steps=3, lr=0.05, precision=precision))

    auto, fp32 = run("auto"), run("fp32")
    assert [h.reward for h in auto.history] == [h.reward for h in fp32.history]
    assert torch.equal(auto.latent, fp32.latent)


# --------------------------------------------------------------------------- nodes (in-process host)

@pytest.fixture(scope="module")
def pack():
    from comfy_host import import_comfy
    from node_pack import load_node_pack
    import_comfy()
    return load_node_pack()


def test_node_offers_auto_first_and_keeps_the_old_choices(pack):
    for node in (pack.nodes.sampler.DNOKSampler, pack.nodes.sampler.DNOSampler):
        choices = node.INPUT_TYPES()["required"]["precision"][0]
        assert choices[0] == "auto"            # a combo's first entry is the default of a new node
        assert {"bf16", "fp16", "fp32"} <= set(choices)  # saved workflows still validate


def test_node_auto_resolves_to_fp32_on_the_cpu(pack, caplog):
    from test_nodes_inprocess import load  # the tiny-SD1.5 loader those tests share
    from tiny_checkpoints import sd15_checkpoint

    model, vae, pos, neg = load(None, sd15_checkpoint(vae="taesd"))
    node = pack.nodes.sampler.DNOKSampler()
    mode = list(pack.nodes.sampler.MODES)[0]

    def sample(precision):
        with torch.inference_mode():
            out, _, history = node.sample(
                model, pos, neg, {"samples": torch.zeros(1, 4, 8, 8)}, 3, 3, 3.0, "normal", 1.0,
                vae=vae, reward=Brightness(), sampler_mode=mode, opt_steps=2, lr=0.05, method="auto",
                precision=precision, time_budget=0.0, reward_prompt="")
        return out["samples"], json.loads(history)

    with caplog.at_level(logging.INFO, logger="DNO"):
        auto, auto_history = sample("auto")
    assert "DNO: precision auto -> fp32 (cpu" in caplog.text, caplog.text
    fp32, fp32_history = sample("fp32")
    assert [s["reward"] for s in auto_history["steps"]] == [s["reward"] for s in fp32_history["steps"]]
    torch.testing.assert_close(auto, fp32, rtol=0, atol=0)
    _, bf16_history = sample("bf16")                  # a workflow saved with bf16 still runs
    assert len(bf16_history["steps"]) == 3
