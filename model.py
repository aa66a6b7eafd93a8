"""
A GPT in one file, GPT-2's architecture under nanoGPT's parameter names, so that GPT-2's
weights map onto it by name (transformer.wte, transformer.h.0.attn.c_attn, lm_head, ...).
At the end, the gradient norm train.py clips with: the same to the last bit in every layout.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the model sees
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2; False is a little faster and better


SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")  # the fields that shape the weights


class LayerNorm(nn.Module):
    """LayerNorm whose bias can be switched off, which nn.LayerNorm does not allow on older torch."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # flash attention on CUDA; the causal mask is implied, so the model keeps no mask buffer
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: one matrix embeds tokens and scores them; state_dict lists it under both names
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2*n_layer): each block adds two of them to the stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameters counted once (tied weights too); position embeddings left out by default, as in GPT-2's paper."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None):
        b, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"sequence of length {t} is longer than block_size {self.config.block_size}")
        # positions 0..t-1 are a slice of the table, not a lookup: its gradient is then a sum over the batch, where
        # an embedding's backward would scatter-add, which deterministic mode makes slow on a GPU
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe.weight[:t])  # (b, t, n_embd)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (b, t, vocab_size)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # (b, 1, vocab_size): generation needs only the last position
            loss = None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay matrices and embeddings (>= 2-D); biases and LayerNorm gains stay undecayed
        params = [p for p in self.parameters() if p.requires_grad]
        # named, so that a trainer sets each group's hyperparameters by name, never by position
        groups = [
            {"name": "decay", "params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # the fused kernel does the whole update in one launch on CUDA
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self):
        """Training FLOPs per token, forward and backward, after PaLM's appendix B."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilization: achieved FLOP/s as a fraction of the hardware's peak."""
        return self.flops_per_token() * tokens_per_second / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_size=None):
        """Extend idx (b, t) by max_new_tokens sampled tokens; call under model.eval(). vocab_size: sample among
        the first ids only, so a vocabulary padded for speed never yields an id the tokenizer cannot decode."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :vocab_size] / temperature  # (b, vocab_size)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)  # (b, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# ---- the gradient's norm, the same in every layout ----
# torch's clip_grad_norm_ sums a sharded gradient's squares in another order than a whole one's, so a run resumed on
# other ranks, or sharded otherwise, would drift in the last bits as soon as clipping applies. These sum each row
# where it lies whole (FSDP2 shards along rows), then every row's sum in sorted order, which no layout changes.


def is_shard(tensor):
    """Whether tensor is a DTensor, a rank's shard of a whole one (FSDP2's). Asked of its device_mesh, which a
    DTensor alone has: importing torch.distributed.tensor takes seconds that an unsharded run would pay for nothing."""
    return hasattr(tensor, "device_mesh")


def grad_norm(params):
    """The L2 norm of all the gradients of params (FSDP2's DTensors or plain tensors), the same to the last bit in
    every layout. Unsharded, it is the same computation."""
    rows = []
    mesh = None
    for p in params:
        grad = p.grad
        if is_shard(grad):
            mesh = grad.device_mesh
            grad = grad.to_local()
        squares = grad.detach().float().square()
        if squares.dim() > 1:
            rows.append(squares.flatten(1).sum(1))  # one sum per row
        else:
            rows.append(squares.reshape(-1))
    rows = torch.cat(rows)
    if mesh is not None:
        rows = gather_rows(rows, mesh.get_group())
    return rows.sort().values.sum().sqrt()


def gather_rows(rows, group):
    """Every rank's rows, in rank order. Ranks hold different numbers of rows: each sends its count first (exact in
    float32 below 2**24 rows a rank), padded to the longest."""
    mine = torch.cat([torch.tensor([len(rows)], dtype=rows.dtype, device=rows.device), rows])
    longest = torch.tensor([len(mine)], device=rows.device)
    dist.all_reduce(longest, dist.ReduceOp.MAX, group=group)
    padded = F.pad(mine, (0, int(longest) - len(mine)))
    everyone = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, padded, group=group)
    return torch.cat([r[1:1 + int(r[0])] for r in everyone])


def clip_grad_norm(params, max_norm):
    """torch.nn.utils.clip_grad_norm_ with grad_norm's norm: scale the gradients so that their norm is at most
    max_norm. Returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = grad_norm(params)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if is_shard(p.grad):
            p.grad.to_local().mul_(scale)
        else:
            p.grad.mul_(scale)
    return norm
