"""The reference Mixture-of-Experts decoder that mopc is built and tested against.

A plain single-device model: GQA attention with RoPE, RMSNorm, leading dense SwiGLU
layers, then MoE layers (sigmoid or softmax router, optional DeepSeek-V3 style
correction bias and group-limited routing, optional shared experts). Experts are 3-D
parameters computed with `torch._grouped_mm`; token dispatch never reads a count on the
host, so the whole model traces with fake tensors and compiles with `fullgraph=True`.

Module and parameter names are a contract: analysis passes, planners and tests refer to
`layers.{i}.attention.wq`, `layers.{i}.moe.experts.w1`, ... (see `MoETransformer`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mopc.codegen.grouped_mm import grouped_mm as mopc_grouped_mm

__all__ = [
    "Attention",
    "FeedForward",
    "GroupedExperts",
    "MoE",
    "MoEModelConfig",
    "MoETransformer",
    "RMSNorm",
    "Router",
    "TransformerBlock",
    "init_weights",
]


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class MoEModelConfig:
    """Shape and routing of a `MoETransformer`. Validated once, on construction."""

    vocab_size: int
    """Number of tokens in the vocabulary (rows of the embedding and output)."""
    dim: int
    """Hidden size of the residual stream."""
    num_layers: int
    """Number of transformer blocks."""
    num_heads: int
    """Number of query heads."""
    num_kv_heads: int
    """Number of key/value heads (grouped-query attention); must divide num_heads."""
    head_dim: int | None = None
    """Size of one head; None means dim // num_heads. Resolved to an int on construction,
    so `dataclasses.replace` keeps the old value unless it is passed again."""
    num_experts: int
    """Number of routed experts per MoE layer."""
    top_k: int
    """Number of experts each token is routed to."""
    moe_inter_dim: int
    """Hidden size of one routed expert's SwiGLU."""
    num_shared_experts: int = 0
    """Always-on experts per MoE layer, fused into one SwiGLU of hidden size
    moe_inter_dim * num_shared_experts; 0 means none."""
    num_dense_layers: int = 0
    """Leading layers that use a dense SwiGLU MLP instead of an MoE."""
    dense_inter_dim: int = 0
    """Hidden size of the dense SwiGLU MLP; only used when num_dense_layers > 0."""
    router: Literal["softmax", "sigmoid"] = "softmax"
    """Function turning gate logits into expert scores."""
    router_bias: bool = False
    """Add a non-trainable per-expert correction bias (buffer `expert_bias`) to the scores
    used to choose experts, not to the routing weights (DeepSeek-V3 aux-loss-free
    balancing). It starts at zero; updating it is the trainer's business."""
    num_expert_groups: int = 1
    """Split the experts into this many groups for group-limited routing; 1 = off."""
    topk_groups: int = 1
    """Number of groups a token may pick experts from; equal to num_expert_groups = off."""
    route_scale: float = 1.0
    """Factor applied to the routing weights after optional normalization."""
    norm_topk_prob: bool = True
    """Normalize the chosen experts' scores to sum to one for each token."""
    rope_theta: float = 10_000.0
    """Base of the rotary position embedding frequencies."""
    max_seq_len: int = 2048
    """Longest sequence the model accepts."""
    norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    tie_embeddings: bool = False
    """Share one weight between `tok_embeddings` and `output`."""
    expert_impl: Literal["grouped_mm", "loop"] = "grouped_mm"
    """Routed-expert compute: one grouped matmul per projection (`torch._grouped_mm`, or
    `mopc::grouped_mm` for dtypes torch cannot trace it in), or a per-expert loop (a
    reference; it reads counts on the host, so it graph-breaks)."""

    def __post_init__(self) -> None:
        _check_positive(
            self, "vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads",
            "num_experts", "top_k", "moe_inter_dim", "num_expert_groups", "topk_groups",
            "max_seq_len",
        )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"MoEModelConfig.num_kv_heads={self.num_kv_heads} does not divide "
                f"num_heads={self.num_heads}; choose num_kv_heads among "
                f"{_divisors(self.num_heads)}."
            )
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(
                    f"MoEModelConfig.num_heads={self.num_heads} does not divide "
                    f"dim={self.dim}, so head_dim cannot default to dim // num_heads; "
                    "pass head_dim explicitly or choose num_heads dividing dim."
                )
            object.__setattr__(self, "head_dim", self.dim // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(
                f"MoEModelConfig.head_dim={self.head_dim} must be a positive even number "
                "(RoPE rotates pairs of channels); pass an even head_dim."
            )
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEModelConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                "set top_k <= num_experts."
            )
        if self.num_experts % self.num_expert_groups:
            raise ValueError(
                f"MoEModelConfig.num_expert_groups={self.num_expert_groups} does not divide "
                f"num_experts={self.num_experts}; choose num_expert_groups among "
                f"{_divisors(self.num_experts)}."
            )
        if self.topk_groups > self.num_expert_groups:
            raise ValueError(
                f"MoEModelConfig.topk_groups={self.topk_groups} exceeds "
                f"num_expert_groups={self.num_expert_groups}; set topk_groups <= "
                "num_expert_groups."
            )
        reachable = self.topk_groups * (self.num_experts // self.num_expert_groups)
        if self.top_k > reachable:
            raise ValueError(
                f"MoEModelConfig.top_k={self.top_k} exceeds the {reachable} experts in "
                f"topk_groups={self.topk_groups} groups of "
                f"{self.num_experts // self.num_expert_groups}; raise topk_groups or "
                "lower top_k."
            )
        if not 0 <= self.num_dense_layers <= self.num_layers:
            raise ValueError(
                f"MoEModelConfig.num_dense_layers={self.num_dense_layers} is outside "
                f"[0, num_layers={self.num_layers}]; choose a value in that range."
            )
        if self.num_dense_layers > 0 and self.dense_inter_dim <= 0:
            raise ValueError(
                f"MoEModelConfig.dense_inter_dim={self.dense_inter_dim} must be positive "
                f"when num_dense_layers={self.num_dense_layers} > 0; set dense_inter_dim "
                "(e.g. 4 * dim) or num_dense_layers=0."
            )
        if self.num_shared_experts < 0:
            raise ValueError(
                f"MoEModelConfig.num_shared_experts={self.num_shared_experts} is negative; "
                "use 0 for no shared expert."
            )
        for name in ("route_scale", "rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"MoEModelConfig.{name}={getattr(self, name)} must be positive; "
                    "pass a positive number."
                )
        _check_choice(self, "router", ("softmax", "sigmoid"))
        _check_choice(self, "expert_impl", ("grouped_mm", "loop"))

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    def num_params(self) -> int:
        """Number of parameters (tied weights counted once), from the shapes alone."""
        return self._count_params(num_routed=self.num_experts)

    def num_active_params(self) -> int:
        """Parameters one token touches: everything except the routed experts it skips."""
        return self._count_params(num_routed=self.top_k)

    def _count_params(self, *, num_routed: int) -> int:
        d, hd = self.dim, self.head_dim
        attention = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        block = 2 * d + attention  # two norms
        dense = 3 * d * self.dense_inter_dim
        moe = (
            d * self.num_experts  # router gate
            + 3 * num_routed * d * self.moe_inter_dim
            + 3 * d * self.moe_inter_dim * self.num_shared_experts
        )
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return (
            embeddings
            + d  # final norm
            + self.num_layers * block
            + self.num_dense_layers * dense
            + self.num_moe_layers * moe
        )


def _check_positive(config: MoEModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(
                f"MoEModelConfig.{name}={value!r} must be a positive int; pass one."
            )


def _check_choice(config: MoEModelConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(
            f"MoEModelConfig.{name}={value!r} is not one of {choices}; pick one of them."
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [seq_len, head_dim] for the rotate-half RoPE convention.

    Computed per forward rather than kept in a buffer, so a model built on `meta` and
    moved with `to_empty` needs no re-initialisation of derived state.
    """
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos(), freqs.sin()


def _apply_rope(x_BHSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x_BHSD.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos + rotated * sin).to(x_BHSD.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE on q and k."""

    def __init__(self, config: MoEModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        d, hd = config.dim, config.head_dim
        self.wq = nn.Linear(d, self.num_heads * hd, bias=False)
        self.wk = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.wo = nn.Linear(self.num_heads * hd, d, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.wo(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    """Dense SwiGLU: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ---------------------------------------------------------------------------- MoE


class Router(nn.Module):
    """Scores experts and picks top_k per token.

    Returns (weights [T, top_k] fp32, expert ids [T, top_k] int64). Algorithm:
      1. scores = softmax or sigmoid of gate(x), in fp32;
      2. choice scores = scores + expert_bias (if router_bias);
      3. group-limited routing: a group's score is the sum of its top-2 choice scores
         (its max when a group holds one expert); keep topk_groups groups per token,
         mask the others to -inf;
      4. ids = topk(top_k) of the choice scores;
      5. weights = scores at ids (bias excluded), normalized if norm_topk_prob,
         times route_scale.
    """

    def __init__(self, config: MoEModelConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.score_func = config.router
        self.num_expert_groups = config.num_expert_groups
        self.topk_groups = config.topk_groups
        self.route_scale = config.route_scale
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.dim, config.num_experts, bias=False)
        if config.router_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        else:
            self.expert_bias = None

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x_TD.float(), self.gate.weight.float())
        if self.score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        choice = scores if self.expert_bias is None else scores + self.expert_bias.float()
        if self.topk_groups < self.num_expert_groups:
            choice = self._mask_groups(choice)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, ids

    def _mask_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        T = choice_TE.shape[0]
        grouped = choice_TE.view(T, self.num_expert_groups, -1)
        if grouped.shape[-1] >= 2:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        kept = group_scores.topk(self.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, kept, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, -1)


def _meta_accepts_grouped_mm(dtype: torch.dtype) -> bool:
    a = torch.empty(2, 8, dtype=dtype, device="meta")
    b = torch.empty(1, 8, 8, dtype=dtype, device="meta")
    try:
        torch._grouped_mm(a, b, offs=torch.empty(1, dtype=torch.int32, device="meta"))
    except RuntimeError:
        return False
    return True


# Eager torch._grouped_mm runs fp32, bf16 and fp16 forward and backward on CPU (checked on
# torch 2.13) but rejects fp64, and its meta kernel accepts bf16 only, so fp32 and fp16
# cannot be traced with fake tensors. Every dtype the meta kernel rejects therefore uses
# the project's custom op `mopc::grouped_mm` (same math, any dtype, its own fake kernel
# and backward), in eager too, so that eager and compiled runs compute alike. Probed, not
# hard-coded: a torch whose meta kernel accepts more dtypes gets the aten op for them.
_TRACEABLE_GROUPED_MM_DTYPES = frozenset(
    d for d in (torch.float32, torch.bfloat16, torch.float16) if _meta_accepts_grouped_mm(d)
)


def _expert_mm(x_ND: torch.Tensor, w_EKM: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if x_ND.dtype in _TRACEABLE_GROUPED_MM_DTYPES:
        return torch._grouped_mm(x_ND, w_EKM, offs=offsets)
    return mopc_grouped_mm(x_ND, w_EKM, offsets)


class GroupedExperts(nn.Module):
    """Routed SwiGLU experts as 3-D weights: w1, w3 [E, dim, inter], w2 [E, inter, dim].

    forward(x_perm [N, dim] grouped by expert, offsets [E] int32 cumulative row counts,
    offsets[-1] == N) -> [N, dim].
    """

    def __init__(self, config: MoEModelConfig) -> None:
        super().__init__()
        E, d, inter = config.num_experts, config.dim, config.moe_inter_dim
        self.num_experts = E
        self.impl = config.expert_impl
        self.w1 = nn.Parameter(torch.empty(E, d, inter))
        self.w2 = nn.Parameter(torch.empty(E, inter, d))
        self.w3 = nn.Parameter(torch.empty(E, d, inter))
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=0.02)

    def forward(self, x_ND: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.impl == "grouped_mm":
            return self._forward_grouped_mm(x_ND, offsets)
        return self._forward_loop(x_ND, offsets)

    def _forward_grouped_mm(self, x_ND: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (w.to(x_ND.dtype) for w in (self.w1, self.w2, self.w3))
        h = F.silu(_expert_mm(x_ND, w1, offsets)) * _expert_mm(x_ND, w3, offsets)
        return _expert_mm(h, w2, offsets)

    def _forward_loop(self, x_ND: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # Reference path: `.tolist()` reads the offsets on the host, which graph-breaks
        # under torch.compile (an error with fullgraph=True) and syncs on accelerators.
        bounds = [0] + offsets.tolist()
        outs = []
        for e in range(self.num_experts):
            x = x_ND[bounds[e] : bounds[e + 1]]
            h = F.silu(x @ self.w1[e].to(x.dtype)) * (x @ self.w3[e].to(x.dtype))
            outs.append(h @ self.w2[e].to(x.dtype))
        return torch.cat(outs, dim=0)


class MoE(nn.Module):
    """Router, token dispatch, routed experts, combine, plus optional shared experts.

    Algorithm (no host reads, so it traces with fake tensors):
      1. weights, ids [T, k] = router(x);
      2. order = stable argsort of the flat ids [T*k]; x_perm = x[order // k];
      3. counts [E] = scatter-add of ones at ids; offsets = cumsum(counts) as int32;
      4. y_perm = experts(x_perm, offsets);
      5. un-permute with the inverse of `order`, scale by weights, sum over k -> [T, dim];
      6. add shared_experts(x).
    """

    def __init__(self, config: MoEModelConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.router = Router(config)
        self.experts = GroupedExperts(config)
        if config.num_shared_experts > 0:
            self.shared_experts = FeedForward(
                config.dim, config.moe_inter_dim * config.num_shared_experts
            )
        else:
            self.shared_experts = None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        weights_TK, ids_TK = self.router(x_TD)

        ids = ids_TK.reshape(-1)
        order = torch.argsort(ids, stable=True)
        x_perm = x_TD[order // self.top_k]
        # scatter_add rather than bincount: bincount's output size depends on the data.
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=ids.device)
        counts = counts.scatter_add(0, ids, torch.ones_like(ids))
        offsets = torch.cumsum(counts, dim=0).to(torch.int32)

        y_perm = self.experts(x_perm, offsets)

        positions = torch.arange(ids.numel(), device=ids.device)
        inverse = torch.empty_like(order).scatter(0, order, positions)
        y_TKD = y_perm[inverse].view(B * S, self.top_k, D)
        y_TD = (y_TKD * weights_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(dim=1)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(B, S, D)


# ---------------------------------------------------------------------------- model


class TransformerBlock(nn.Module):
    """Pre-norm block: attention, then a dense `feed_forward` or an `moe`."""

    def __init__(self, layer_id: int, config: MoEModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        if layer_id < config.num_dense_layers:
            self.feed_forward = FeedForward(config.dim, config.dense_inter_dim)
        else:
            self.moe = MoE(config)

    @property
    def is_moe(self) -> bool:
        return hasattr(self, "moe")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        mlp = self.moe if self.is_moe else self.feed_forward
        return x + mlp(self.ffn_norm(x))


class MoETransformer(nn.Module):
    """Decoder-only MoE language model.

    Names: tok_embeddings, layers.{i}.{attention_norm, attention.{wq,wk,wv,wo}, ffn_norm,
    feed_forward.{w1,w2,w3} | moe.{router.gate, router.expert_bias, experts.{w1,w2,w3},
    shared_experts.{w1,w2,w3}}}, norm, output.
    """

    def __init__(self, config: MoEModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(i, config) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids [B, S] int64 -> logits [B, S, vocab], or, given labels [B, S]
        (already aligned with the positions, -100 = ignore), the mean cross-entropy."""
        S = input_ids.shape[1]
        if S > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {S} exceeds MoEModelConfig.max_seq_len="
                f"{self.config.max_seq_len}; shorten the input or raise max_seq_len."
            )
        h = self.tok_embeddings(input_ids)
        cos, sin = rope_cos_sin(S, self.config.head_dim, self.config.rope_theta, h.device)
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits = self.output(self.norm(h))
        if labels is None:
            return logits
        # Upcast bf16/fp16 logits: the log-sum-exp over the vocabulary needs the range.
        loss_dtype = torch.promote_types(logits.dtype, torch.float32)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).to(loss_dtype),
            labels.reshape(-1),
            ignore_index=-100,
        )


# ---------------------------------------------------------------------------- init


def _param_generator(seed: int, fqn: str) -> torch.Generator:
    # crc32 is stable across processes and Python versions (unlike hash()), so every rank
    # derives the same stream from the name alone. The CPU generator keeps only 32 bits
    # of its seed, hence one 32-bit hash of both rather than seed and name side by side.
    return torch.Generator(device="cpu").manual_seed(zlib.crc32(f"{seed}/{fqn}".encode()))


def make_init_fn(model: MoETransformer, seed: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """`init_fn(fqn, tensor) -> values` for one parameter or buffer, on the CPU in fp32.

    It gives exactly what `init_weights(model, seed)` gives that tensor, one tensor at a
    time, so `mopc.parallelize` can initialise the shards of a model built on `meta`
    without ever holding the whole model.
    """
    norm_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, RMSNorm)}

    def init_fn(fqn: str, tensor: torch.Tensor) -> torch.Tensor:
        if fqn in norm_weights:
            return torch.ones(tensor.shape, dtype=torch.float32)
        if fqn.endswith("expert_bias"):
            return torch.zeros(tensor.shape, dtype=torch.float32)
        values = torch.empty(tensor.shape, dtype=torch.float32)
        return values.normal_(0.0, 0.02, generator=_param_generator(seed, fqn))

    return init_fn


@torch.no_grad()
def init_weights(model: MoETransformer, seed: int) -> None:
    """Give every parameter a value that depends only on (seed, parameter name).

    Norm weights are ones; every other parameter is normal(0, 0.02), drawn on the CPU
    from a generator seeded by `seed` and the crc32 of the name, then copied to the
    parameter's device and dtype. Tied weights are drawn once, under their first name.
    Buffers are reset too (`expert_bias` to zeros) and tied weights re-tied, so a model
    built on `meta` and moved with `to_empty` ends up identical to one built directly.
    """
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # `to_empty` unties them
    init_fn = make_init_fn(model, seed)
    for fqn, param in model.named_parameters():
        if param.is_meta:
            raise ValueError(
                f"init_weights: parameter {fqn} is on the meta device; call "
                "model.to_empty(device=...) first."
            )
        param.copy_(init_fn(fqn, param))
    for fqn, buf in model.named_buffers():
        if fqn.endswith("expert_bias"):
            buf.copy_(init_fn(fqn, buf))
