r"""Fit a GGUF artifact to a target: how many layers go to the GPU, which KV cache type, and the
largest context that fits with a margin, from the GGUF's own tensor bytes (its header only).

llama.cpp's ``-ngl N`` puts the output layer on the GPU first, then the last N-1 blocks
(``i_gpu_start = n_layer + 1 - N`` in ``llama-model.cpp``); the token embedding is looked up on
the CPU. A mixture of experts that does not fit whole is split the way its users run it: every
layer offloaded but the routed experts (``ffn_*_exps``) of the first N blocks kept in system RAM
(``--n-cpu-moe N``, i.e. ``-ot "blk\.(0|..|N-1)\.ffn_.*_exps=CPU"``); a token then reads only its
routed experts' rows there. A GPU or NPU target holds the offloaded layers, their KV cache and a compute buffer in
its own memory, and the rest in the host RAM beside it (``host_memory`` of the profile, when it
says); a CPU or a unified-memory SoC holds everything in one pool, offloading every layer when
its llama.cpp backend is a GPU one (Metal, CUDA on Jetson).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .estimate import DEFAULT_EFFICIENCY
from .schema import HardwareProfile

__all__ = ["GGUFLayout", "fit_gguf", "KV_TYPES"]

#: KV cache element bytes; a quantized V cache needs flash attention (``-fa on``)
KV_TYPES = {"f16": 2.0, "q8_0": 34 / 32}
UBATCH = 512  # llama.cpp's default physical batch
MARGIN_FRACTION, MARGIN_MIN = 0.05, 256 * 2**20  # kept free on each pool
CTX_STEP = 256


@dataclass
class GGUFLayout:
    """What the fit needs from a GGUF header."""

    layer_bytes: list[int]  # blk.N.* tensors, per block
    expert_bytes: list[int]  # of which the routed experts' stacked ffn_*_exps tensors
    expert_active: float  # routed experts a token reads / experts (1.0: dense)
    input_bytes: int  # token embedding and what else is not in a block or the output layer
    output_bytes: int  # output norm and head (the embedding again when the head is tied)
    n_layers: int
    n_head: int
    n_head_kv: int
    k_dim: int
    v_dim: int
    n_embd: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    swa_layers: frozenset[int]  # blocks whose cache holds only the sliding window
    n_swa: int

    @classmethod
    def of(cls, path: Path) -> GGUFLayout:
        from ..formats.gguf.header import read_header

        header = read_header(path)
        arch = header.fields["general.architecture"]

        def hp(key: str, default: Any = None) -> Any:
            return header.fields.get(f"{arch}.{key}", default)

        n_layers = int(hp("block_count"))
        layers, experts = [0] * n_layers, [0] * n_layers
        sizes = {t.name: int(t.n_bytes) for t in header.tensors}
        in_file = 0  # the output layer's tensors in the file
        for name, n in sizes.items():
            if m := re.match(r"^blk\.(\d+)\.", name):
                layers[int(m[1])] += n
                if "_exps." in name:
                    experts[int(m[1])] += n
            elif name.startswith("output"):
                in_file += n
        n_expert = int(hp("expert_count", 0) or 0)
        # tied: llama.cpp loads the embedding a second time as the head
        output = in_file + (0 if "output.weight" in sizes else sizes.get("token_embd.weight", 0))
        n_embd, n_head = int(hp("embedding_length")), int(hp("attention.head_count"))
        n_head_kv = hp("attention.head_count_kv", n_head)
        n_head_kv = max(n_head_kv) if isinstance(n_head_kv, list) else int(n_head_kv)
        n_swa = int(hp("attention.sliding_window", 0) or 0)
        pattern = hp("attention.sliding_window_pattern")
        if n_swa and isinstance(pattern, list):
            swa = frozenset(i for i, on in enumerate(pattern) if on)
        elif n_swa and arch == "gemma3":  # five sliding-window blocks, then one global (llama.cpp's default)
            swa = frozenset(i for i in range(n_layers) if (i + 1) % 6)
        else:
            swa = frozenset()
        ff = hp("feed_forward_length", 4 * n_embd)
        return cls(
            layer_bytes=layers, expert_bytes=experts,
            expert_active=int(hp("expert_used_count", 0) or 0) / n_expert if n_expert else 1.0, input_bytes=sum(sizes.values()) - sum(layers) - in_file, output_bytes=output, n_layers=n_layers, n_head=n_head, n_head_kv=n_head_kv,
            k_dim=int(hp("attention.key_length", n_embd // n_head)), v_dim=int(hp("attention.value_length", n_embd // n_head)),
            n_embd=n_embd, n_ff=int(max(ff) if isinstance(ff, list) else ff),
            n_vocab=len(header.fields["tokenizer.ggml.tokens"]), n_ctx_train=int(hp("context_length", 0) or 4096),
            swa_layers=swa, n_swa=n_swa)

    @classmethod
    def from_shape(cls, config: dict[str, Any], blocks: list[tuple[int, int]], bits: float, embedding_bits: float) -> GGUFLayout:
        """The layout a GGUF of ``bits`` per weight (``embedding_bits`` for the embedding and the
        head) would have, from an HF config.json and its blocks' (weights, routed experts)
        counts: what the planner fits before anything is converted."""
        from ..runtimes.hf import config_sizes, kv_dims
        from ..source import experts_of

        cfg = config.get("text_config") or config
        s = config_sizes(config)
        experts = experts_of(config)
        table = s["n_vocab"] * s["n_embd"] * embedding_bits / 8
        n_head_kv, k_dim, v_dim = kv_dims(config)
        types = cfg.get("layer_types") or []
        window = int(cfg.get("sliding_window") or 0)
        return cls(
            layer_bytes=[int(p * bits / 8) for p, _ in blocks], expert_bytes=[int(r * bits / 8) for _, r in blocks],
            expert_active=experts.used / experts.count if experts else 1.0, input_bytes=int(table), output_bytes=int(table),
            n_layers=s["n_layers"], n_head=s["n_head"], n_head_kv=n_head_kv, k_dim=k_dim, v_dim=v_dim, n_embd=s["n_embd"],
            n_ff=int(cfg.get("intermediate_size") or 4 * s["n_embd"]), n_vocab=s["n_vocab"],
            n_ctx_train=int(cfg.get("max_position_embeddings") or 4096),
            swa_layers=frozenset(i for i, t in enumerate(types) if t == "sliding_attention") if window else frozenset(), n_swa=window)

    def kv_bytes(self, layers: range | list[int], ctx: int, kv_type: str) -> int:
        """KV cache of ``layers`` at ``ctx`` tokens (a sliding-window block caches its window and
        one batch, as llama.cpp's default non-full SWA cache)."""
        per_token = self.n_head_kv * (self.k_dim + self.v_dim) * KV_TYPES[kv_type]
        return int(sum(per_token * (min(ctx, self.n_swa + UBATCH) if i in self.swa_layers else ctx) for i in layers))

    def compute_bytes(self, ctx: int, with_output: bool) -> int:
        """A compute buffer for one batch of UBATCH tokens: activations and, where the output
        layer runs, the logits of the batch (flash attention: no full score matrix)."""
        ubatch = min(UBATCH, ctx)
        return ubatch * (self.n_ff + 6 * self.n_embd) * 4 + (ubatch * self.n_vocab * 4 if with_output else self.n_vocab * 4)


def _margin(usable: int) -> int:
    return max(MARGIN_MIN, int(usable * MARGIN_FRACTION))


def _split(layout: GGUFLayout, ngl: int, ctx: int, kv_type: str, cpu_moe: int = 0) -> tuple[int, int]:
    """(device bytes, host bytes) with ``ngl`` layers offloaded (the output layer first) and the
    routed experts of the first ``cpu_moe`` blocks kept on the CPU."""
    output_on_gpu = ngl >= 1
    blocks_on_gpu = max(0, ngl - 1)
    gpu_layers = range(layout.n_layers - blocks_on_gpu, layout.n_layers)
    cpu_layers = range(0, layout.n_layers - blocks_on_gpu)
    kept = sum(layout.expert_bytes[i] for i in range(min(cpu_moe, layout.n_layers)) if i in gpu_layers)
    device = (sum(layout.layer_bytes[i] for i in gpu_layers) - kept + layout.kv_bytes(gpu_layers, ctx, kv_type)
              + (layout.output_bytes if output_on_gpu else 0))
    if ngl:
        device += layout.compute_bytes(ctx, output_on_gpu)
    host = (layout.input_bytes + sum(layout.layer_bytes[i] for i in cpu_layers) + kept + layout.kv_bytes(cpu_layers, ctx, kv_type)
            + (0 if output_on_gpu else layout.output_bytes) + layout.compute_bytes(ctx, not output_on_gpu))
    return device, host


def _pools(profile: HardwareProfile) -> tuple[int | None, int | None, bool]:
    """(device usable, host usable, separate pools): a GPU/NPU has its own memory and the host's
    RAM (unknown when the profile does not give it); a CPU or SoC one pool."""
    usable = profile.memory.total_bytes - profile.memory.reserved_bytes
    if profile.kind in ("gpu", "npu"):
        host = profile.host_memory
        return usable, (host.total_bytes - host.reserved_bytes) if host else None, True
    return usable, None, False


def fit_gguf(path: Path | str, profile: HardwareProfile, *, ctx: int | None = None, estimate: dict[str, Any] | None = None,
             layout: GGUFLayout | None = None, cpu_moe: bool = True) -> dict[str, Any]:
    """The split of the GGUF at ``path`` on ``profile``: ``n_gpu_layers``, ``kv_type``, the
    context (``ctx`` when asked, else the largest that fits, up to the training context) and the
    bytes on each pool; speeds estimated from ``estimate`` (the target's estimate for the whole
    model on its accelerator) when given. An artifact that does not fit even on the CPU alone is
    an InputError naming what is missing. ``layout``: the GGUF's, when already read (one header
    read for many profiles). ``cpu_moe=False``: whole layers only, for runtimes that cannot keep a
    mixture of experts' experts in RAM (Ollama, llama-cpp-python's server)."""
    path = Path(path)  # named in messages; read only when no layout is given
    layout = layout or GGUFLayout.of(path)
    llama = next((r for r in profile.runtimes if r.name == "llama.cpp" and "gguf" in r.formats), None)
    if llama is None:
        raise InputError(f"{profile.name}: no llama.cpp runtime in the profile to run a GGUF")
    device_usable, host_usable, separate = _pools(profile)
    offloads = llama.backend != "cpu"
    top = layout.n_layers + 1 if offloads else 0
    want = min(ctx or 4096, layout.n_ctx_train)

    def fits(ngl: int, n_ctx: int, kv_type: str, cpu_moe: int = 0) -> bool:
        device, host = _split(layout, ngl, n_ctx, kv_type, cpu_moe)
        if not separate:  # one pool holds both
            return device + host + _margin(device_usable) <= device_usable
        ok = device + _margin(device_usable) <= device_usable if ngl else True
        return ok and (host_usable is None or host + _margin(host_usable) <= host_usable)

    def best_at(n_ctx: int) -> tuple[int, str, int] | None:
        """The most layers offloaded at ``n_ctx`` tokens, an f16 cache first; for a mixture of
        experts that does not fit whole, every layer with the fewest blocks' experts on the CPU."""
        best = None
        for kv_type in KV_TYPES:
            ngl = next((n for n in range(top, -1, -1) if fits(n, n_ctx, kv_type)), None)
            if ngl is not None and (best is None or ngl > best[0]):
                best = (ngl, kv_type, 0)
            if best and best[0] == top:
                return best
        if cpu_moe and separate and offloads and any(layout.expert_bytes):
            # the fewest blocks' experts in RAM, a q8_0 cache when it keeps more of them on the GPU
            splits = []
            for kv_type in KV_TYPES:
                n = next((n for n in range(1, layout.n_layers + 1) if fits(top, n_ctx, kv_type, n)), None)
                if n is not None:
                    splits.append((n, kv_type))
            if splits:
                n, kv_type = min(splits, key=lambda s: s[0])
                return (top, kv_type, n)
        return best

    best = best_at(want)
    while best is None and not ctx and want > CTX_STEP:  # no context asked: settle for a shorter one
        want = max(CTX_STEP, want // 2)
        best = best_at(want)
    if best is None:
        device, host = _split(layout, 0, want, "q8_0")
        pool = host_usable if separate else device_usable
        missing = (host if separate else device + host) + _margin(pool or 0) - (pool or 0)
        raise InputError(f"{path.name} does not fit {profile.name} even with no layer offloaded at a {want}-token context: "
                         f"{(host if separate else device + host) / 1e9:.2f} GB needed, {(pool or 0) / 1e9:.2f} GB usable "
                         f"({missing / 1e9:.2f} GB missing)")
    ngl, kv_type, cpu_moe = best
    if ctx:
        n_ctx = want
    else:  # the largest context at this split: a multiple of CTX_STEP, or the training context
        steps = sorted({*range(want, layout.n_ctx_train, CTX_STEP), layout.n_ctx_train})
        lo, hi = 0, len(steps) - 1  # steps[lo] fits (it is ``want``)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(ngl, steps[mid], kv_type, cpu_moe) else (lo, mid - 1)
        n_ctx = steps[lo]
    device, host = _split(layout, ngl, n_ctx, kv_type, cpu_moe)
    result: dict[str, Any] = {
        "profile": profile.name, "backend": llama.backend, "n_gpu_layers": ngl, "n_cpu_moe": cpu_moe, "n_layers": layout.n_layers,
        "output_on_gpu": ngl >= 1, "all_layers_on_gpu": offloads and ngl == top, "kv_type": kv_type,
        "flash_attention": kv_type != "f16", "ctx": n_ctx, "ctx_largest": not ctx, "n_ctx_train": layout.n_ctx_train,
        "device_bytes": device if separate else None, "host_bytes": host if separate else device + host,
        "device_usable_bytes": device_usable if separate else None,
        "host_usable_bytes": host_usable if separate else device_usable,
        "host_memory_checked": (host_usable is not None) or not separate, "margin": f"{MARGIN_FRACTION:.0%}, at least {MARGIN_MIN >> 20} MiB per pool",
        "estimated": True,
    }
    if estimate and estimate.get("decode_tokens_per_s"):
        if separate:
            result.update(_speeds(layout, ngl, offloads, profile, estimate, cpu_moe, n_ctx, kv_type))
        else:  # one pool: the whole model runs where the target's estimate puts it
            result.update(decode_tokens_per_s=estimate["decode_tokens_per_s"], speed_note="the target's estimate")
    return result


def _speeds(layout: GGUFLayout, ngl: int, offloads: bool, profile: HardwareProfile, estimate: dict[str, Any],
            cpu_moe: int, ctx: int, kv_type: str) -> dict[str, Any]:
    """Decode of the split: the offloaded share of the bytes a token reads (weights and the KV
    cache at half the context) at the target's whole-model estimate, the rest at the host's
    bandwidth with the default efficiency (labelled so). A token reads a block's routed experts'
    share ``expert_active`` of its expert bytes."""
    blocks = max(0, ngl - 1) if offloads else 0
    gpu = range(layout.n_layers - blocks, layout.n_layers)

    def read(i: int, experts: bool = True) -> float:
        moe = layout.expert_bytes[i] * layout.expert_active
        return (moe if experts else 0) + layout.layer_bytes[i] - layout.expert_bytes[i] + layout.kv_bytes([i], ctx // 2, kv_type)

    on_device = (sum(read(i, experts=i >= cpu_moe) for i in gpu) + (layout.output_bytes if offloads and ngl else 0))
    total = sum(read(i) for i in range(layout.n_layers)) + layout.output_bytes
    share = on_device / max(1, total)
    # the per-token overhead of the target's calibrated estimate (kernel launches) is paid once,
    # whatever the split; the share scales only the time spent reading
    overhead = float(estimate.get("efficiency", {}).get("decode_overhead_s") or 0.0)
    seconds = overhead + share * max(0.0, 1.0 / estimate["decode_tokens_per_s"] - overhead)
    host_bw = profile.host_memory.bandwidth_bytes_per_s if profile.host_memory else None
    how = f"{share:.0%} of the bytes a token reads (weights, KV cache) on the {profile.kind} at its estimate"
    if share < 1:
        if not host_bw:
            return {"decode_tokens_per_s": None, "speed_note": "host bandwidth unknown: the CPU share cannot be estimated"}
        seconds += (total - on_device) / (host_bw * DEFAULT_EFFICIENCY["decode"])
        how += f", the rest at the host's {host_bw / 1e9:.0f} GB/s x {DEFAULT_EFFICIENCY['decode']} (default efficiency)"
    return {"decode_tokens_per_s": 1.0 / seconds, "speed_note": how}
