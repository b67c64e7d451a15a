"""
The model through bridge_kernels' Triton kernels (attention with key mask, fused add+LayerNorm of every bridge
and post-LN residual) gives the torch path's outputs and gradients. On a CPU, Triton runs in its interpreter,
which must be switched on before triton is imported: hence a fresh Python process.
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import torch
    import bridge_kernels as bk
    from model import BridgeTower, BridgeTowerConfig
    torch.manual_seed(0)
    torch.set_num_threads(1)
    calls = []  # the Triton entry points the dispatcher calls: a model that ignored kernels= would compare nothing
    for name in ("attention", "add_layer_norm"):
        setattr(bk, name, lambda *args, kernel=getattr(bk, name), name=name: calls.append(name) or kernel(*args))

    def build(kernels):
        # no dropout: Triton draws its own dropout masks, so only the deterministic paths compare
        config = BridgeTowerConfig.preset("tiny", vocab_size=120, link_tower_type="scaled_add", heads=("itm",),
                                          hidden_dropout=0.0, attention_dropout=0.0, kernels=kernels)
        return BridgeTower(config)

    ref, tri = build("torch"), build("triton")
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 0:
                p.fill_(0.7)  # the bridge scalars, away from their init
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(5, 120, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    pixels = torch.randn(2, 3, 64, 64)
    a = ref(ids, attention_mask=mask, pixel_values=pixels).itm_logits
    assert not calls
    b = tri(ids, attention_mask=mask, pixel_values=pixels).itm_logits
    assert set(calls) == {"attention", "add_layer_norm"}, calls
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(ref.named_parameters(), tri.parameters()):
        # key biases get no gradient in exact arithmetic (softmax ignores a per-row constant): both are ~1e-12 noise
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    print("ok")
""")


# GPU training's setting: bf16 autocast, so the kernels get bf16 activations beside fp32 residuals and parameters
AUTOCAST_SCRIPT = textwrap.dedent("""
    import torch
    import bridge_kernels as bk
    from model import BridgeTower, BridgeTowerConfig
    torch.manual_seed(0)
    torch.set_num_threads(1)
    calls = []  # the Triton entry points the dispatcher calls: a model that ignored kernels= would compare nothing
    for name in ("attention", "add_layer_norm"):
        setattr(bk, name, lambda *args, kernel=getattr(bk, name), name=name: calls.append(name) or kernel(*args))

    def build(kernels):
        config = BridgeTowerConfig.preset("tiny", vocab_size=120, link_tower_type="interpolate", heads=("mlm", "itm"),
                                          hidden_dropout=0.0, attention_dropout=0.0, kernels=kernels)
        return BridgeTower(config)

    ref, tri = build("torch"), build("triton")
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(5, 120, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    pixels = torch.randn(2, 3, 64, 64)
    outs = []
    for model in (ref, tri):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, attention_mask=mask, pixel_values=pixels)
        (out.itm_logits.float().sum() + out.mlm_logits.float().logsumexp(-1).sum()).backward()
        outs.append(out)
        assert set(calls) == (set() if model is ref else {"attention", "add_layer_norm"}), calls
    for name in ("itm_logits", "mlm_logits", "text_features", "image_features", "pooler_output"):
        a, b = (getattr(o, name).float() for o in outs)
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err < 2e-2, f"{name}: relative error {err:.2e} under bf16 autocast"
    for (name, p), q in zip(ref.named_parameters(), tri.parameters()):
        assert q.grad is not None and torch.isfinite(q.grad).all(), name
        if name.endswith("key.bias"):
            continue  # no gradient in exact arithmetic (softmax ignores a per-row constant): bf16 noise on both sides
        err = ((q.grad - p.grad).norm() / p.grad.norm()).item()
        assert err < 0.05, f"{name}: gradient relative error {err:.2e} under bf16 autocast"
    print("ok")
""")


@pytest.mark.parametrize("script", [SCRIPT, AUTOCAST_SCRIPT], ids=["fp32", "bf16_autocast"])
def test_model_with_triton_kernels(script):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", BRIDGETOWER_KERNELS="", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
