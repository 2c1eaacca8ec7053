"""Issue 13 (outside testing), the attention and checkpointing findings: each test failed before its fix.

1  scores a hand-written attention keeps (attribute, dataclass, return) lost their gradient   (test_attention.py)
5  T5's bool mask replaced by memopt's shared float mask changed fully masked rows
7  checkpointing + attention in a module-level helper + "softmax" in the root: CheckpointError
10 a dispatch mode (MemTracker) over a checkpointed hand-written model: CheckpointError
14 KeyboardInterrupt in a probed forward left memopt's modes on the stack
18 transformers architectures without SDPA stayed eager                                       (test_attention.py)
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

import memopt
from models import SEQ, VOCAB, _ids, nanogpt, train_step


def _t5_pair():
    import transformers

    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration._from_config(config, attn_implementation="eager")
    for p in model.parameters():  # normal init, as in the report: large enough logits for fully masked rows to show
        nn.init.normal_(p, std=1.0)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")  # transformers' own SDPA path, with its own masks
    return model, ref


def test_t5_keeps_its_own_masks_where_they_do_not_reach_sdpa_unchanged():
    model, ref = _t5_pair()
    memopt.apply(model)
    ids = _ids(0)
    dec = _ids(1, seq=8)
    dec_mask = torch.ones_like(dec)
    dec_mask[0, :3] = 0  # left-padded decoder rows: fully masked in the decoder's self-attention
    enc_mask = torch.ones_like(ids)
    enc_mask[1, -4:] = 0
    batch = dict(input_ids=ids, attention_mask=enc_mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    model.eval()
    ref.eval()
    with torch.no_grad():
        expected = ref(**batch).logits
        for _ in range(3):  # the first padded forward checks; later ones would share a float mask if it were exact
            torch.testing.assert_close(model(**batch).logits, expected)
    shared = [p.shared for m in model.modules() for p in [m.__dict__.get("forward")] if hasattr(p, "shared")]
    assert shared and all(s.ok is False for s in shared)


class HelperAttention(nn.Module):
    """Attention written as a call to a module-level function: the class itself never names the normalisation."""

    def __init__(self, d: int = 32, nh: int = 4):
        super().__init__()
        self.nh = nh
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.nh, C // self.nh).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        return self.out(attend(q, k, v).transpose(1, 2).reshape(B, T, C))


def attend(q, k, v):
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, T)
    return F.softmax(att, dim=-1) @ v


class HelperBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.attn = HelperAttention()
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x):
        x = x + self.attn(self.ln(x))
        return x + self.mlp(x)


class HelperLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.blocks = nn.ModuleList([HelperBlock() for _ in range(3)])
        self.head = nn.Linear(32, VOCAB)

    def forward(self, idx, targets):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        # the loss through log_softmax: the text "softmax" makes this class a candidate for the watch
        return F.nll_loss(F.log_softmax(self.head(x), -1).flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointed_blocks_inside_a_watched_module_recompute_what_the_forward_ran(policy):
    torch.manual_seed(0)
    model = HelperLM()
    ref = copy.deepcopy(model)
    memopt.apply(model, checkpoint=policy)
    batch = {"idx": _ids(0), "targets": _ids(1)}
    loss, grads = train_step(model, batch, lambda m, b: m(**b))
    ref_loss, ref_grads = train_step(ref, batch, lambda m, b: m(**b))
    torch.testing.assert_close(loss, ref_loss)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    assert "-> SDPA" in memopt.applied(model).touched("attention")[""]


def test_a_dispatch_mode_over_a_checkpointed_handwritten_model_changes_nothing():
    torch.manual_seed(0)
    model, batch, loss_fn = nanogpt()
    ref = copy.deepcopy(model)
    memopt.apply(model, checkpoint=True)
    b = batch(0)
    ref_loss, ref_grads = train_step(ref, b, loss_fn)
    for _ in range(2):  # the first forwards run memopt's kernel probe (a dispatch mode of its own) too
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            loss, grads = train_step(model, b, loss_fn)
        torch.testing.assert_close(loss, ref_loss)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert "-> SDPA" in memopt.applied(model).touched("attention")["transformer.h.0.attn"]


def test_keyboard_interrupt_in_a_probed_forward_leaves_no_mode_behind():
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    class Interrupted(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, *_ = nanogpt()
            self.raise_next = True

        def forward(self, idx, targets):
            _, loss = self.inner(idx, targets)
            if self.raise_next:
                self.raise_next = False
                raise KeyboardInterrupt
            return loss

    model = Interrupted()
    memopt.apply(model)
    batch = {"idx": _ids(0), "targets": _ids(1)}
    with pytest.raises(KeyboardInterrupt):
        model(**batch)
    assert _get_current_dispatch_mode_stack() == [] and _get_current_function_mode_stack() == []
    with memopt.track(model) as tracker:
        model(**batch).backward()
    assert tracker.report().peak_bytes > 0


class KeepsProbs(nn.Module):
    """Keeps its attention probabilities for an attention-distillation loss."""

    def __init__(self, d: int = 32, nh: int = 4):
        super().__init__()
        self.nh = nh
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.nh, C // self.nh).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        att = F.softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1)), dim=-1)  # (B, nh, T, T)
        self.last_att = att
        return x + self.out((att @ v).transpose(1, 2).reshape(B, T, C))


class Distilled(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([KeepsProbs() for _ in range(2)])

    def forward(self, x, target):
        for layer in self.layers:
            x = layer(x)
        return x.pow(2).mean() + sum((layer.last_att - target).pow(2).sum() for layer in self.layers)


def test_kept_scores_with_checkpointing_train_as_written_with_their_gradient():
    # Issue 13.1 with checkpoint=True: the scores used after the forward switch the module to "as written" from its
    # next forward on, not in the recompute of this one (which must redo what the forward ran).
    torch.manual_seed(0)
    model = Distilled()
    ref = copy.deepcopy(model)
    memopt.apply(model, checkpoint=True)
    target = torch.rand(2, 4, SEQ, SEQ)
    for step in range(3):
        x = torch.randn(2, SEQ, 32)
        loss, grads = train_step(model, {"x": x, "target": target}, lambda m, b: m(**b))
        ref_loss, ref_grads = train_step(ref, {"x": x, "target": target}, lambda m, b: m(**b))
        torch.testing.assert_close(loss, ref_loss)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], msg=f"step {step}: {name}")
    assert "used after its forward returns" in memopt.applied(model).skipped("attention")["layers.0"]
