"""torch.compile after memopt.apply (issue 12, section 1): the graphs the plain model has, no graph break memopt adds,
the numbers of eager memopt, the memory saving kept.

Compiled with AOTAutograd's eager backend (what Inductor gets, without the C++ code generation that takes minutes on
this machine); the memory test uses the partitioner Inductor uses. benchmarks/compile.py runs Inductor itself.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import memopt
from memopt.tracker import profiled_peak
from models import ALL_MODELS, NanoGPT, _ids, train_step

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _compile(model: nn.Module, backend: str = "aot_eager", graphs: list | None = None):
    from torch._dynamo.backends.debugging import aot_eager, aot_eager_decomp_partition

    inner = {"aot_eager": aot_eager, "aot_eager_decomp_partition": aot_eager_decomp_partition}[backend]

    def counting(gm, example_inputs):
        if graphs is not None:
            graphs.append(gm)
        return inner(gm, example_inputs)

    return torch.compile(model, backend=counting)


def _capture(model: nn.Module, batch: dict, loss_fn) -> tuple[torch.Tensor, dict, list, dict]:
    """One compiled training step: (loss, grads, the FX graphs Dynamo made, its graph breaks)."""
    torch._dynamo.reset()
    counters.clear()
    graphs: list = []
    compiled = _compile(model, graphs=graphs)
    loss, _ = train_step(compiled, batch, loss_fn)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads, graphs, dict(counters["graph_break"])


@functools.lru_cache(maxsize=None)
def _plain_graphs(name: str) -> tuple[int, tuple]:
    model, batch, loss_fn = ALL_MODELS[name]()
    _, _, graphs, breaks = _capture(model, batch(0), loss_fn)
    return len(graphs), tuple(sorted(breaks))


def _ops(graphs: list) -> set[str]:
    return {str(n.target) for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function"}


CASES = [
    ("nanogpt", {}),
    ("nanogpt", dict(checkpoint=True)),
    ("nanogpt", dict(checkpoint="selective")),
    ("nanogpt", dict(checkpoint=2)),
    ("qwen2", dict(checkpoint=True)),
    ("qwen2", dict(checkpoint="selective")),
    ("gpt2", dict(checkpoint=True)),
    ("bert", dict(checkpoint=True)),
    ("transformer_encoder", dict(checkpoint=True)),
    ("resnet", dict(checkpoint=True, attention=None)),
    ("llama", dict(quant="4bit", lora=4, checkpoint=True)),
    ("llama", dict(quant="8bit", lora=4, checkpoint=True)),
]


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'sdpa'}" for n, o in CASES])
def test_compiled_step_has_the_plain_models_graphs_and_eager_memopts_numbers(name, options):
    torch.manual_seed(0)
    model, batch, loss_fn = ALL_MODELS[name]()
    memopt.apply(model, **options)
    eager = copy.deepcopy(model)
    b = batch(0)
    loss, grads, graphs, breaks = _capture(model, b, loss_fn)
    n_plain, plain_breaks = _plain_graphs(name)
    added = set(breaks) - set(plain_breaks)
    if options.get("quant") == "8bit":
        # bitsandbytes' Linear8bitLt updates its own layer state (MatmulLtState) in every forward: inside a checkpoint
        # region Dynamo refuses that side effect. The only breaks allowed are those, and memopt.applied says so.
        assert added and all("MatmulLtState" in reason for reason in added), added
        assert "Linear8bitLt" in memopt.applied(model).skipped("quant:compile")[""]
    else:
        assert not added, breaks  # memopt adds no graph break where the plain model has none
        assert len(graphs) == n_plain
    ref_loss, ref_grads = train_step(eager, b, loss_fn)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    ops = _ops(graphs)
    if options.get("checkpoint") and options.get("quant") != "8bit":
        assert any("tag_activation_checkpoint" in op for op in ops), ops
    if name == "nanogpt":  # hand-written attention: one SDPA call per layer in the graph, no softmax
        assert any("scaled_dot_product_attention" in op for op in ops) and not any("softmax" in op for op in ops)


def _llama(layers: int = 4):
    import transformers

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, max_position_embeddings=256, use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager")


def test_checkpointing_saving_survives_compile():
    ids = torch.randint(0, 512, (4, 256), generator=torch.Generator().manual_seed(0))

    def step(m):
        def run():
            for p in m.parameters():
                p.grad = None
            m(input_ids=ids, labels=ids).loss.backward()
        return run

    peaks = {}
    base = _llama()
    for name, options in (("plain", dict(attention=None)), ("memopt", dict(checkpoint=True))):
        model = copy.deepcopy(base)
        memopt.apply(model, **options)
        peaks[f"{name} eager"] = profiled_peak(step(model))
        torch._dynamo.reset()
        compiled = _compile(model, "aot_eager_decomp_partition")
        step(compiled)()  # compile
        peaks[f"{name} compiled"] = profiled_peak(step(compiled))
    assert peaks["memopt compiled"] < 0.5 * peaks["plain compiled"], peaks
    assert peaks["memopt compiled"] <= 1.05 * peaks["memopt eager"], peaks


def test_apply_on_a_compiled_model_changes_the_module_inside():
    torch.manual_seed(0)
    model = NanoGPT()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    compiled = torch.compile(model, backend="aot_eager")
    assert memopt.apply(compiled, checkpoint=True) is compiled
    assert list(model.state_dict()) == keys and list(compiled._orig_mod.state_dict()) == keys
    record = memopt.applied(compiled)
    assert record is memopt.applied(model) and "transformer.h.0" in record.touched("checkpoint")
    assert "recompute region" in record.touched("checkpoint:compile")[""]
    batch = {"idx": _ids(0), "targets": _ids(1)}
    loss, _ = train_step(compiled, batch, lambda m, b: m(**b)[1])
    ref_loss, _ = train_step(ref, batch, lambda m, b: m(**b)[1])
    torch.testing.assert_close(loss, ref_loss)
    memopt.remove(compiled)
    assert not memopt.applied(model).touched("checkpoint")


@pytest.mark.parametrize("how", ["model.compile()", "each block"])
def test_compiled_in_place_or_block_by_block(how):
    torch.manual_seed(0)
    model = NanoGPT()
    ref = copy.deepcopy(model)
    memopt.apply(model, checkpoint=True)
    torch._dynamo.reset()
    counters.clear()
    if how == "model.compile()":
        model.compile(backend="aot_eager")
    else:  # torchtune-style: one compiled region per block
        for block in model.transformer.h:
            block.compile(backend="aot_eager")
    batch = {"idx": _ids(0), "targets": _ids(1)}
    loss, grads = train_step(model, batch, lambda m, b: m(**b)[1])
    ref_loss, ref_grads = train_step(ref, batch, lambda m, b: m(**b)[1])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(loss, ref_loss)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_tracker_says_it_measures_eager_on_a_compiled_model():
    from memopt import _log

    model = NanoGPT()
    memopt.apply(model, checkpoint=True)
    compiled = torch.compile(model, backend="aot_eager")
    batch = {"idx": _ids(0), "targets": _ids(1)}
    compiled(**batch)[1].backward()
    _log._warned.discard("track-compiled-OptimizedModule")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with memopt.track(compiled) as tracker:
            compiled(**batch)[1].backward()
    assert any("measures the eager execution" in str(w.message) and w.filename == __file__ for w in caught)
    report = tracker.report()
    assert report.peak_bytes > 0 and any("eager execution measured" in n for n in report.notes)


@pytest.mark.parametrize("name, options", [("nanogpt", dict(checkpoint=True)),
                                           ("llama", dict(checkpoint=True, loss="chunked"))],
                         ids=["nanogpt-checkpoint", "llama-checkpoint-chunked"])
def test_later_compiled_steps_do_not_recompile(name, options):
    # memopt keeps per-step state (the kernel probe's first forwards, the shared masks' new forward): none of it may
    # be guarded on, or every step would compile again (benchmarks/compile.py counts compile time in a step otherwise)
    torch.manual_seed(0)
    model, batch, loss_fn = ALL_MODELS[name]()
    memopt.apply(model, **options)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    train_step(compiled, batch(0), loss_fn)
    first = (counters["stats"]["unique_graphs"], counters["frames"]["total"])
    assert first[0] >= 1
    for step in range(1, 4):
        train_step(compiled, batch(step), loss_fn)
    assert (counters["stats"]["unique_graphs"], counters["frames"]["total"]) == first
