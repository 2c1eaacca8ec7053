"""The KV cache of generation (issue 15): the tracker files it as kv_cache, per layer, equal to the cache object's
bytes; the estimate is within 5% of the tracked peak and exact on the cache bytes for every kind that runs on CPU;
the plan says how many sequences fit and hands back the generate arguments."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import memopt
from memopt.estimation.kv_cache import KVCacheConfig, blocks_needed, kv_cache_config
from memopt.tracker.kv_cache import cache_bytes

ROOT = Path(__file__).resolve().parent.parent
HQQ = importlib.util.find_spec("hqq") is not None
B, P, N = 3, 40, 12  # batch, prompt, new tokens


def _config(**kw):
    kw = {"max_position_embeddings": 256, **kw}
    return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(_config()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memopt.apply(m)
    return m


def _ids(batch=B, prompt=P, seed=0):
    return torch.randint(0, 256, (batch, prompt), generator=torch.Generator().manual_seed(seed))


def _generate(model, kv: KVCacheConfig, batch=B, prompt=P, new=N):
    ids = _ids(batch, prompt)
    with memopt.track(model) as tracker:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, return_dict_in_generate=True, pad_token_id=0, **kv.generate_kwargs())
    return out, tracker.report()


KINDS = ["dynamic", "static", "fp8"] + (
    [KVCacheConfig("int4", backend="hqq", group_size=16, residual_length=8),
     KVCacheConfig("int2", backend="hqq", group_size=16, residual_length=8)] if HQQ else [])


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: kv_cache_config(k).kind)
def test_tracked_kv_cache_is_the_cache_objects_bytes_and_estimate_matches(model, kind):
    kv = kv_cache_config(kind)
    out, report = _generate(model, kv)
    real = cache_bytes(out.cache)
    assert real > 0
    assert report.totals["kv_cache"] == real  # the category: exactly the cache object's tensors
    rows = {r.name: r.kv_cache_bytes for r in report.layers if r.kv_cache_bytes}
    assert set(rows) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}  # per layer, on attention
    if kv.kind in ("int4", "int2"):  # a row is its layer at its largest: the residual window just before a flush
        assert sum(rows.values()) >= real
    else:
        assert sum(rows.values()) == real
    assert report.peak_breakdown["kv_cache"] > 0 and sum(report.peak_breakdown.values()) == report.peak_bytes
    assert report.kv_cache_timeline and max(p[1] for p in report.kv_cache_timeline) >= real
    est = memopt.estimate(_config(), mode="generate", kv_cache=kv, batch_size=B, seq_len=P + N, new_tokens=N,
                          device="cpu", dtype="float32")
    assert est.kv_cache_bytes == real
    assert abs(est.peak_bytes - report.peak_bytes) <= 0.05 * report.peak_bytes, (est.peak_bytes, report.peak_bytes)
    assert est.peak_bytes == max(est.prefill_peak_bytes, est.decode_peak_bytes)


def test_quantized_caches_are_smaller_and_static_reserves_max_len(model):
    sizes = {}
    for kind in KINDS:
        kv = kv_cache_config(kind)
        sizes[kv.kind] = memopt.estimate(_config(), mode="generate", kv_cache=kv, batch_size=B, seq_len=P + N,
                                         new_tokens=N, device="cpu", dtype="float32").kv_cache_bytes
    assert sizes["fp8"] < 0.3 * sizes["dynamic"]  # 1 byte against 4 (float32), a scale per layer
    if HQQ:
        assert sizes["int2"] < sizes["int4"] < sizes["dynamic"]
    assert sizes["static"] >= sizes["dynamic"]


def test_plot_shows_the_cache(model, tmp_path):
    _, report = _generate(model, KVCacheConfig("dynamic"), new=6)
    assert "kv cache" in report.table().splitlines()[-len(report.layers) - 2]  # the column, in the header row
    path = report.plot(str(tmp_path / "gen.png"))
    assert Path(path).stat().st_size > 10_000
    assert memopt.MemoryReport.from_dict(json.loads(report.to_json())).kv_cache_timeline == report.kv_cache_timeline


def test_training_reports_have_no_kv_cache_column():
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(_config())
    ids = _ids(2, 16)
    with memopt.track(m) as tracker:
        m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    report = tracker.report()
    assert report.peak_breakdown["kv_cache"] == 0 and "kv cache" not in report.table()
    assert "kv_cache" not in report.table().splitlines()[1]


def test_paged_generate_batch_tracked_and_estimated(model):
    requests = [(30, 20), (7, 20), (18, 20), (25, 20)]  # generate_batch: one max_new_tokens for all
    kv = KVCacheConfig("paged", page_size=16, max_batch_tokens=64)
    est = memopt.estimate(_config(), mode="generate", kv_cache=kv, requests=requests, device="cpu",
                          dtype="float32")
    assert est.kv_cache.num_blocks == blocks_needed(requests, 16) == 4 + 2 + 3 + 3  # ceil((p + 19) / 16)
    prompts = [_ids(1, p, seed=i)[0].tolist() for i, (p, _) in enumerate(requests)]
    gen = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    with memopt.track(model) as tracker:
        out = model.generate_batch(prompts, generation_config=gen, max_new_tokens=20, progress_bar=False,
                                   **est.generate_kwargs)
    report = tracker.report()
    assert len(out) == 4 and all(len(r.generated_tokens) == 20 for r in out.values())
    assert report.peak_breakdown["kv_cache"] == est.kv_cache_bytes  # the paged cache tensor, exactly
    assert sum(r.kv_cache_bytes for r in report.layers) == est.kv_cache_bytes  # split over the layers
    assert abs(est.peak_bytes - report.peak_bytes) <= 0.05 * report.peak_bytes, (est.peak_bytes, report.peak_bytes)
    assert 0 < est.cache["waste"] < 0.5


def test_paged_wastes_less_than_static_for_varied_requests():
    requests = [(160, 40), (32, 16), (240, 120), (48, 360), (120, 32), (20, 20)]
    kw = dict(mode="generate", requests=requests, device="cpu", dtype="float32")
    static = memopt.estimate(_config(max_position_embeddings=1024), kv_cache="static", **kw)
    paged = memopt.estimate(_config(max_position_embeddings=1024), kv_cache=KVCacheConfig("paged", page_size=8, max_batch_tokens=64), **kw)
    assert static.cache["waste"] > 0.5 and paged.cache["waste"] < 0.1
    assert paged.kv_cache_bytes < static.kv_cache_bytes


def test_kv_heads_and_weight_quantization_shrink_the_estimate():
    base = memopt.estimate(_config(), mode="generate", batch_size=2, seq_len=64, device="cpu", dtype="float32")
    mqa = memopt.estimate(_config(), mode="generate", batch_size=2, seq_len=64, device="cpu", dtype="float32",
                          kv_heads=1)
    assert mqa.kv_cache_bytes * 2 == base.kv_cache_bytes  # 2 key/value heads -> 1
    q = memopt.estimate(_config(), mode="generate", batch_size=2, seq_len=64, device="cpu", dtype="float32",
                        quant="8bit")
    assert q.weights_bytes < base.weights_bytes and q.kv_cache_bytes == base.kv_cache_bytes
    with pytest.raises(ValueError, match="kv_heads=3"):
        memopt.estimate(_config(), mode="generate", device="cpu", kv_heads=3)


def test_bad_values_name_the_fix():
    with pytest.raises(ValueError, match="kv_cache='int3'.*dynamic"):
        memopt.estimate(_config(), mode="generate", kv_cache="int3")
    with pytest.raises(ValueError, match="requests="):
        memopt.estimate(_config(), mode="generate", kv_cache="paged", requests=[(10, 0)])
    with pytest.raises(ValueError, match="mode='generate'"):
        memopt.estimate(_config(), kv_cache="fp8")
    with pytest.raises(ValueError, match="needs CUDA"):
        memopt.estimate(_config(), mode="generate", kv_cache="offloaded", device="cpu")
    with pytest.raises(ValueError, match="group_size"):
        KVCacheConfig("int4", group_size=0)


def test_missing_backend_names_the_extra(monkeypatch):
    from memopt.estimation import kv_cache as kvmod

    monkeypatch.setattr(kvmod, "_installed", lambda backend: False)
    with pytest.raises(ImportError, match=r"memopt\[kvcache\]"):
        memopt.estimate(_config(), mode="generate", kv_cache="int4", device="cpu")
    with pytest.raises(ImportError, match=r"memopt\[kvcache\]"):
        KVCacheConfig("int2", backend="quanto").generate_kwargs()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU build's failure")
def test_offloaded_cache_on_cpu_is_a_memopt_error(model):
    ids = _ids(1, 8)
    with memopt.track(model), pytest.raises(RuntimeError, match="memopt: an offloaded KV cache.*needs CUDA"):
        model.generate(ids, max_new_tokens=2, cache_implementation="offloaded", pad_token_id=0)


def test_plan_generate_answers_how_many_and_how():
    plan = memopt.plan(_config(), "2MiB", mode="generate", seq_len=128, new_tokens=32, device="cpu",
                       dtype="float32", kv_caches=["dynamic", "paged"], allow_quant=False)
    assert plan.fits and plan.sequences >= 1 and plan.estimate.peak_bytes <= plan.budget_bytes
    assert dict(plan.tried).keys() == {"dynamic cache", "paged cache (continuous batching)"}
    if plan.kv_cache.kind == "paged":
        cb = plan.generate_kwargs["continuous_batching_config"]
        assert cb.num_blocks == plan.kv_cache.num_blocks >= plan.estimate.cache["blocks_used"]
    more = memopt.estimate(_config(), mode="generate", batch_size=plan.sequences + 1, seq_len=128, new_tokens=32,
                           device="cpu", dtype="float32", kv_cache=plan.kv_cache.kind if plan.kv_cache.kind != "paged"
                           else KVCacheConfig("paged", page_size=16))
    assert more.peak_bytes > plan.estimate.peak_bytes
    assert {"block_size", "gpu_memory_utilization", "kv_cache_dtype", "max_num_seqs"} <= set(plan.vllm)
    target = memopt.plan(_config(), "2MiB", mode="generate", seq_len=128, new_tokens=32, device="cpu",
                         dtype="float32", sequences=10 ** 6, kv_caches=["dynamic"], allow_quant=False)
    assert not target.fits and "nothing fits" in str(target)


def test_cli_plan_generate(tmp_path, capsys):
    from memopt.cli import main  # in-process: the entry point `python -m memopt` calls (a subprocess is seconds)

    _config().save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--mode", "generate", "--budget", "2MiB", "--seq-len", "128", "--dtype",
                 "float32", "--device", "cpu", "--kv-cache", "dynamic,fp8", "--no-quant", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["sequences"] >= 1 and data["vllm"]["kv_cache_dtype"] in ("auto", "fp8")
    assert [name for name, _ in data["tried"]] == ["dynamic cache", "fp8 cache"]

def test_estimate_generate_of_a_hand_written_model():
    """A hand-written nn.Module (nanoGPT: attention written out, no transformers cache) from a callable: one forward
    of the batch inputs() returns, on fake tensors through memopt's hand-written attention watch; the batch and the
    length are the batch's."""
    sys.path.insert(0, str(ROOT / "tests"))
    from models import NanoGPT

    ids = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(0))
    tracked = {}
    for attention in ("sdpa", None):
        torch.manual_seed(0)
        m = NanoGPT().eval()
        if attention:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                memopt.apply(m, attention=attention)
        with torch.no_grad(), memopt.track(m) as tracker:
            m(ids)
        tracked[attention] = tracker.report().peak_bytes
    assert tracked["sdpa"] < 0.8 * tracked[None]  # the (4, 4, 64, 64) attention matrices, gone with SDPA
    for attention in ("sdpa", None):
        est = memopt.estimate(NanoGPT, inputs=lambda: {"idx": ids}, mode="generate", device="cpu",
                              attention=attention)
        assert abs(est.peak_bytes - tracked[attention]) <= 0.05 * tracked[attention], (attention, est.peak_bytes)
    assert (est.batch_size, est.seq_len, est.kv_cache_bytes) == (4, 64, None)
    assert "one forward of 4 x 64 tokens" in str(est) and "KV cache not told apart" in str(est)
    with pytest.raises(ValueError, match="needs inputs="):
        memopt.estimate(NanoGPT, mode="generate", device="cpu")


def test_estimate_generate_of_a_callable_building_a_transformers_model():
    kw = dict(mode="generate", batch_size=B, seq_len=P + N, new_tokens=N, device="cpu", dtype="float32")
    from_config = memopt.estimate(_config(), **kw)
    built = memopt.estimate(lambda: transformers.LlamaForCausalLM(_config()), **kw)
    assert built.kv_cache_bytes == from_config.kv_cache_bytes > 0
    assert built.peak_bytes == pytest.approx(from_config.peak_bytes, rel=0.01)
    half = memopt.estimate(lambda: transformers.LlamaForCausalLM(_config()), **{**kw, "dtype": "bfloat16"})
    assert half.kv_cache_bytes * 2 == from_config.kv_cache_bytes  # cast to bfloat16: the cache in it too
