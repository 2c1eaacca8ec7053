"""Tiny test models, built offline from configs (transformers) or by hand (plain PyTorch).

Each factory returns (model, make_batch, loss_fn): make_batch(seed) gives the forward kwargs, loss_fn(model, batch)
the scalar loss of a training step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 96
SEQ = 16
BATCH = 2

_COMMON = dict(vocab_size=VOCAB)


def train_step(model, batch: dict, loss_fn: Callable, seed: int = 1):
    """One training step from zero gradients: (detached loss, {name: grad}). `seed` fixes the dropout masks."""
    model.train()
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _ids(seed: int, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _causal_lm(config_cls_name: str, **cfg) -> Callable:
    def build(dropout: float = 0.0):
        import transformers

        config = getattr(transformers, config_cls_name)(**_COMMON, **cfg)
        for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                    "attention_probs_dropout_prob", "hidden_dropout_prob", "dropout_rate"):
            if hasattr(config, key):
                setattr(config, key, dropout)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")

        def batch(seed: int = 0):
            ids = _ids(seed)
            mask = torch.ones_like(ids)
            mask[0, :3] = 0  # left padding on one row
            labels = ids.masked_fill(mask == 0, -100)
            labels[0, 3] = -100  # the first real token would be predicted from a pad position
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}

        return model, batch, lambda m, b: m(**b).loss

    return build


def _masked_lm(config_cls_name: str, model_cls_name: str, **cfg) -> Callable:
    def build(dropout: float = 0.0):
        import transformers

        config = getattr(transformers, config_cls_name)(**_COMMON, **cfg)
        for key in ("attention_probs_dropout_prob", "hidden_dropout_prob"):
            setattr(config, key, dropout)
        config._attn_implementation = "eager"  # as models loaded with attn_implementation="eager"
        model = getattr(transformers, model_cls_name)(config)

        def batch(seed: int = 0):
            ids = _ids(seed)
            mask = torch.ones_like(ids)
            mask[1, -4:] = 0  # right padding
            return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

        return model, batch, lambda m, b: m(**b).loss

    return build


def _t5(dropout: float = 0.0):
    import transformers

    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=dropout, decoder_start_token_id=0, pad_token_id=0,
    )
    config._attn_implementation = "eager"
    model = transformers.T5ForConditionalGeneration(config)

    def batch(seed: int = 0):
        ids = _ids(seed)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _ids(seed + 1, seq=8)}

    return model, batch, lambda m, b: m(**b).loss


_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=64)

HF_MODELS: dict[str, Callable] = {
    "llama": _causal_lm("LlamaConfig", **_SMALL, num_key_value_heads=4),
    "mistral": _causal_lm("MistralConfig", **_SMALL, num_key_value_heads=2),
    "qwen2": _causal_lm("Qwen2Config", **_SMALL, num_key_value_heads=2),
    "mixtral": _causal_lm("MixtralConfig", **_SMALL, num_key_value_heads=2, num_local_experts=4,
                          num_experts_per_tok=2),
    "gpt2": _causal_lm("GPT2Config", n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "gpt_neox": _causal_lm("GPTNeoXConfig", **_SMALL),
    "opt": _causal_lm("OPTConfig", hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                      max_position_embeddings=64, word_embed_proj_dim=32),
    "bert": _masked_lm("BertConfig", "BertForMaskedLM", **_SMALL),
    "t5": _t5,
}


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention on its path without flash (PyTorch < 2 or flash off): softmax(QK^T)V written out."""

    def __init__(self, d: int, nh: int, dropout: float, bias: bool = True, block_size: int = SEQ * 4):
        super().__init__()
        self.nh = nh
        self.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.c_proj = nn.Linear(d, d, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def heads(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.nh, C // self.nh).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.nh, C // self.nh).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.nh, C // self.nh).transpose(1, 2)  # (B, nh, T, hs)
        return q, k, v

    def merge(self, y):
        B, nh, T, hs = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, nh * hs)))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.heads(x)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: the bias is optional (PyTorch's LayerNorm had no bias=False)."""

    def __init__(self, d: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class MLP(nn.Module):
    def __init__(self, d: int, dropout: float, bias: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d, d, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, d: int, nh: int, dropout: float, bias: bool = True, block_size: int = SEQ * 4):
        super().__init__()
        self.ln_1 = LayerNorm(d, bias)
        self.attn = CausalSelfAttention(d, nh, dropout, bias, block_size)
        self.ln_2 = LayerNorm(d, bias)
        self.mlp = MLP(d, dropout, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's GPT as its users have it: weight tying, scaled init of the residual projections, the head on the
    last position only when no targets are given, targets padded with -1 (its ignore_index), and
    `configure_optimizers`' weight-decay groups. `vocab_size` and `block_size` as in nanoGPT's GPTConfig."""

    def __init__(self, d: int = 32, nh: int = 4, n_layer: int = 3, dropout: float = 0.0, bias: bool = True,
                 vocab_size: int = VOCAB, block_size: int = SEQ * 4):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, d), wpe=nn.Embedding(block_size, d), drop=nn.Dropout(dropout),
            h=nn.ModuleList([Block(d, nh, dropout, bias, block_size) for _ in range(n_layer)]), ln_f=LayerNorm(d, bias),
        ))
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # (t,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:  # inference: only the last position's logits, (b, 1, vocab)
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]  # matmuls and embeddings decay; biases and norms not
        no_decay = [p for p in params.values() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def _nanogpt_targets(seed: int) -> torch.Tensor:
    targets = _ids(seed + 1)
    targets[0, -3:] = -1  # padded, as nanoGPT's data loaders pad: ignore_index=-1
    return targets


def nanogpt(dropout: float = 0.0):
    model = NanoGPT(dropout=dropout)
    return model, lambda seed=0: {"idx": _ids(seed), "targets": _nanogpt_targets(seed)}, lambda m, b: m(**b)[1]


class EncoderClassifier(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, ids, mask, y):
        h = self.encoder(self.embed(ids), src_key_padding_mask=mask)
        return F.cross_entropy(self.head(h.mean(1)), y)


def transformer_encoder(dropout: float = 0.0):
    model = EncoderClassifier(dropout)

    def batch(seed: int = 0):
        mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
        mask[0, -5:] = True  # padded positions
        return {"ids": _ids(seed), "mask": mask, "y": torch.tensor([1, 3])}

    return model, batch, lambda m, b: m(**b)


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def resnet(dropout: float = 0.0):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), *[ResBlock(8) for _ in range(3)],
        nn.Dropout(dropout), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )

    def batch(seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(4, 3, 16, 16, generator=g), "y": torch.tensor([0, 3, 5, 9])}

    return model, batch, lambda m, b: F.cross_entropy(m(b["x"]), b["y"])


PLAIN_MODELS: dict[str, Callable] = {
    "nanogpt": nanogpt,
    "transformer_encoder": transformer_encoder,
    "resnet": resnet,
}

ALL_MODELS = {**HF_MODELS, **PLAIN_MODELS}

# How many blocks `find_blocks` must pick in each model (T5: both stacks).
EXPECTED_BLOCKS = {
    "llama": 3, "mistral": 3, "qwen2": 3, "mixtral": 3, "gpt2": 3, "gpt_neox": 3, "opt": 3, "bert": 3, "t5": 4,
    "nanogpt": 3, "transformer_encoder": 3, "resnet": 3,
}
