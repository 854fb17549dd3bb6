"""DNO on a MODEL compiled by ComfyUI's TorchCompileModel (``set_torch_compile_wrapper``).

The backend is ``aot_eager``: dynamo's graph capture and AOTAutograd's backward,
as with ``inductor``, without a C compiler. dynamo's recompile limit is set to 1
so that functions switch from compiled to eager in the middle of a model call,
the state that broke checkpointed recomputation (a step's forward ran partly
compiled, its recompute eagerly, and the saved tensors did not match).
"""
from __future__ import annotations

import pytest
import torch

# The tiny SD1.5 checkpoint, the node pack and the node call of the in-process node tests.
from test_nodes_inprocess import comfy, dno_sample, pack, sd15  # noqa: F401  (fixtures)

MODES = ["fastest (store every step)", "low memory (recompute every step)", "lowest memory (recompute blocks)"]


@pytest.fixture
def compiled(sd15):
    """The tiny SD1.5 MODEL behind TorchCompileModel, on a fresh dynamo cache.

    torch's own config patching, not monkeypatch.setattr: pytest 9.2's undo deletes a setting
    of torch's config module (it is a module attribute only through __getattr__), so every
    later test found no recompile_limit."""
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        model = sd15[0].clone()
        set_torch_compile_wrapper(model=model, backend="aot_eager")
        yield model
    torch._dynamo.reset()


def rewards(history):
    return [s["reward"][0] for s in history["steps"]]


@pytest.mark.parametrize("memory_mode", MODES)
def test_compiled_model_gives_the_eager_result(pack, sd15, compiled, memory_mode):
    model, vae, pos, neg = sd15
    latent = torch.zeros(1, 4, 8, 8)
    ref, _, ref_history = dno_sample(pack, model, vae, pos, neg, latent, "sde", seed=5, opt_steps=2,
                                     memory_mode=memory_mode)
    out, _, history = dno_sample(pack, compiled, vae, pos, neg, latent, "sde", seed=5, opt_steps=2,
                                 memory_mode=memory_mode)
    print(memory_mode, "eager rewards", rewards(ref_history), "compiled", rewards(history))
    assert rewards(ref_history)[-1] > rewards(ref_history)[0]
    assert rewards(history) == pytest.approx(rewards(ref_history), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_recompute_mismatch_is_a_clear_error_with_the_best_result(pack, sd15, compiled, monkeypatch):
    """Without the settling call the mismatch happens; the node names the cause and the fix."""
    model, vae, pos, neg = sd15
    monkeypatch.setattr(pack.nodes.engine, "settle_compiled_model", lambda *args: None)
    with pytest.raises(pack.dno.DNOError, match="TorchCompileModel") as caught:
        dno_sample(pack, compiled, vae, pos, neg, torch.zeros(1, 4, 8, 8), "sde", seed=5, opt_steps=2,
                   memory_mode=MODES[1])
    assert "store every step" in str(caught.value)
    assert caught.value.result is not None and len(caught.value.result.history) == 1


@pytest.mark.parametrize("use_compile", [False, True], ids=["eager", "TorchCompileModel"])
def test_cancel_before_the_first_sample_is_comfyuis_interrupt(pack, sd15, compiled, use_compile):
    """Cancel pressed before DNO scored a sample (here: before the node starts, so the settling call
    of a compiled model or the first render sees it): ComfyUI's own interrupt exception, which ends
    the prompt without a traceback, not an AttributeError on a missing result."""
    import comfy.model_management as mm
    model, vae, pos, neg = sd15
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            dno_sample(pack, compiled if use_compile else model, vae, pos, neg, torch.zeros(1, 4, 8, 8),
                       "sde", seed=5, opt_steps=2)
    finally:
        mm.interrupt_current_processing(False)
    out, _, history = dno_sample(pack, model, vae, pos, neg, torch.zeros(1, 4, 8, 8), "sde", seed=5,
                                 opt_steps=1)
    assert len(history["steps"]) == 2      # the next run is unaffected
