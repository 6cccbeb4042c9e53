"""Case ``batched_einsum``: a hand-written GPT-style decoder with batched 3-D experts.

Names differ on purpose from ``loop_linear``: ``embed``, ``blocks.N.attn.qkv`` (fused) and
``attn.proj``, LayerNorm with bias (``ln1``/``ln2``/``ln_f``), ``lm_head``.  Every block's FFN
lives under the same attribute name ``ffn``: block 0 is a dense GELU MLP (``ffn.fc1``/``ffn.fc2``,
role dense_mlp) and blocks 1.. are MoE layers whose shared expert re-uses the same class and
names (``ffn.shared.fc1``/``ffn.shared.fc2``, role shared_expert), so names alone do not tell
dense from shared.

Routing: sigmoid scores; a per-expert selection ``bias`` parameter (DeepSeek-V3 "aux-loss-free"
style: requires_grad=False, meant to be updated outside autograd) is added before topk but not
to the combine weights.  Dispatch: capacity-padded ``[S, E, C]`` one_hot tensor (tokens past
capacity are dropped), einsum to gather, ``bmm`` against 3-D ``gate_up`` [E, D, 2F] and
``down`` [E, F, D] parameters, einsum to combine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 192
D = 64
N_HEADS = 4
N_BLOCKS = 3  # block 0 dense, blocks 1..2 MoE
DENSE_FF = 128
N_EXPERTS = 8
TOP_K = 2
EXPERT_FF = 64
SHARED_FF = 96
CAPACITY_FACTOR = 1.25
BATCH, SEQ = 2, 16


class MLP(nn.Module):
    def __init__(self, d: int, ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, N_HEADS, D // N_HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, D))


class SigmoidRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(N_EXPERTS, D) / math.sqrt(D))
        # selection-only bias: updated by a load-balancing rule, not by autograd
        self.bias = nn.Parameter(0.01 * torch.randn(N_EXPERTS), requires_grad=False)

    def forward(self, x: torch.Tensor):
        scores = torch.sigmoid(F.linear(x, self.weight))
        ids = torch.topk(scores + self.bias, TOP_K, dim=-1).indices
        w = scores.gather(-1, ids)
        return ids, w / w.sum(-1, keepdim=True)


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(N_EXPERTS, D, 2 * EXPERT_FF) / math.sqrt(D))
        self.down = nn.Parameter(torch.randn(N_EXPERTS, EXPERT_FF, D) / math.sqrt(EXPERT_FF))

    def forward(self, expert_in: torch.Tensor) -> torch.Tensor:  # [E, C, D] -> [E, C, D]
        g, u = torch.bmm(expert_in, self.gate_up).chunk(2, dim=-1)
        return torch.bmm(F.gelu(g) * u, self.down)


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = SigmoidRouter()
        self.experts = Experts()
        self.shared = MLP(D, SHARED_FF)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, D)
        t = x.shape[0]
        s = t * TOP_K
        capacity = math.ceil(CAPACITY_FACTOR * s / N_EXPERTS)

        ids, w = self.router(x)  # [T, K]
        mask = F.one_hot(ids.reshape(-1), N_EXPERTS).to(x.dtype)  # [S, E], token-major
        pos = ((torch.cumsum(mask, dim=0) - 1.0) * mask).sum(-1).long()  # slot in its expert
        keep = (pos < capacity).to(x.dtype)
        slot = F.one_hot(pos.clamp(max=capacity - 1), capacity).to(x.dtype)  # [S, C]
        dispatch = mask[:, :, None] * slot[:, None, :] * keep[:, None, None]  # [S, E, C]

        x_rep = x.repeat_interleave(TOP_K, dim=0)  # [S, D]
        expert_in = torch.einsum("sec,sd->ecd", dispatch, x_rep)
        expert_out = self.experts(expert_in)
        combine = dispatch * w.reshape(-1)[:, None, None]
        routed = torch.einsum("sec,ecd->sd", combine, expert_out).view(t, TOP_K, D).sum(1)
        return (routed + self.shared(x)).view(shape)


class Block(nn.Module):
    def __init__(self, moe: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.attn = SelfAttention()
        self.ln2 = nn.LayerNorm(D)
        self.ffn = MoE() if moe else MLP(D, DENSE_FF)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class GPTMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(moe=i > 0) for i in range(N_BLOCKS)])
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        # learned softmax temperature on the logits: role "other"
        self.logit_scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.embed(input_ids)
        for blk in self.blocks:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x)) * self.logit_scale
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return {"loss": loss, "logits": logits}


def expected_roles() -> dict[str, str]:
    roles = {
        "embed.weight": "embedding",
        "ln_f.weight": "norm",
        "ln_f.bias": "norm",
        "lm_head.weight": "vocab_projection",
        "logit_scale": "other",
    }
    for i in range(N_BLOCKS):
        p = f"blocks.{i}."
        for n in ("ln1", "ln2"):
            roles[p + n + ".weight"] = "norm"
            roles[p + n + ".bias"] = "norm"
        for n in ("qkv", "proj"):
            roles[p + f"attn.{n}.weight"] = "attention"
            roles[p + f"attn.{n}.bias"] = "attention"
        if i == 0:
            for n in ("fc1", "fc2"):
                roles[p + f"ffn.{n}.weight"] = "dense_mlp"
                roles[p + f"ffn.{n}.bias"] = "dense_mlp"
        else:
            roles[p + "ffn.router.weight"] = "router"
            roles[p + "ffn.router.bias"] = "router"
            roles[p + "ffn.experts.gate_up"] = "expert"
            roles[p + "ffn.experts.down"] = "expert"
            for n in ("fc1", "fc2"):
                roles[p + f"ffn.shared.{n}.weight"] = "shared_expert"
                roles[p + f"ffn.shared.{n}.bias"] = "shared_expert"
    return roles


def build():
    from . import ZooCase

    torch.manual_seed(0)
    model = GPTMoE().train()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    return ZooCase(
        name="batched_einsum",
        model=model,
        example_inputs={"input_ids": ids, "labels": ids.clone()},
        loss_fn=lambda out: out["loss"],
        expected_roles=expected_roles(),
        notes=(
            "Hand-written GPT-style: fused qkv + proj with biases, F.scaled_dot_product_attention, "
            "LayerNorm with bias, GELU. Block 0 dense MLP (ffn.fc1/fc2); blocks 1-2 MoE: sigmoid "
            "router (8 experts, k=2) with a frozen selection bias (ffn.router.bias, "
            "requires_grad=False, added before topk only), capacity-padded one_hot dispatch "
            "[S,E,C] (capacity factor 1.25, overflow dropped), einsum gather/combine and bmm "
            "against 3-D nn.Parameters experts.gate_up [E,D,2F] / experts.down [E,F,D]; shared "
            "expert ffn.shared.fc1/fc2 (same class and leaf names as the dense MLP). "
            "logit_scale is a learned scalar temperature (role other). Returns a dict. "
            "Static shapes, no host sync: compiles with aot_eager in one graph, no breaks. "
            "Expert compute is aten.bmm (einsums lower to bmm/mm). make_fx(tracing_mode='real') "
            "fails at F.one_hot (its CPU range check calls .item()); tracing_mode='fake' works."
        ),
    )
