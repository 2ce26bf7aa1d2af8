"""The full-size architectures on the meta device: published sizes, the presets' LoRA targets,
the adapters' forward signature, and the memory model's measurement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tpgrpo.config import load_config
from tpgrpo.models import load_adapter
from tpgrpo.models.architectures import (
    ARCHITECTURES,
    FLUX1_DEV,
    SD35_MEDIUM,
    build_pipeline,
    build_transformer,
    lora_modules,
    lora_size,
    transformer_size,
)
from tpgrpo.models.memory import ActivationProfile, SavedActivations, fused_attention, profile_with_lora

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "presets").glob("*.yaml"))

SD3_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


@pytest.fixture(scope="module")
def transformers() -> dict[str, torch.nn.Module]:
    return {name: build_transformer(arch) for name, arch in ARCHITECTURES.items()}


def test_built_on_meta_without_memory(transformers):
    for transformer in transformers.values():
        assert {p.device.type for p in transformer.parameters()} == {"meta"}


def test_parameter_counts_match_the_published_sizes(transformers):
    sd3 = transformer_size(transformers[SD35_MEDIUM.name])
    flux = transformer_size(transformers[FLUX1_DEV.name])
    # SD3.5-Medium's "2.5 B" counts the 384 x 384 x 1536 position table diffusers keeps as a buffer.
    assert sd3.buffers == 384 * 384 * 1536
    assert sd3.parameters == 2_243_171_520
    assert sd3.total == pytest.approx(SD35_MEDIUM.published_parameters, rel=0.02)
    assert flux.parameters == 11_901_408_320
    assert flux.parameters == pytest.approx(FLUX1_DEV.published_parameters, rel=0.01)


def test_pipeline_components_match_the_published_sizes():
    """Text encoders and VAE: CLIP-L/14 (123.7 M with SD3's projection, 123.1 M without), OpenCLIP
    bigG/14 (694.7 M), the T5 v1.1 XXL encoder (4.76 B), the 16-channel VAE (83.8 M)."""
    counts = {}
    for arch in (SD35_MEDIUM, FLUX1_DEV):
        pipe = build_pipeline(arch, vocabulary=["a"])
        counts[arch.family] = {n: sum(p.numel() for p in m.parameters()) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert counts["sd3"]["text_encoder"] == 123_650_304
    assert counts["sd3"]["text_encoder_2"] == 694_659_840
    assert counts["sd3"]["text_encoder_3"] == counts["flux"]["text_encoder_2"] == 4_762_310_656
    assert counts["flux"]["text_encoder"] == 123_060_480
    assert counts["sd3"]["vae"] == counts["flux"]["vae"] == 83_819_683


def _hand_lora_count(family: str, rank: int) -> tuple[int, int]:
    """(modules, parameters) of the presets' LoRA, worked out from the published block layouts.

    SD3.5-Medium: 24 joint blocks of width 1536, 8 square projections each (q, k, v, out and the
    context stream's add_q/k/v, to_add_out), except the last block, whose context stream ends
    before its output projection (no to_add_out); the dual-attention blocks' second attention is
    attn2, which the "attn." targets do not select.
    FLUX.1-dev: 19 double-stream blocks of width 3072 with 8 square projections and 4 feed-forward
    linears (3072 <-> 12288, image and context); 38 single-stream blocks with q, k, v only.
    """
    if family == "sd3":
        modules = 24 * 8 - 1
        return modules, modules * rank * (1536 + 1536)
    double = 8 * (3072 + 3072) + 4 * (3072 + 12288)
    single = 3 * (3072 + 3072)
    return 19 * 12 + 38 * 3, rank * (19 * double + 38 * single)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_lora_resolves_on_its_architecture(preset, transformers):
    cfg = load_config(ROOT / "params.yaml", preset=preset)
    assert cfg.model.path in ARCHITECTURES, f"{preset.name}: model.path is not a known hub id"
    arch = ARCHITECTURES[cfg.model.path]
    assert arch.family == cfg.model.family
    size = lora_size(transformers[arch.name], cfg.train.lora_targets, cfg.train.lora_rank)
    print(f"{preset.stem}: LoRA r{size.rank} on {len(size.modules)} modules, {size.parameters:,} parameters")
    assert (len(size.modules), size.parameters) == _hand_lora_count(arch.family, cfg.train.lora_rank)
    # peft itself, on the same meta module tree, wraps exactly those modules.
    from peft import LoraConfig

    transformer = build_transformer(arch)
    transformer.add_adapter(LoraConfig(r=cfg.train.lora_rank, target_modules=list(cfg.train.lora_targets)))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_modules() if n.endswith(".lora_A")}
    assert wrapped == set(size.modules)
    trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    assert trainable == size.parameters


def test_lora_targets_that_match_nothing_or_a_non_linear_are_refused(transformers):
    sd3 = transformers[SD35_MEDIUM.name]
    with pytest.raises(ValueError, match="'attn.to_qq' matches no module"):
        lora_modules(sd3, ["attn.to_q", "attn.to_qq"])
    with pytest.raises(ValueError, match="not a linear layer"):
        lora_modules(sd3, ["norm1"])


@pytest.mark.parametrize("arch", [SD35_MEDIUM, FLUX1_DEV], ids=lambda a: a.family)
def test_adapter_velocity_fits_the_full_architecture_on_meta(arch):
    """Prompt encoding (CLIP + T5 at 128 tokens), latents at 512 px and one guided forward of the
    full-size model through the adapter, all on meta: every shape the adapter hands the
    transformer (text embeddings, pooled projections, guidance, packed latents) fits."""
    pipe = build_pipeline(arch, "meta", torch.bfloat16, vocabulary=["a", "cat"])
    adapter = load_adapter(pipe, max_sequence_length=128)
    embeds = adapter.encode_prompts(["a cat", "a"], guidance_scale=4.5)
    if arch.family == "sd3":
        assert embeds.prompt_embeds.shape == (2, 77 + 128, 4096)
        assert embeds.pooled_prompt_embeds.shape == (2, 768 + 1280)
        assert embeds.has_negative
    else:
        assert embeds.prompt_embeds.shape == (2, 128, 4096)
        assert embeds.pooled_prompt_embeds.shape == (2, 768)
        assert not embeds.has_negative
    x = adapter.prepare_latents(2, None, 512, 512)
    assert x.shape == (2, 16, 64, 64)
    v = adapter.velocity(x, torch.tensor([900.0, 500.0], device="meta"), embeds, 4.5)
    assert v.shape == x.shape and v.device.type == "meta" and v.dtype == torch.bfloat16


def test_saved_activations_count_each_storage_once_and_skip_weights():
    """A hand-worked MLP: linear1 saves its input x (for its weight's gradient), relu saves its
    output h, linear2 saves its input, which is h again: x + h bytes, the weights not counted."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    with SavedActivations(mlp.parameters()) as rec:
        mlp(x).sum()
    assert rec.total == 5 * 8 * 4 + 5 * 16 * 4
    with SavedActivations() as everything:
        mlp(x).sum()
    assert everything.total > rec.total  # the weights autograd keeps count when not excluded
    # A view shares its base's storage: sin saves x, cos saves the view x.t(): x's bytes once.
    x = torch.randn(4, 6, requires_grad=True)
    with SavedActivations() as views:
        x.sin(), x.t().cos()
    assert views.total == 4 * 6 * 4


def test_checkpointed_bytes_by_hand():
    profile = ActivationProfile(rows=2, saved=100, block_saved=(30, 40, 20), block_inputs=(5, 6, 7))
    # outside the blocks 10, every block's inputs 18, the largest block recomputed 40.
    assert profile.checkpointed == 10 + 18 + 40


def test_fused_attention_is_the_same_attention():
    q, k, v = (torch.randn(2, 3, 7, 16) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with fused_attention():
        got = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("arch", [SD35_MEDIUM, FLUX1_DEV], ids=lambda a: a.family)
def test_meta_measurement_equals_a_real_forward(arch):
    """The memory model's premise: the architecture shrunk by 16, measured on meta and on the CPU
    with real weights, saves the same bytes. (The CPU's norm kernels keep their statistics in
    bfloat16 where meta, like CUDA, keeps float32: under 0.5% at this size, less at full size.)"""
    small = arch.shrink(16)
    kwargs = dict(targets=["attn.to_q", "attn.to_k"], rank=4, latents=2, resolution=128, guidance_scale=4.5, max_sequence_length=16, autocast=False)
    meta = profile_with_lora(small, "meta", torch.bfloat16, **kwargs)
    cpu = profile_with_lora(small, "cpu", torch.bfloat16, **kwargs)
    assert cpu.rows == meta.rows == (4 if arch.family == "sd3" else 2)
    assert meta.saved == pytest.approx(cpu.saved, rel=5e-3)
    assert meta.block_saved == pytest.approx(cpu.block_saved, rel=5e-3)
    assert meta.block_inputs == cpu.block_inputs
    assert len(meta.block_saved) == small.transformer["num_layers"] + small.transformer.get("num_single_layers", 0)
    # Activations grow with the rows: twice the latents save about twice the bytes.
    double = profile_with_lora(small, "meta", torch.bfloat16, **{**kwargs, "latents": 4})
    assert double.saved == pytest.approx(2 * meta.saved, rel=0.05)


def test_readme_architecture_snippet_prints_what_it_says():
    """The README's snippet runs verbatim, and each line commented with a value evaluates to it."""
    import ast
    import re

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "build_transformer(arch)" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    checked = 0
    for line in block.splitlines():
        code, _, comment = line.partition("#")
        literal = re.match(r"\s*(\([^)]*\)|[\d_]+)", comment)
        if literal and code.strip() and "=" not in code:
            assert eval(code, namespace) == ast.literal_eval(literal.group(1)), line
            checked += 1
    assert checked == 2
