"""The public surface: one verb, clear errors, a bad call leaves the model untouched, a light import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import memopt
from models import nanogpt


def _snapshot(model: nn.Module):
    return (
        [(n, type(m), dict(m.__dict__.get("_forward_pre_hooks", {}))) for n, m in model.named_modules()],
        {n: m.__dict__.get("forward") for n, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
        "_memopt_applied" in model.__dict__,
    )


def _assert_untouched(model, before):
    after = _snapshot(model)
    assert after[0] == before[0]
    assert after[1] == before[1]
    assert after[2].keys() == before[2].keys()
    assert all(torch.equal(after[2][k], before[2][k]) for k in before[2])
    assert after[3] == before[3]


def test_apply_returns_the_same_model():
    model, *_ = nanogpt()
    assert memopt.apply(model, checkpoint=True) is model


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(checkpoint="fast"), ValueError, r"checkpoint='fast' is not supported; use False, None, True, 'full', 'selective'"),
        (dict(checkpoint=0), ValueError, r"checkpoint=0 is not supported"),
        (dict(checkpoint=-2), ValueError, r"checkpoint=-2 is not supported"),
        (dict(checkpoint=1.5), ValueError, r"checkpoint=1.5 is not supported"),
        (dict(checkpoint=True, blocks="transformer.layers.*"), ValueError, r"blocks='transformer.layers.\*' matched no module; .*transformer: ModuleDict"),
        (dict(checkpoint=True, blocks=nn.LSTM), ValueError, r"blocks=LSTM matched no module"),
        (dict(checkpoint=True, blocks=[3]), TypeError, r"blocks=3 is not supported"),
        (dict(blocks="transformer.h.*"), ValueError, r"checkpoint= is off"),
        (dict(attention="flash3"), ValueError, r"attention='flash3' is not supported; use 'sdpa', None or memopt.AttentionConfig"),
        (dict(checkpoint=True, quant="3bit"), ValueError, r"quant='3bit' is not supported; use '4bit', 'nf4', 'fp4', '8bit'"),
        (dict(checkpoint=True, lora=0), ValueError, r"lora=0 is not supported; use a positive int rank"),
        (dict(checkpoint=memopt.CheckpointConfig(policy="selective", save_ops=("nope_op",))), ValueError, r"'nope_op'"),
    ],
)
def test_bad_input_raises_and_leaves_model_untouched(kwargs, error, match):
    model, *_ = nanogpt()
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        memopt.apply(model, **kwargs)
    _assert_untouched(model, before)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy="some"), r"policy='some'\) is not supported; use one of \('full', 'selective'\)"),
        (dict(every=0), r"every=0\) must be a positive int"),
        (dict(every=True), r"every=True\) must be a positive int"),
        (dict(determinism_check="strict"), r"determinism_check='strict'"),
        (dict(save_ops=("mm",)), r"save_ops=.* only applies to policy='selective'"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        memopt.CheckpointConfig(**kwargs)


def test_model_without_blocks_gets_a_message_that_says_how_to_name_them():
    # Issue 13.19: the message said "no two modules of one class" of a Sequential holding three Linears and
    # suggested blocks=['layers.*'], which this model does not have. It names the model's own layers now.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"found no repeated blocks in Sequential.*holds layers, not blocks.*"
                                         r"blocks=\['0', '2'\]") as err:
        memopt.apply(model, checkpoint=True)
    assert "layers.*" not in str(err.value)
    _assert_untouched(model, before)
    nested = nn.Sequential(nn.Linear(4, 4), nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(4, 4), nn.Tanh())}))
    with pytest.raises(ValueError, match=r"blocks=\['1.mlp.\*'\]"):  # the hint names a real stack of the model
        memopt.apply(nested, checkpoint=True)
    memopt.apply(model, checkpoint=True, attention=None, blocks=["0", "2"])  # naming them works
    assert list(memopt.applied(model).touched("checkpoint")) == ["0", "2"]


class Stages(nn.Module):
    """UNet/timm style: stages of different layers kept in ModuleLists, called one layer at a time."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([
            nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.GELU()), nn.Sequential(nn.Linear(8, 8), nn.Tanh())]),
            nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.GELU())]),
        ])

    def forward(self, x):
        for stage in self.stages:
            for layer in stage:
                x = x + layer(x)
        return x


def test_modulelist_stages_are_not_blocks_found_or_named():
    # Issue 13.8: ModuleList "blocks" were reported checkpointed, but a ModuleList's forward never runs.
    model = Stages()
    memopt.apply(model, checkpoint=True, attention=None)
    touched = memopt.applied(model).touched("checkpoint")
    assert touched and not any(isinstance(model.get_submodule(n), nn.ModuleList) for n in touched), touched
    model = Stages()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'stages.0', an ModuleList whose forward never runs.*blocks=\['stages.0.\*'\]"):
        memopt.apply(model, checkpoint=True, attention=None, blocks=["stages.0", "stages.1"])
    _assert_untouched(model, before)


def test_empty_blocks_raises_and_keeps_existing_checkpointing():
    # Issue 13.9: blocks=[] was accepted and silently removed the checkpointing already there.
    model = Stages()
    memopt.apply(model, checkpoint=True, attention=None)
    before = dict(memopt.applied(model).touched("checkpoint"))
    with pytest.raises(ValueError, match=r"blocks=\[\] names no module"):
        memopt.apply(model, checkpoint=True, attention=None, blocks=[])
    assert memopt.applied(model).touched("checkpoint") == before
    from memopt.transforms.checkpoint import checkpointed

    assert all(checkpointed(model.get_submodule(n)) for n in before)


@pytest.mark.parametrize("fn", [memopt.apply, memopt.applied, memopt.remove])
def test_non_module_is_a_type_error(fn):
    with pytest.raises(TypeError, match=r"expects an nn.Module, got dict"):
        fn({"weight": torch.zeros(2)})


def test_applied_lists_touched_and_skipped_with_reasons():
    model, *_ = nanogpt()
    assert not memopt.applied(model)
    assert str(memopt.applied(model)) == "memopt: nothing applied"
    memopt.apply(model, checkpoint=2)
    record = memopt.applied(model)
    text = str(record)
    assert "transformer.h.0" in text and "applied" in text and "skipped" in text and "every=2" in text
    first = next(e for e in record.to_dict()["entries"] if e["technique"] == "checkpoint")
    assert first == {
        "technique": "checkpoint", "fqn": "transformer.h.0", "status": "applied",
        "detail": "full,every=2 (Block; found by repeated modules in a ModuleList/Sequential)",
    }
    assert isinstance(record.configs["checkpoint"], memopt.CheckpointConfig)


def test_stack_of_sequential_blocks_is_found():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
    memopt.apply(model, checkpoint=True, attention=None)
    assert list(memopt.applied(model).touched("checkpoint")) == ["0", "1", "2"]


def test_plain_pytorch_model_does_not_import_transformers():
    code = (
        "import sys, torch.nn as nn, memopt\n"
        "model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])\n"
        "memopt.apply(model, checkpoint=True, attention=None)\n"
        "assert 'transformers' not in sys.modules\n"
    )
    _python(code)


def test_shorthands_are_configs():
    from memopt.config import checkpoint_config

    assert checkpoint_config(True) == memopt.CheckpointConfig()
    assert checkpoint_config("full") == memopt.CheckpointConfig()
    assert checkpoint_config("selective") == memopt.CheckpointConfig(policy="selective")
    assert checkpoint_config(3) == memopt.CheckpointConfig(every=3)
    assert checkpoint_config("offload") == memopt.CheckpointConfig(offload=True)
    assert checkpoint_config(False) is None and checkpoint_config(None) is None


def test_import_is_light():
    code = (
        "import sys, memopt, torch\n"
        "heavy = [m for m in ('bitsandbytes', 'peft', 'accelerate', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    _python(code)


def _python(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True)
