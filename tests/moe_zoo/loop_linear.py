"""Case ``loop_linear``: a hand-written Mixtral-style decoder.

Names follow the Mistral/Llama reference code (``tok_embeddings``, ``layers.N.attention.wq``,
``feed_forward.gate``, ``feed_forward.experts.E.w1``, ``output``), so nothing is called
``lm_head``, ``mlp``, ``router`` or ``proj``.

Routing: ``nn.Linear`` gate -> softmax -> topk -> renormalise.  Dispatch: a boolean routing mask,
per-expert token counts read back with ``.tolist()``, a Python loop over an ``nn.ModuleList`` of
SwiGLU experts that skips experts with zero tokens, ``torch.where`` to find each expert's
(token, slot) pairs and ``index_add_`` to combine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256
DIM = 64
N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
HIDDEN = 128
N_EXPERTS = 4
TOP_K = 2
BATCH, SEQ = 2, 16


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.head_dim = DIM // N_HEADS
        self.wq = nn.Linear(DIM, N_HEADS * self.head_dim, bias=False)
        self.wk = nn.Linear(DIM, N_KV_HEADS * self.head_dim, bias=False)
        self.wv = nn.Linear(DIM, N_KV_HEADS * self.head_dim, bias=False)
        self.wo = nn.Linear(N_HEADS * self.head_dim, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, N_HEADS, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, N_KV_HEADS, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, N_KV_HEADS, self.head_dim).transpose(1, 2)
        rep = N_HEADS // N_KV_HEADS
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).type_as(q)
        out = torch.matmul(probs, v)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoeLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(DIM, N_EXPERTS, bias=False)
        self.experts = nn.ModuleList([FeedForward() for _ in range(N_EXPERTS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, selected = torch.topk(probs, TOP_K, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)

        # routing mask [T, K, E] and token counts per expert, read back to the host
        mask = F.one_hot(selected, num_classes=N_EXPERTS).bool()
        counts = mask.sum(dim=(0, 1)).tolist()

        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            if counts[e] == 0:
                continue
            token_idx, slot_idx = torch.where(mask[:, :, e])
            y = expert(x[token_idx]) * weights[token_idx, slot_idx, None]
            out.index_add_(0, token_idx, y)
        return out.view(shape)


class TransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()
        self.feed_forward = MoeLayer()
        self.attention_norm = RMSNorm(DIM)
        self.ffn_norm = RMSNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([TransformerBlock() for _ in range(N_LAYERS)])
        self.norm = RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        logits = self.output(self.norm(h)).float()
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
        )


def expected_roles() -> dict[str, str]:
    roles = {
        "tok_embeddings.weight": "embedding",
        "norm.weight": "norm",
        "output.weight": "vocab_projection",
    }
    for i in range(N_LAYERS):
        p = f"layers.{i}."
        for w in ("wq", "wk", "wv", "wo"):
            roles[p + f"attention.{w}.weight"] = "attention"
        roles[p + "attention_norm.weight"] = "norm"
        roles[p + "ffn_norm.weight"] = "norm"
        roles[p + "feed_forward.gate.weight"] = "router"
        for e in range(N_EXPERTS):
            for w in ("w1", "w2", "w3"):
                roles[p + f"feed_forward.experts.{e}.{w}.weight"] = "expert"
    return roles


def build():
    from . import ZooCase

    torch.manual_seed(0)
    model = Transformer().train()
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    return ZooCase(
        name="loop_linear",
        model=model,
        example_inputs={"tokens": tokens, "labels": tokens.clone()},
        loss_fn=lambda out: out,
        expected_roles=expected_roles(),
        notes=(
            "Hand-written Mixtral-style: nn.Linear gate + softmax + topk (k=2 of 4); experts are an "
            "nn.ModuleList of SwiGLU modules (w1/w2/w3 nn.Linear); per-expert token counts via "
            "one_hot(...).sum().tolist(), a Python loop that skips empty experts, torch.where to "
            "select tokens, index_add_ to combine. Attention is written by hand (matmul + softmax, "
            "GQA via repeat_interleave, no SDPA); RMSNorm; untied LM head named 'output'. "
            "Expert compute is aten.mm per expert Linear (gather aten.index, combine "
            "aten.index_add). torch.compile(aot_eager) graph-breaks in every MoE layer: .tolist() "
            "(aten._local_scalar_dense, 'Data dependent operator') and torch.where -> aten.nonzero "
            "('Dynamic shape operator'); explain(): 6 graphs / 5 breaks. Even with "
            "capture_scalar_outputs and capture_dynamic_output_shape_ops it still breaks on "
            "'if counts[e] == 0' (guard on unbacked Eq(u0, 0)). make_fx(tracing_mode='real') fails "
            "at F.one_hot (its CPU range check calls .item())."
        ),
    )
