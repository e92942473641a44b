"""DualAnoDiff's background compensation (BCM) against the official maths, on the tiny U-Net.

The official code (``bcm-dual-interrelated_diff/``: ``LoRAAttnProcessor2_0`` of its diffusers fork,
``ReferenceOnlyAttnProc``, ``RefOnlyNoisedUNet`` in ``train_dreambooth_lora_single_background.py`` /
``inference_test_tempt.py``, and the ``prompt_blend/prompt_fg`` StableDiffusionPipeline loop) is written out below
from its maths, with its parameter names, as diffusers attention processors on a second copy of the same U-Net.
Our side loads the SAME official-named weights through the converter (preprocessing/convert_official_dualanodiff.py).
Checked: training forward and gradients (per-pair timesteps), sampling with and without the guidance batch,
the background image, the converter's official-file round trip and the BCM weights I/O.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.bcm_reference_attention import BackgroundCondition, BCMDualLoRAUNet, noised_condition
from models.dual_lora import DualLoRAUNet
from preprocessing.convert_official_dualanodiff import convert_official_state_dict

_BASE = {}


def _unet():
    if "unet" not in _BASE:
        from preprocessing.tiny_sd15 import build_tiny_unet

        _BASE["unet"] = build_tiny_unet(0)
    return copy.deepcopy(_BASE["unet"])


# ------------------------------------------------------------------------------------------ official maths
class OfficialLoRALinearLayer(nn.Module):
    """``up(down(x))`` (no network alpha: scale 1)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x):
        return self.up(self.down(x))


def _sdpa_heads(q, k, v, heads):
    b = q.shape[0]
    d = q.shape[-1] // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, heads * d)


class OfficialLoRAAttnProcessor2_0(nn.Module):
    """The official dual processor: mode "w" = branch-0 LoRA attention alone; otherwise per branch i of the
    "(b f)" batch LoRA set i (branch 0's keys/values from ``(1 - temporal_a) h + temporal_a
    temporal_condition_mlp(condition_encoder_state)`` when a condition state is given), then the temporal_*
    attention over the two branch tokens of every position, added residually. ``bcm=False``: the
    dual-interrelated_diff processor (no condition parameters)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int | None, rank: int, bcm: bool = True):
        super().__init__()
        ctx = cross_attention_dim or hidden_size
        self.frames = 2
        self.to_q_lora = nn.ModuleList(
            [OfficialLoRALinearLayer(hidden_size, hidden_size, rank) for _ in range(2)]
        )
        self.to_k_lora = nn.ModuleList([OfficialLoRALinearLayer(ctx, hidden_size, rank) for _ in range(2)])
        self.to_v_lora = nn.ModuleList([OfficialLoRALinearLayer(ctx, hidden_size, rank) for _ in range(2)])
        self.to_out_lora = nn.ModuleList(
            [OfficialLoRALinearLayer(hidden_size, hidden_size, rank) for _ in range(2)]
        )
        self.temporal_i = nn.Linear(hidden_size, hidden_size)
        self.temporal_n = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.temporal_q = nn.Linear(hidden_size, hidden_size)
        self.temporal_k = nn.Linear(hidden_size, hidden_size)
        self.temporal_v = nn.Linear(hidden_size, hidden_size)
        self.temporal_o = nn.Linear(hidden_size, hidden_size)
        if bcm:
            self.temporal_condition_mlp = nn.Sequential(
                nn.Linear(hidden_size, 320), nn.Linear(320, hidden_size)
            )
            self.temporal_a = nn.Parameter(torch.Tensor([0]))

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        mode="r",
        ref_dict=None,
        is_cfg_guidance=False,
        timestep=None,
        condition_encoder_state=None,
    ):
        if mode == "w":
            ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            q = attn.to_q(hidden_states) + self.to_q_lora[0](hidden_states)
            k = attn.to_k(ctx) + self.to_k_lora[0](ctx)
            v = attn.to_v(ctx) + self.to_v_lora[0](ctx)
            h = _sdpa_heads(q, k, v, attn.heads)
            return attn.to_out[1](attn.to_out[0](h) + self.to_out_lora[0](h))
        bf, n, c = hidden_states.shape
        hs = hidden_states.reshape(bf // 2, 2, n, c)  # (b f) d c -> b f d c
        ctxs = (
            None
            if encoder_hidden_states is None
            else encoder_hidden_states.reshape(bf // 2, 2, -1, encoder_hidden_states.shape[-1])
        )
        outs = []
        for i in range(self.frames):
            x = hs[:, i]
            e = x if ctxs is None else ctxs[:, i]
            q = attn.to_q(x) + self.to_q_lora[i](x)
            if condition_encoder_state is not None and i == 0:
                cond = self.temporal_condition_mlp(condition_encoder_state)
                e = (1 - self.temporal_a) * e + self.temporal_a * cond
            k = attn.to_k(e) + self.to_k_lora[i](e)
            v = attn.to_v(e) + self.to_v_lora[i](e)
            h = _sdpa_heads(q, k, v, attn.heads)
            outs.append(attn.to_out[1](attn.to_out[0](h) + self.to_out_lora[i](h)))
        h = torch.stack(outs, dim=1).reshape(bf, n, c)  # f b d c -> (b f) d c
        x = self.temporal_i(self.temporal_n(h))
        x = x.reshape(bf // 2, 2, n, c).transpose(1, 2).reshape(-1, 2, c)  # (b f) d c -> (b d) f c
        x = F.scaled_dot_product_attention(self.temporal_q(x), self.temporal_k(x), self.temporal_v(x))
        x = self.temporal_o(x)
        x = x.reshape(bf // 2, n, 2, c).transpose(1, 2).reshape(bf, n, c)  # (b d) f c -> (b f) d c
        return h + x


class OfficialReferenceOnlyAttnProc(nn.Module):
    """Self-attention wrapper: mode "w" stores its input tokens under its name, mode "r" pops them and passes
    them to the chained processor as ``condition_encoder_state``. (The reference's ``is_cfg_guidance=True``
    branch calls the chained processor without ``mode`` and cannot run; its inference leaves it False.)"""

    def __init__(self, chained_proc, enabled=False, name=None):
        super().__init__()
        self.enabled = enabled
        self.chained_proc = chained_proc
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        mode="w",
        ref_dict=None,
        is_cfg_guidance=False,
        timestep=None,
    ):
        condition_encoder_state = None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        if self.enabled:
            if mode == "w":
                ref_dict[self.name] = encoder_hidden_states
            elif mode == "r":
                condition_encoder_state = ref_dict.pop(self.name)
        return self.chained_proc(
            attn,
            hidden_states,
            encoder_hidden_states,
            attention_mask,
            mode=mode,
            condition_encoder_state=condition_encoder_state,
        )


def official_unet(base, rank: int, bcm: bool, seed: int):
    """A copy of ``base`` with the official processors (random weights) and its official-format state dict
    (``unet.<processor name>[.chained_proc].<param>``, what AttnProcsLayers + save_lora_weights write)."""
    unet = copy.deepcopy(base)
    procs = {}
    for name, attn in ((n, m) for n, m in unet.named_modules() if n.endswith(("attn1", "attn2"))):
        cross = attn.is_cross_attention
        proc = OfficialLoRAAttnProcessor2_0(
            attn.to_q.out_features, unet.config.cross_attention_dim if cross else None, rank, bcm=bcm
        )
        key = f"{name}.processor"
        procs[key] = (
            OfficialReferenceOnlyAttnProc(proc, enabled=True, name=key) if bcm and not cross else proc
        )
    unet.set_attn_processor(procs)
    unet.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for n, p in unet.named_parameters():
        if ".processor." not in n:
            continue
        with torch.no_grad():
            if n.endswith("temporal_a"):
                p.copy_(0.3 + 0.4 * torch.rand(1, generator=g))
            elif "temporal_n.weight" in n:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(
                    torch.randn(p.shape, generator=g)
                    * (0.3 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.1)
                )
        p.requires_grad_(True)
        state[f"unet.{n}"] = p
    return unet, state


def official_ref_only_noised_unet(
    unet, sample, timestep, encoder_hidden_states, cond_lat, noise, sched, training
):
    """RefOnlyNoisedUNet.forward: noise the condition to the pair's timestep, write pass with each pair's first
    (blend) prompt, read pass on the "(b f)" batch."""
    if training:
        condition_timestep = timestep.reshape(-1, 2)[:, 0]  # '(b f) -> b f', [0]
    else:
        condition_timestep = timestep
    noisy_cond_lat = sched.add_noise(cond_lat, noise, condition_timestep.reshape(-1))
    noisy_cond_lat = sched.scale_model_input(noisy_cond_lat, condition_timestep)
    ref_dict = {}
    condition_encoder_hidden_states = encoder_hidden_states.reshape(-1, 2, *encoder_hidden_states.shape[1:])[
        :, 0
    ]
    unet(
        noisy_cond_lat,
        condition_timestep,
        encoder_hidden_states=condition_encoder_hidden_states,
        cross_attention_kwargs=dict(mode="w", ref_dict=ref_dict),
    )
    return unet(
        sample,
        timestep,
        encoder_hidden_states,
        cross_attention_kwargs=dict(mode="r", ref_dict=ref_dict, is_cfg_guidance=False),
    ).sample


def _bf(a, b):
    """[blend], [fg] -> the official "(b f)" layout."""
    return torch.stack([a, b], dim=1).flatten(0, 1)


def _ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )


def _ours_from_official(base, state, bcm=True, rank=3):
    converted = convert_official_state_dict(state)
    cls = BCMDualLoRAUNet if bcm else DualLoRAUNet
    model = cls(copy.deepcopy(base), rank=rank, interaction_preset="official", interaction_init="default")
    model.load_trainable_state_dict(converted.unet)
    return model, converted


# ------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def bcm_models():
    """(official U-Net, its official-format state dict, ours loaded from it through the converter, converted)."""
    base = _unet()
    ref, state = official_unet(base, 3, bcm=True, seed=1)
    ours, converted = _ours_from_official(base, state, rank=3)
    return ref, state, ours, converted


def test_training_forward_and_gradients_equal_the_official_maths(bcm_models):
    ref, state, ours, converted = bcm_models
    b = 2
    assert converted.config["background_compensation"] and converted.dropped  # attn2's unused BCM params
    ref.train(), ours.train()
    g = torch.Generator().manual_seed(2)
    xb, xf, cond, noise_c, tgt_b, tgt_f = (torch.randn(b, 4, 8, 8, generator=g) for _ in range(6))
    eb, ef = (torch.randn(b, 6, 32, generator=g) for _ in range(2))
    t = torch.tensor([50, 800])  # per-pair timesteps: the condition follows its pair's
    sched = _ddpm()

    pb, pf = ours(xb, xf, t, eb, ef, condition=noised_condition(sched, cond, noise_c, t))
    out = official_ref_only_noised_unet(
        ref, _bf(xb, xf), _bf(t, t), _bf(eb, ef), cond, noise_c, sched, training=True
    )
    torch.testing.assert_close(pb, out[0::2], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pf, out[1::2], atol=2e-5, rtol=1e-4)

    (F.mse_loss(pb, tgt_b) + F.mse_loss(pf, tgt_f)).backward()
    F.mse_loss(out, _bf(tgt_b, tgt_f)).mul(2).backward()
    ours_params = dict(ours.named_parameters())
    from preprocessing.convert_official_dualanodiff import official_to_our_key

    checked = 0
    for k, p in state.items():
        path, _, param = k[len("unet.") :].partition(".processor.")
        mapped = official_to_our_key(param.removeprefix("chained_proc."), path)
        if mapped is None:
            assert p.grad is None or p.grad.abs().max() == 0  # attn2's condition path is never used
            continue
        torch.testing.assert_close(ours_params[mapped].grad, p.grad, atol=1e-5, rtol=1e-3)
        checked += 1
    assert checked == len(converted.unet)
    mix = [v for k, v in ours_params.items() if k.endswith(".mix")]
    assert mix and all(m.grad.abs().max() > 0 for m in mix)

    # the background really matters
    pb2, _ = ours(xb, xf, t, eb, ef, condition=noised_condition(sched, cond + 1, noise_c, t))
    assert (pb2 - pb).abs().max() > 1e-4


def _official_pipeline_sample(
    unet, sched_kind, ddpm, latents0, pe_b, pe_f, neg, guidance, cond_lat, gen, steps
):
    """The prompt_blend/prompt_fg pipeline loop for one sample with RefOnlyNoisedUNet (a fresh condition noise
    draw per U-Net call, here from ``gen``); returns the final latents in "(b f)" order."""
    from models.schedulers import make_scheduler

    sched = make_scheduler(sched_kind, ddpm.config)
    do_cfg = guidance > 1.0
    prompt_embeds_blend = torch.cat([neg, pe_b]) if do_cfg else pe_b
    prompt_embeds_fg = torch.cat([neg, pe_f]) if do_cfg else pe_f
    prompt_embeds = _bf(prompt_embeds_blend, prompt_embeds_fg)
    sched.set_timesteps(steps)
    latents = latents0 * sched.init_noise_sigma
    for t in sched.timesteps:
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        latent_model_input = sched.scale_model_input(latent_model_input, t)
        noise = torch.randn(cond_lat.shape, generator=gen)
        noise_pred = official_ref_only_noised_unet(
            unet, latent_model_input, t, prompt_embeds, cond_lat, noise, ddpm, training=False
        )
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
        latents = sched.step(noise_pred, t, latents).prev_sample
    return latents


class _LatentsOut(nn.Module):
    """A VAE stand-in whose decoder is the identity: both sides are compared on the final latents."""

    config = type("Config", (), {"block_out_channels": [0], "scaling_factor": 1.0})()
    dtype = torch.float32

    def decode(self, z):
        return type("Decoded", (), {"sample": z})()


@pytest.mark.parametrize("guidance", [1.0, 2.0])
@torch.no_grad()
def test_sampling_equals_the_official_pipeline(guidance, tiny_assets, bcm_models):
    """Our sampler (eval.generate.sample_pairs) with a BackgroundCondition installed == the official pipeline
    loop, per sample, with and without the guidance batch ([negative; background] condition)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from eval.generate import sample_pairs

    ref, _, ours, _ = bcm_models
    steps, seeds = 2, [5, 9]
    ref.eval(), ours.eval()
    ddpm = _ddpm()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_assets["sd15"], subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_assets["sd15"], subfolder="text_encoder").eval()

    def embed(prompt):
        ids = tokenizer(
            [prompt], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        )
        return text_encoder(ids.input_ids)[0]

    pe_b, pe_f, neg = embed("a vfx with sks"), embed("sks"), embed("")
    g = torch.Generator().manual_seed(4)
    backgrounds, negatives = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    components = {
        "dual_unet": ours,
        "vae": _LatentsOut(),
        "scheduler": ddpm,
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
    }
    gens = [torch.Generator().manual_seed(100 + s) for s in seeds]
    source = BackgroundCondition(ddpm, backgrounds, negatives if guidance > 1 else None, gens)
    kwargs = dict(scheduler="ddim", num_inference_steps=steps, guidance_scale=guidance, resolution=8)
    with ours.conditioned(source):
        blend, fg = sample_pairs(components, "a vfx with sks", "sks", seeds, **kwargs)
    for k, s in enumerate(seeds):
        latents0 = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(s))
        if guidance > 1:
            cond_lat = torch.cat([negatives[k : k + 1], backgrounds[k : k + 1]])
        else:
            cond_lat = backgrounds[k : k + 1]
        out = _official_pipeline_sample(
            ref,
            "pndm",
            ddpm,
            latents0,
            pe_b,
            pe_f,
            neg,
            guidance,
            cond_lat,
            torch.Generator().manual_seed(100 + s),
            steps,
        )
        torch.testing.assert_close(blend[k], out[0].clamp(-1, 1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fg[k], out[1].clamp(-1, 1), atol=1e-4, rtol=1e-4)
    assert (blend - fg).abs().max() > 1e-3
    with pytest.raises(ValueError, match="background condition"):
        sample_pairs(components, "a vfx with sks", "sks", seeds, **kwargs)


@torch.no_grad()
def test_dual_interrelated_official_unet_equals_ours():
    """The official dual-interrelated_diff variant (no BCM) through the converter, whole U-Net."""
    base, rank = _unet(), 2
    ref, state = official_unet(base, rank, bcm=False, seed=6)
    ours, converted = _ours_from_official(base, state, bcm=False, rank=rank)
    assert "background_compensation" not in converted.config and not converted.dropped
    g = torch.Generator().manual_seed(7)
    xb, xf = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    eb, ef = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    pb, pf = ours(xb, xf, torch.tensor(400), eb, ef)
    out = ref(_bf(xb, xf), torch.tensor(400), _bf(eb, ef), cross_attention_kwargs=dict(mode="r")).sample
    torch.testing.assert_close(pb, out[0::2], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pf, out[1::2], atol=2e-5, rtol=1e-4)


def test_converter_rejects_foreign_keys_and_names_them():
    with pytest.raises(ValueError, match="lora_unet_down"):
        convert_official_state_dict({"lora_unet_down.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="temporal_z"):
        from preprocessing.convert_official_dualanodiff import official_to_our_key

        official_to_our_key("temporal_z.weight", "x.attn1")


def test_bcm_refuses_shared_mode_and_missing_condition():
    with pytest.raises(ValueError, match="interrelated"):
        BCMDualLoRAUNet(_unet(), rank=2, dual_mode="shared")
    model = BCMDualLoRAUNet(_unet(), rank=2)
    x = torch.zeros(1, 4, 8, 8)
    e = torch.zeros(1, 6, 32)
    with pytest.raises(ValueError, match="background condition"):
        model(x, x, 10, e, e)
    # a fresh model (mix = 0) is the dual model, whatever the condition
    plain = DualLoRAUNet(_unet(), rank=2)
    plain.load_trainable_state_dict(
        {k: v for k, v in model.trainable_state_dict().items() if "compensations" not in k}
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model(x + 1, x, 10, e, e, condition=torch.randn(1, 4, 8, 8))[0], plain(x + 1, x, 10, e, e)[0]
        )


@torch.no_grad()
def test_converter_cli_on_an_official_file(tiny_assets, bcm_models, tmp_path):
    """An official-format .bin (U-Net processors + text-encoder LoRA, as save_lora_weights writes it) through the
    CLI: the loaded model holds the official weights, and its text encoder computes the official monkey-patched
    ``proj(x) + up(down(x))``."""
    import copy as _copy

    from transformers import CLIPTextModel, CLIPTokenizer

    from models.dual_lora import load_dual_unet
    from preprocessing.convert_official_dualanodiff import main

    _, state, ours, _ = bcm_models
    text_encoder = CLIPTextModel.from_pretrained(tiny_assets["sd15"], subfolder="text_encoder").eval()
    g = torch.Generator().manual_seed(11)
    official = {k: v.detach().clone() for k, v in state.items()}
    lora = {}
    for name, module in text_encoder.named_modules():
        if name.endswith(".self_attn"):
            for proj, attr in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj")):
                lin = getattr(module, attr)
                down = torch.randn(2, lin.in_features, generator=g) * 0.2
                up = torch.randn(lin.out_features, 2, generator=g) * 0.2
                official[f"text_encoder.{name}.to_{proj}_lora.down.weight"] = down
                official[f"text_encoder.{name}.to_{proj}_lora.up.weight"] = up
                lora[f"{name}.{attr}"] = (down, up)
    src = tmp_path / "official" / "checkpoint-5000"
    src.mkdir(parents=True)
    torch.save(official, src / "pytorch_lora_weights.bin")
    out = tmp_path / "converted"
    args = ["--official_weights", str(src), "--output_dir", str(out)]
    assert main(args + ["--pretrained_model_name_or_path", str(tiny_assets["sd15"])]) == 0
    comps = load_dual_unet(tiny_assets["sd15"], out)
    assert comps["config"]["background_compensation"] and comps["config"]["text_encoder_rank"] == 2
    got = comps["dual_unet"].trainable_state_dict()
    want = ours.trainable_state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

    reference = _copy.deepcopy(text_encoder)  # the official _modify_text_encoder: forward = old(x) + lora(x)
    for path, (down, up) in lora.items():
        module = reference.get_submodule(path)
        module.forward = (lambda old, d, u: lambda x: old(x) + x @ d.T @ u.T)(module.forward, down, up)
    tok = CLIPTokenizer.from_pretrained(tiny_assets["sd15"], subfolder="tokenizer")
    ids = tok(
        ["a vfx with sks"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
    ).input_ids
    torch.testing.assert_close(comps["text_encoder"](ids)[0], reference(ids)[0], atol=1e-5, rtol=1e-4)
    assert (reference(ids)[0] - text_encoder(ids)[0]).abs().max() > 1e-3
