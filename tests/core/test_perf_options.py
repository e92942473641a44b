"""Throughput options (train/core/perf.py): where the math is the same each one gives the same numbers as the plain
path on CPU, each one demonstrably acts (a test that would pass with the option ignored is no test), and each
reaches every trainer through its flag / YAML key."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from train.core import CoreConfig, Optim, Task, make_accelerator, perf, run_training
from train.core.config import add_core_args, core_config_from_args, perf_settings


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _tiny_lora_unet(seed: int = 0) -> nn.Module:
    """The tiny SD-1.5-shaped U-Net with peft LoRA on the attention projections (stage 1's set-up)."""
    from preprocessing.tiny_sd15 import build_tiny_unet
    from train.anomaly.components import add_unet_lora

    unet = build_tiny_unet(seed)
    unet.requires_grad_(False)
    torch.manual_seed(seed + 1)
    add_unet_lora(unet, rank=2)
    return unet


def _unet_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor([10, 700])[:batch],
        torch.randn(batch, 77, 32, generator=g),
    )


def _lora_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ settings


def test_settings_are_validated_and_flags_reach_core_config(tmp_path):
    with pytest.raises(ValueError, match="compile: unknown value"):
        CoreConfig(output_dir="o", max_steps=1, compile=("unet",))
    with pytest.raises(ValueError, match="sdpa_backend: unknown value"):
        CoreConfig(output_dir="o", max_steps=1, sdpa_backend=["fast"])
    with pytest.raises(ValueError, match="dataloader_prefetch_factor"):
        CoreConfig(output_dir="o", max_steps=1, dataloader_prefetch_factor=0)
    with pytest.raises(ValueError, match="compile_mode"):
        CoreConfig(output_dir="o", max_steps=1, compile_mode="fastest")
    with pytest.raises(ValueError, match="unknown key.*'fused_adam'"):
        perf_settings({"fused_adam": True})
    assert CoreConfig(output_dir="o", max_steps=1, compile="model").compile == ("model",)  # YAML: one string
    assert perf_settings(None) == {}

    parser = argparse.ArgumentParser()
    add_core_args(parser)
    args = parser.parse_args(
        ["--output_dir", str(tmp_path), "--max_train_steps", "2", "--compile", "model", "dinov2"]
        + ["--compile_mode", "max-autotune", "--channels_last", "--fused_adamw", "--allow_tf32"]
        + ["--sdpa_backend", "flash", "math", "--skip_lora_input_cast", "--dataloader_pin_memory"]
        + ["--dataloader_prefetch_factor", "4", "--log_step_times"]
    )
    cfg = core_config_from_args(args, "t")
    assert cfg.compile == ("model", "dinov2") and cfg.compile_mode == "max-autotune"
    assert cfg.sdpa_backend == ("flash", "math") and cfg.dataloader_prefetch_factor == 4
    assert cfg.channels_last and cfg.fused_adamw and cfg.allow_tf32 and cfg.skip_lora_input_cast
    assert cfg.dataloader_pin_memory and cfg.log_step_times and not cfg.dataloader_persistent_workers
    defaults = core_config_from_args(parser.parse_args(["--output_dir", "o", "--max_train_steps", "1"]), "t")
    assert defaults.compile == () and defaults.sdpa_backend == () and not defaults.fused_adamw


def test_loader_kwargs():
    cfg = CoreConfig(output_dir="o", max_steps=1, dataloader_pin_memory=True, dataloader_prefetch_factor=4)
    got = perf.loader_kwargs(cfg, 2)
    assert got == {
        "num_workers": 2,
        "pin_memory": torch.cuda.is_available(),  # pinning only with a GPU to copy to
        "persistent_workers": False,
        "prefetch_factor": 4,
    }
    assert perf.loader_kwargs(cfg, 0) == {"num_workers": 0, "pin_memory": torch.cuda.is_available()}
    persistent = CoreConfig(output_dir="o", max_steps=1, dataloader_persistent_workers=True)
    assert perf.loader_kwargs(persistent, 2)["persistent_workers"] is True
    with pytest.raises(
        ValueError, match="set_epoch"
    ):  # per-epoch dataset state would never reach the workers
        perf.loader_kwargs(persistent, 2, epoch_state=True)
    # the argparse namespace of the anomaly trainers works as well (same names)
    ns = argparse.Namespace(dataloader_pin_memory=False, dataloader_prefetch_factor=None)
    assert perf.loader_kwargs(ns, 1) == {"num_workers": 1, "pin_memory": False, "persistent_workers": False}


# ----------------------------------------------------------------------------------------------- optimizer


def test_fused_adamw_matches_the_default_implementation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(5))
    x, y = torch.randn(4, 3, 6, 6), torch.randn(4, 5)
    model(x)  # materialise the lazy layer
    states = {}
    for fused in (False, True):
        m = copy.deepcopy(model)  # the same start for both
        cfg = CoreConfig(output_dir="o", max_steps=1, fused_adamw=fused)
        opt = perf.make_adamw(m.parameters(), cfg, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
        assert opt.defaults["fused"] is (True if fused else None)
        for _ in range(5):
            opt.zero_grad()
            F.mse_loss(m(x), y).backward()
            opt.step()
        states[fused] = {k: v.clone() for k, v in m.state_dict().items()}
    start = model.state_dict()
    assert all(not torch.equal(states[False][k], start[k]) for k in start)  # every parameter moved
    for k in states[False]:
        torch.testing.assert_close(states[True][k], states[False][k], rtol=1e-6, atol=1e-7)


def test_fused_adamw_falls_back_where_unsupported(caplog):
    p = nn.Parameter(torch.zeros(3, device="meta"))  # no fused kernel for the meta device
    cfg = CoreConfig(output_dir="o", max_steps=1, fused_adamw=True)
    with caplog.at_level("WARNING"):
        opt = perf.make_adamw([p], cfg, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults["fused"]
    assert "fused AdamW is not available" in caplog.text


# ---------------------------------------------------------------------------------------------- the network


def _train_steps(unet: nn.Module, steps: int = 2) -> dict[str, torch.Tensor]:
    """A few SGD steps (the optimizer is not what channels-last changes; AdamW would magnify the float
    rounding of near-zero gradients through its 1/sqrt(v))."""
    x, t, ehs = _unet_inputs()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        unet(x, t, encoder_hidden_states=ehs).sample.square().mean().backward()
        opt.step()
    return _lora_state(unet)


def test_channels_last_trains_the_same(tmp_path):
    from safetensors.torch import save_file

    plain, cl = _tiny_lora_unet(), _tiny_lora_unet()
    start = _lora_state(plain)
    perf.to_channels_last(cl, CoreConfig(output_dir="o", max_steps=1, channels_last=True))
    conv = cl.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    out = cl.conv_in(_unet_inputs()[0])
    assert out.is_contiguous(memory_format=torch.channels_last)  # the activations follow the weights
    trained = [p for p in cl.parameters() if p.requires_grad]
    assert trained and all(p.is_contiguous() for p in trained)  # trained weights keep the default layout
    a, b = _train_steps(plain), _train_steps(cl)
    assert all(not torch.equal(a[k], start[k]) for k in a if "lora_B" in k)  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    save_file(b, str(tmp_path / "lora.safetensors"))  # what every checkpoint writer does


class _CountCopies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.copies += 1
        return func(*args, **(kwargs or {}))


def test_skip_lora_input_cast_same_numbers_fewer_copies():
    """Under bf16 autocast with bf16 frozen weights and fp32 LoRA weights (the trainers' mixed-precision set-up)."""
    results = {}
    for skip in (False, True):
        unet = _tiny_lora_unet()
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
        perf.skip_lora_input_cast(unet, CoreConfig(output_dir="o", max_steps=1, skip_lora_input_cast=skip))
        x, t, ehs = _unet_inputs()
        counter = _CountCopies()
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, t, encoder_hidden_states=ehs).sample
        out.float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
        results[skip] = (out.detach(), grads, counter.copies)
    (out0, g0, n0), (out1, g1, n1) = results[False], results[True]
    assert torch.equal(out0, out1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert n1 < n0, (n0, n1)  # the fp32 copies of the LoRA layers' inputs are gone


def test_sdpa_backend_math_equals_default_and_restricts():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    with perf.sdpa_context(CoreConfig(output_dir="o", max_steps=1, sdpa_backend=["math"])):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        got = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit
    if not torch.cuda.is_available():  # the context really restricts: no efficient-attention kernel on CPU
        with perf.sdpa_context(CoreConfig(output_dir="o", max_steps=1, sdpa_backend=["efficient"])):
            with pytest.raises(RuntimeError, match="No viable backend|No available kernel"):
                F.scaled_dot_product_attention(q, k, v)


def test_compile_is_in_place_and_equal():
    """``compile_module`` keeps the module object and its parameter names; the traced graph (AOT autograd,
    without inductor's C++ code generation, which takes minutes on a 2-core CPU) gives the eager numbers,
    including a forward hook that stores features as the U-REPA model does."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, 4)
            self.features: dict[str, torch.Tensor] = {}
            self.conv.register_forward_hook(lambda m, i, o: self.features.__setitem__("conv", o))

        def forward(self, x):
            h = F.silu(self.conv(x))
            return self.head(h.mean(dim=(2, 3)))

    torch.manual_seed(0)
    eager = Net()
    compiled = Net()
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    cfg = CoreConfig(output_dir="o", max_steps=1, compile=["model"])
    perf.reset_compiled()
    assert perf.compile_module(compiled, cfg, "dinov2") is compiled and not perf._COMPILED  # not requested
    assert perf.compile_module(compiled, cfg, "model", backend="aot_eager") is compiled
    assert type(compiled) is Net and list(compiled.state_dict()) == keys
    assert perf._COMPILED == [("model", "Net")]
    x = torch.randn(2, 3, 8, 8)
    for m in (eager, compiled):
        m(x).square().sum().backward()
    torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled.features["conv"], eager.features["conv"])
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-6, msg=n)
    perf.reset_compiled()


# ---------------------------------------------------------------------------------------------- the core


def _run_core_task(tmp_path: Path, **settings):
    """A Linear model trained by the core for 2 steps; returns (losses.jsonl rows, what the step saw)."""
    _reset_accelerate()
    cfg = CoreConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        report_to=None,
        log_every=2,
        checkpointing_steps=0,
        mixed_precision="no",
        **settings,
    )
    accelerator = make_accelerator(cfg)
    model = nn.Linear(8, 4)
    opt = perf.make_adamw(model.parameters(), cfg, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x = torch.randn(5, 8)  # no grad: the backward computes the weight gradient only
    seen = []

    def step_fn(micro, ctx):
        seen.append(
            {"flash": torch.backends.cuda.flash_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}
        )
        loss = model(micro[0]).square().mean()
        ctx.backward(loss)
        return {"loss": loss.detach(), "host_number": 0.5}

    task = Task(
        step_fn=step_fn,
        batches=lambda start: itertools.repeat(x),
        optims=[Optim("m", opt, sched, list(model.parameters()))],
        train_modules=[model],
    )
    run_training(accelerator, cfg, task)
    rows = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    return rows, seen


def test_core_enters_the_sdpa_context_and_logs_step_times(tmp_path):
    rows, seen = _run_core_task(tmp_path, sdpa_backend=["math"], log_step_times=True)
    assert seen == [{"flash": False, "math": True}] * 2  # the step function runs inside sdpa_kernel
    assert torch.backends.cuda.flash_sdp_enabled()  # and only the step function
    (row,) = rows
    assert row["host_number"] == 0.5  # plain numbers from a step function are logged as before
    for key in perf.StepTimer.KEYS:
        assert row[key] >= 0
    # FLOPs of one step, counted by hand: forward addmm 2*5*8*4, backward mm for the weight gradient 2*4*5*8
    assert row["flops_per_step"] == 2 * 5 * 8 * 4 + 2 * 4 * 5 * 8
    plain, seen_plain = _run_core_task(tmp_path / "plain")
    assert seen_plain == [{"flash": True, "math": True}] * 2
    assert not any(k in plain[0] for k in (*perf.StepTimer.KEYS, "flops_per_step"))


def test_a_compile_target_the_trainer_does_not_have_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no \\['dinov2'\\] network to compile"):
        _run_core_task(tmp_path, compile=["dinov2"])


# ---------------------------------------------------------------------------------------------- trainers


@pytest.fixture
def record_compile(monkeypatch):
    """``nn.Module.compile`` replaced by a recorder: the wiring is tested without minutes of compilation."""
    compiled: list[str] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    return compiled


def _run_trainer(name: str, tiny, out: Path, steps: int, extra: list[str]) -> list[dict]:
    from tests.core.trainers import TRAINERS

    _reset_accelerate()
    t = TRAINERS[name]
    t.main()(t.argv(tiny, out, steps, None, extra))
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


DINO_LOSS = [
    "--use_dinov2_loss", "--dinov2_model_name", "tiny14", "--dinov2_feature_layers", "1", "3",
    "--dinov2_resolution", "28", "--dinov2_loss_weight", "0.1",
]  # fmt: skip


def test_stage1_with_every_option_trains_the_same(tiny_assets, tmp_path, record_compile):
    from safetensors.torch import load_file

    dino = DINO_LOSS + ["--dinov2_weights", str(tiny_assets["dinov2_official"])]
    options = ["--channels_last", "--fused_adamw", "--skip_lora_input_cast", "--sdpa_backend", "math"]
    options += [
        "--dataloader_pin_memory",
        "--dataloader_prefetch_factor",
        "2",
        "--dataloader_num_workers",
        "1",
    ]
    options += ["--log_step_times", "--allow_tf32", "--compile", "model", "dinov2"]
    base = _run_trainer("stage1", tiny_assets, tmp_path / "base", 2, dino)
    fast = _run_trainer("stage1", tiny_assets, tmp_path / "fast", 2, dino + options)
    assert record_compile == ["UNet2DConditionModel", "DINOv2Encoder"]
    assert base[0]["loss"] == pytest.approx(fast[0]["loss"], rel=1e-5)
    assert base[1]["loss"] == pytest.approx(fast[1]["loss"], rel=1e-4)
    assert all(k in fast[-1] for k in perf.StepTimer.KEYS) and "flops_per_step" not in fast[-1]  # compiled
    a = load_file(str(tmp_path / "base" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "fast" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    # AdamW moves each weight by at most ~lr = 1e-3 per step, and by about that much even for a gradient near 0,
    # whose sign float rounding (other kernels) can flip: allow 1 % of the largest possible movement per tensor.
    for k in a:
        bound = 1e-2 * 1e-3 * 2 * a[k].numel() ** 0.5
        assert (b[k] - a[k]).norm() <= bound, (k, float((b[k] - a[k]).norm()), bound)


def test_train_sd15_perf_section(tiny_assets, tmp_path):
    sets = ["perf.channels_last=true", "perf.fused_adamw=true", "perf.skip_lora_input_cast=true"]
    sets += ["perf.sdpa_backend=[math]", "perf.log_step_times=true", "perf.dataloader_prefetch_factor=2"]
    base = _run_trainer("sd15", tiny_assets, tmp_path / "base", 2, [])
    fast = _run_trainer("sd15", tiny_assets, tmp_path / "fast", 2, sets)
    assert [r["loss"] for r in fast] == pytest.approx([r["loss"] for r in base], rel=1e-4)
    assert fast[-1]["flops_per_step"] > 0 and all(k in fast[-1] for k in perf.StepTimer.KEYS)
    with pytest.raises(KeyError, match="unknown key"):  # a typo in a perf key is refused by --set
        _run_trainer("sd15", tiny_assets, tmp_path / "typo", 1, ["perf.fused_adam=true"])


@pytest.mark.parametrize("name", ["dinovq", "latent_head"])
def test_compile_and_fused_reach_dinovq_and_the_latent_head(name, tiny_assets, tmp_path, record_compile):
    if name == "dinovq":
        extra = ["perf.compile=[model,dinov2]", "perf.fused_adamw=true", "perf.log_step_times=true"]
        expected = ["TokenTransformer"] * 3 + ["DINOv2Encoder"]
    else:
        extra = ["--compile", "model", "dinov2", "--fused_adamw", "--channels_last", "--log_step_times"]
        expected = ["LatentDINOv2", "DINOv2Encoder"]
    rows = _run_trainer(name, tiny_assets, tmp_path / name, 1, extra)
    assert record_compile == expected
    assert rows[-1]["time_forward_s"] > 0 and torch.isfinite(torch.tensor(rows[-1]["loss"]))
