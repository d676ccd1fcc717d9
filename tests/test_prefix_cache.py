"""apt.prefix_cache: cached and uncached training give the same losses, on the real tiny pi0/pi0.5.

"Same" is bit for bit with ``prefix_cache_dtype='model'`` (the dtype the prefix is computed in),
and within the documented bound with bfloat16/float16 storage. The cache must also miss when the
frame or the frozen weights change, refuse augmented frames, and never serve sampling.
"""

from __future__ import annotations

import pytest
import torch

from apt_plugins import AptConfig, AptConfigError, PrefixCache, PrefixCacheError
from apt_plugins.prefix_cache import content_key, parse_memory_budget
from apt_plugins_lerobot_pi.modeling import prefix_cache_of
from apt_plugins_lerobot_pi.testing import IMAGE_KEY, PiConformanceKit

ADAPTERS = ["lerobot_pi0", "lerobot_pi05"]
STAGES = {
    "stage1": dict(stage=1),
    "stage2_frozen": dict(stage=2),
    "stage2_unmasked": dict(stage=2, inherited_layers_keep_language_mask=False),
}
#: Documented in docs/benchmarks.md ("Cached prefix"): relative change of the loss with half-precision storage.
HALF_PRECISION_LOSS_BOUND = 1e-3


def _cat(*batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _grads(policy):
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def _loss_and_grads(kit, policy, batch, seed=0):
    policy.zero_grad(set_to_none=True)
    loss = kit.loss(policy, batch, seed=seed)
    loss.backward()
    return loss.detach(), _grads(policy)


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_cached_loss_and_gradients_equal_uncached_bit_for_bit(adapter, stage):
    kit = PiConformanceKit(adapter)
    plain = kit.build(AptConfig(**STAGES[stage]), seed=1)
    cached = kit.build(AptConfig(**STAGES[stage], prefix_cache="memory:64MB", prefix_cache_dtype="model"), seed=1)
    batch = kit.make_batch(seed=3)
    want_loss, want_grads = _loss_and_grads(kit, plain, batch)
    for epoch in range(2):  # epoch 0 fills the cache, epoch 1 reads it
        loss, grads = _loss_and_grads(kit, cached, batch)
        assert torch.equal(loss, want_loss), f"epoch {epoch}: {float(loss)} != {float(want_loss)}"
        assert grads.keys() == want_grads.keys()
        for name, g in grads.items():
            assert torch.equal(g, want_grads[name]), f"epoch {epoch}: gradient of {name} differs"
    stats = prefix_cache_of(cached.model).stats()
    assert (stats["misses"], stats["hits"]) == (2, 2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_half_precision_storage_stays_within_the_documented_bound(adapter, dtype):
    kit = PiConformanceKit(adapter)
    plain = kit.build(AptConfig(stage=1), seed=1)
    cached = kit.build(AptConfig(stage=1, prefix_cache="memory:64MB", prefix_cache_dtype=dtype), seed=1)
    batch = kit.make_batch(seed=4)
    want = kit.loss(plain, batch)
    first, second = kit.loss(cached, batch), kit.loss(cached, batch)
    assert torch.equal(first, second), "a cached frame must give the same prefix in every epoch"
    assert abs(float(first.detach()) - float(want.detach())) <= HALF_PRECISION_LOSS_BOUND * abs(float(want.detach()))
    stats = prefix_cache_of(cached.model).stats()
    model_bytes = kit.build(AptConfig(stage=1, prefix_cache="memory:64MB", prefix_cache_dtype="model"), seed=1)
    kit.loss(model_bytes, batch)
    assert stats["bytes_per_frame"] * 2 == prefix_cache_of(model_bytes.model).stats()["bytes_per_frame"]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_batches_assembled_from_other_batches_entries(adapter):
    """Frames cached in different batches, served together: only the frames not cached yet run the VLM.

    The VLM then ran on other batch compositions, which changes float rounding (not the function).
    """
    kit = PiConformanceKit(adapter)
    cfg = dict(stage=2)
    plain = kit.build(AptConfig(**cfg), seed=2)
    cached = kit.build(AptConfig(**cfg, prefix_cache="memory:64MB", prefix_cache_dtype="model"), seed=2)
    a, b, c = kit.make_batch(seed=10), kit.make_batch(seed=11), kit.make_batch(seed=12)
    kit.loss(cached, a), kit.loss(cached, b)
    mixed = _cat({k: v[1:] for k, v in a.items()}, {k: v[:1] for k, v in b.items()}, c)  # 2 hits, 2 misses
    cache = prefix_cache_of(cached.model)
    misses = cache.misses
    got, want = kit.loss(cached, mixed), kit.loss(plain, mixed)
    assert cache.misses - misses == 2
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_stage1_entries_ignore_the_instruction_and_stay_language_blind(adapter):
    kit = PiConformanceKit(adapter)
    policy = kit.build(AptConfig(stage=1, prefix_cache="memory:64MB", prefix_cache_dtype="model"), seed=1)
    losses = [kit.loss(policy, kit.make_batch(instruction=i, seed=5)) for i in range(3)]
    cache = prefix_cache_of(policy.model)
    assert (cache.misses, cache.hits) == (2, 4), "other instructions must reuse the same Stage-1 entries"
    assert all(torch.equal(losses[0], x) for x in losses[1:])
    changed = kit.probes(kit.make_batch(seed=5))
    for name, probe in changed.items():  # images and state still reach the prefix (pi0.5: state tokens)
        assert not torch.equal(kit.loss(policy, probe), losses[0]), f"probe {name} did not change the loss"


def test_changed_frozen_weights_never_hit_old_entries():
    kit = PiConformanceKit("lerobot_pi0")
    cached = kit.build(AptConfig(stage=1, prefix_cache="memory:64MB", prefix_cache_dtype="model"), seed=1)
    other = kit.build(AptConfig(stage=1), seed=7)
    batch = kit.make_batch(seed=6)
    kit.loss(cached, batch)
    vision = "model.paligemma_with_expert.paligemma.model.vision_tower."
    cached.load_state_dict({k: v for k, v in other.state_dict().items() if k.startswith(vision)}, strict=False)
    reference = kit.build(AptConfig(stage=1), seed=1)
    reference.load_state_dict({k: v for k, v in other.state_dict().items() if k.startswith(vision)}, strict=False)
    assert torch.equal(kit.loss(cached, batch), kit.loss(reference, batch))
    assert prefix_cache_of(cached.model).hits == 0


def test_augmented_frames_are_refused_and_leave_no_trace():
    kit = PiConformanceKit("lerobot_pi0")
    policy = kit.build(AptConfig(stage=1, prefix_cache="memory:64MB"), seed=1)
    batch = kit.make_batch(seed=8)
    batch["index"] = torch.tensor([40, 41])
    kit.loss(policy, batch)
    augmented = dict(batch)
    augmented[IMAGE_KEY] = (batch[IMAGE_KEY] * 0.9).clamp(0, 1)  # a brightness jitter of the same frames
    cache = prefix_cache_of(policy.model)
    before = cache.stats()
    with pytest.raises(PrefixCacheError, match=r"frame index 40 .*image_transforms\.enable"):
        kit.loss(policy, augmented)
    assert cache.stats() == before
    kit.loss(policy, batch)  # the original frames still hit
    assert cache.hits == before["hits"] + 2


def test_directory_cache_is_shared_by_a_new_policy_with_the_same_weights(tmp_path):
    kit = PiConformanceKit("lerobot_pi05")
    cfg = AptConfig(stage=1, prefix_cache=str(tmp_path / "cache"), prefix_cache_dtype="model")
    batch = kit.make_batch(seed=9)
    first = kit.build(cfg, seed=1)
    want = kit.loss(first, batch)
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*.pt"))
    assert len(files) == 2
    second = kit.build(cfg, seed=1)  # a later run: same frozen weights, same directory
    assert torch.equal(kit.loss(second, batch), want)
    assert prefix_cache_of(second.model).hits == 2
    third = kit.build(cfg, seed=2)  # other weights: other namespace, nothing reused
    kit.loss(third, batch)
    assert prefix_cache_of(third.model).hits == 0
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_memory_budget_evicts_and_stays_exact():
    kit = PiConformanceKit("lerobot_pi0")
    plain = kit.build(AptConfig(stage=1), seed=1)
    batch = kit.make_batch(seed=2)
    probe = kit.build(AptConfig(stage=1, prefix_cache="memory:1GB", prefix_cache_dtype="model"), seed=1)
    kit.loss(probe, batch)
    per_frame = int(prefix_cache_of(probe.model).stats()["bytes_per_frame"])
    tight = kit.build(AptConfig(stage=1, prefix_cache=f"memory:{per_frame}B", prefix_cache_dtype="model"), seed=1)
    want = kit.loss(plain, batch)
    assert torch.equal(kit.loss(tight, batch), want)  # all computed in one pass, one entry kept
    # One frame evicted: it is recomputed alone (a batch of 1), which moves the last bits, as any
    # change of batch composition does.
    torch.testing.assert_close(kit.loss(tight, batch), want, rtol=1e-6, atol=1e-6)
    cache = prefix_cache_of(tight.model)
    assert cache.memory_bytes <= per_frame and cache.evictions >= 1


def test_sampling_and_eval_do_not_use_the_cache():
    kit = PiConformanceKit("lerobot_pi0")
    plain = kit.build(AptConfig(stage=1), seed=1)
    cached = kit.build(AptConfig(stage=1, prefix_cache="memory:64MB"), seed=1)
    batch = kit.make_batch(seed=1)
    assert torch.equal(kit.actions(plain.eval(), batch), kit.actions(cached.eval(), batch))
    assert prefix_cache_of(cached.model) is None


def test_a_trainable_vlm_is_refused_at_run_time():
    kit = PiConformanceKit("lerobot_pi0")
    policy = kit.build(AptConfig(stage=1, prefix_cache="memory:64MB"), seed=1)
    next(policy.model.paligemma_with_expert.paligemma.parameters()).requires_grad_(True)
    with pytest.raises(PrefixCacheError, match="vlm_mode='frozen'"):
        kit.loss(policy, kit.make_batch())


@pytest.mark.parametrize(
    ("fields", "field", "match"),
    [
        (dict(stage=2, vlm_mode="lora", prefix_cache="memory:1GB"), "apt.prefix_cache", "needs a frozen VLM"),
        (dict(stage=2, vlm_mode="full", prefix_cache="/tmp/x"), "apt.prefix_cache", "needs a frozen VLM"),
        (dict(prefix_cache="memory:lots"), "apt.prefix_cache", "memory:8GB"),
        (dict(prefix_cache="memory:0GB"), "apt.prefix_cache", "positive"),
        (dict(prefix_cache_dtype="int8"), "apt.prefix_cache_dtype", "'bfloat16'"),
        (dict(attention="flash"), "apt.attention", "'sdpa'"),
    ],
)
def test_bad_cache_and_attention_settings_name_the_field(fields, field, match):
    with pytest.raises(AptConfigError, match=match) as info:
        AptConfig.parse(fields)
    assert info.value.field == field


def test_memory_budget_units_and_content_keys():
    assert parse_memory_budget("memory:8GB") == 8 * 10**9
    assert parse_memory_budget("memory:1.5 GiB") == int(1.5 * 2**30)
    assert parse_memory_budget("memory:512") == 512
    assert AptConfig(prefix_cache="").prefix_cache is None
    x = torch.arange(6.0).reshape(2, 3)
    assert content_key(x) == content_key(x.clone()) != content_key(x.reshape(3, 2)) != content_key(x.double())
    with pytest.raises(PrefixCacheError, match="memory budget"):
        PrefixCache("memory:nope")


def test_cache_fields_parse_from_the_lerobot_cli():
    import draccus

    from apt_plugins_lerobot_pi.configuration_apt_pi0 import APTPI0Config

    cfg = draccus.parse(APTPI0Config, args=["--apt.prefix_cache=memory:8GB", "--apt.prefix_cache_dtype=model",
                                            "--apt.attention=sdpa", "--device=cpu"])
    parsed = AptConfig.from_settings(cfg.apt)
    assert (parsed.prefix_cache, parsed.prefix_cache_dtype, parsed.attention) == ("memory:8GB", "model", "sdpa")
    with pytest.raises(AptConfigError, match=r"policy\.apt\.prefix_cache=.*needs a frozen VLM"):
        draccus.parse(APTPI0Config, args=["--apt.stage=2", "--apt.vlm_mode=lora", "--apt.prefix_cache=/tmp/c",
                                          "--device=cpu"])


@pytest.mark.parametrize(("kv_heads", "rows", "width", "dim", "exact"), [
    (1, 51, 179, 64, True),  # the mid-size expert layer: 51 suffix tokens against 128 cached + 51 own
    (2, 5, 9, 16, False),  # tiny matrices: the BLAS may take another path (3.6e-7 seen)
])
def test_grouped_eager_attention_equals_transformers_eager(kv_heads, rows, width, dim, exact):
    """The folded grouped-query eager attention (no repeat_kv) gives transformers' eager forward, bit
    for bit at the benchmark's shapes (the tiny kit's: tests/test_lerobot_pi.py), including a fully
    masked row, and its gradients to float rounding."""
    from types import SimpleNamespace

    from transformers.models.gemma import modeling_gemma

    from apt_plugins_lerobot_pi.modeling import _eager_grouped

    g = torch.Generator().manual_seed(0)
    bsz, heads = 2, 8
    q_base = torch.randn(bsz, rows, heads, dim, generator=g)
    k_base = torch.randn(bsz, kv_heads, width, dim, generator=g)
    v_base = torch.randn(bsz, kv_heads, width, dim, generator=g)
    mask = torch.zeros(bsz, 1, rows, width)
    mask[0, :, :, -3:] = torch.finfo(torch.float32).min
    mask[1, :, 2, :] = torch.finfo(torch.float32).min  # a row with every column masked stays finite
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=True)

    def run(fn):
        q, k, v = (t.clone().requires_grad_(True) for t in (q_base, k_base, v_base))
        out = fn(q.transpose(1, 2), k, v)  # q as _layer passes it: a transposed (B, Q, H, D)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), (q.grad, k.grad, v.grad)

    want, want_grads = run(lambda q, k, v: modeling_gemma.eager_attention_forward(module, q, k, v, mask, 0.25)[0])
    got, got_grads = run(lambda q, k, v: _eager_grouped(q, k, v, mask, 0.25))
    assert got.shape == want.shape and torch.isfinite(got).all()
    if exact:
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
