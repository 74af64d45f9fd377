"""Which tokens a route keeps: uniform random per sample (TREAD), a custom selector, protected tokens."""

from __future__ import annotations

import os
import zlib

import torch

from .route import RouteError, Selector


def distributed_rank() -> int:
    """This process's rank: from torch.distributed when it is initialised, else the launcher's RANK."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


class RoutingGenerator:
    """A method's random draws, seeded from ``seed`` (or torch's initial seed), the rank and the method's
    ``stream`` name, so every distributed rank draws different masks, two methods given one seed draw
    independent ones, and a fixed seed repeats them.

    The default draw (``scores``) hashes a per-device counter: plain tensor arithmetic that torch.compile
    traces into the model's graph, the same numbers eager or compiled, on any device. Custom selectors get a
    ``torch.Generator`` per device (``get``), seeded alike."""

    RANK_STRIDE = 1_000_003
    COUNTER_KEY = "counter:"  # state_dict keys of the counters, beside the generators' device keys
    SEED_KEY = "seed"

    def __init__(self, seed: int | None = None, stream: str = ""):
        self.seed = seed
        self.salt = zlib.crc32(stream.encode()) if stream else 0
        self._base: int | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._streams: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device: (counter, seed words)

    def base_seed(self) -> int:
        """The seed every draw derives from, fixed at the first draw (the rank is known by then)."""
        if self._base is None:
            seed = torch.initial_seed() if self.seed is None else self.seed
            self._base = (seed + self.RANK_STRIDE * distributed_rank() + self.salt) % (2**63)
        return self._base

    def get(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.base_seed())
            self._generators[device] = generator
        return generator

    def scores(self, rows: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """(rows, num_tokens) independent random int64 scores in [0, 2**32), the next ones of this device's
        stream: hashes of (seed, position in the stream)."""
        counter, (seed_low, seed_high) = self._stream(device)
        position = counter + torch.arange(rows * num_tokens, device=device)
        counter.add_(rows * num_tokens)
        low, high = position & _MASK32, position >> 32
        hashed = hash32(hash32(low ^ seed_low) ^ high ^ seed_high)
        return hashed.view(rows, num_tokens)

    def _stream(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A device's counter and the base seed's two 32-bit words, as tensors the draw reads as data."""
        if device not in self._streams:
            self._make_stream(device)
        return self._streams[device]

    @torch.compiler.disable
    def _make_stream(self, device: torch.device) -> None:
        """Made at a device's first draw, outside any torch.compile graph: the seed is fixed then (the rank is
        known) and enters graphs as a tensor, so models of other seeds share their graphs (as a Python int it
        would be burnt in, or made a symbol whose arithmetic overflows int64 in generated kernels)."""
        self._streams[device] = (torch.zeros((), dtype=torch.int64, device=device),
                                 _seed_words(self.base_seed()).to(device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The draws' states (the seed, each device's counter and generator), for checkpoints that resume
        routing exactly."""
        state = {str(device): gen.get_state() for device, gen in self._generators.items()}
        state.update({self.COUNTER_KEY + str(device): counter.detach().cpu().clone()
                      for device, (counter, _) in self._streams.items()})
        if self._base is not None:  # fixed at the first draw, once the rank is known: not here
            state[self.SEED_KEY] = torch.tensor(self._base, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Draw on as the saved generator would: a device it had not drawn on starts its streams afresh here."""
        for device, (counter, _) in self._streams.items():
            if self.COUNTER_KEY + str(device) not in state:
                counter.zero_()
        for device in [d for d in self._generators if str(d) not in state]:
            del self._generators[device]  # remade from the seed at its next use
        if self.SEED_KEY in state:
            self._base = int(state[self.SEED_KEY])
            for _, words in self._streams.values():  # in place: compiled graphs hold these tensors
                words.copy_(_seed_words(self._base))
        for key, value in state.items():
            if key == self.SEED_KEY:
                continue
            if key.startswith(self.COUNTER_KEY):
                self._stream(torch.device(key[len(self.COUNTER_KEY):]))[0].copy_(value)
            else:
                self.get(torch.device(key)).set_state(value)


_MASK32 = 0xFFFFFFFF


def _seed_words(seed: int) -> torch.Tensor:
    """A seed in [0, 2**63) as its low and high 32-bit words (int64), the form the draw hashes."""
    return torch.tensor([seed & _MASK32, seed >> 32], dtype=torch.int64)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of int64 values in [0, 2**32), kept there: the products stay
    below 2**63. Any device; torch.compile traces it."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def draw_keep(
    tokens: torch.Tensor,
    num_keep: int,
    generator: RoutingGenerator,
    *,
    shared: bool = False,
    protect: torch.Tensor | None = None,
    selector: Selector | None = None,
) -> torch.Tensor:
    """Indices (B, K) of the tokens to keep, ascending so kept tokens stay in their original order.

    ``tokens``: the routable tokens (B, N, ...). ``generator``: the method's, drawn from on the tokens'
    device (its counter-hash scores; a custom selector gets its ``torch.Generator``). ``shared``: one draw for
    the whole batch (needed when a batch-free table such as a rotary embedding must be gathered with the
    tokens). ``protect``: bool (N,) or (B, N), True for tokens that must never be routed. Runs on the tokens'
    device, no sync; a custom ``selector``'s result is checked against ``shared`` and ``protect`` (one sync)
    and refused where it breaks them.
    """
    batch, num_tokens = tokens.shape[0], tokens.shape[1]
    if selector is not None:
        keep = _from_selector(selector(tokens, num_keep, generator.get(tokens.device)), batch, num_tokens, num_keep)
        _check_selection(keep, selector, shared=shared, protect=protect)
    else:
        rows = 1 if shared else batch
        scores = generator.scores(rows, num_tokens, tokens.device)
        if protect is not None:
            scores = scores.masked_fill(protect.to(tokens.device), -1)
        keep = scores.topk(num_keep, dim=1, largest=False, sorted=False).indices
        if shared:
            keep = keep.expand(batch, -1)
    return keep.sort(dim=1).values


def _check_selection(keep: torch.Tensor, selector: Selector, *, shared: bool, protect: torch.Tensor | None) -> None:
    """A custom selector must honour what the route requires; it is refused, never silently overridden."""
    name = getattr(selector, "__name__", type(selector).__name__)
    if shared and keep.shape[0] > 1 and bool((keep.sort(dim=1).values != keep[:1].sort(dim=1).values).any()):
        raise RouteError(
            f"the route's selector {name} chose different tokens per sample, but a batch-free token table (a "
            "rotary embedding without a batch axis) crosses this route, so one selection must serve the whole "
            "batch; return the same keep indices for every sample (e.g. select on tokens[:1] and expand)")
    if protect is not None:
        kept = torch.zeros(keep.shape[0], protect.shape[-1], dtype=torch.bool, device=keep.device)
        kept.scatter_(1, keep, True)
        if bool((protect.to(keep.device) & ~kept).any()):
            raise RouteError(
                f"the route's selector {name} dropped protected tokens; keep every token that protect= marks "
                "(the selector gets no protect mask: drop protect=, or make the selector keep those tokens)")


def _from_selector(result: torch.Tensor, batch: int, num_tokens: int, num_keep: int) -> torch.Tensor:
    if not isinstance(result, torch.Tensor):
        raise RouteError(f"the route's selector returned {type(result).__name__}; return keep indices (B, K) or a bool keep mask (B, N)")
    if result.dtype == torch.bool:
        if tuple(result.shape) != (batch, num_tokens):
            raise RouteError(f"the selector's keep mask has shape {tuple(result.shape)}; expected ({batch}, {num_tokens})")
        counts = result.sum(dim=1)
        if bool((counts != num_keep).any()):
            raise RouteError(
                f"the selector's keep mask keeps {counts.tolist()} tokens per sample; every sample must keep "
                f"exactly {num_keep} (N - int(N * ratio))"
            )
        return result.float().topk(num_keep, dim=1).indices
    if result.dtype not in (torch.int64, torch.int32) or tuple(result.shape) != (batch, num_keep):
        raise RouteError(
            f"the selector returned a {result.dtype} tensor of shape {tuple(result.shape)}; return int64 keep "
            f"indices of shape ({batch}, {num_keep}) or a bool keep mask of shape ({batch}, {num_tokens})"
        )
    return result.long()


def check_protect(protect: torch.Tensor, batch: int, num_tokens: int, num_keep: int) -> torch.Tensor:
    """Validate a never-route mask against the tokens of one forward; returns it as bool (B or 1, N)."""
    if protect.dtype != torch.bool or protect.shape[-1] != num_tokens or protect.dim() not in (1, 2):
        raise RouteError(
            f"protect mask of shape {tuple(protect.shape)} and dtype {protect.dtype} does not fit {num_tokens} "
            f"routable tokens; give a bool tensor of shape ({num_tokens},) or ({batch}, {num_tokens})"
        )
    protect = protect.reshape(-1, num_tokens)
    if protect.shape[0] not in (1, batch):
        raise RouteError(f"protect mask has {protect.shape[0]} rows for a batch of {batch}")
    most = int(protect.sum(dim=1).max())
    if most > num_keep:
        raise RouteError(
            f"{most} tokens are protected but a route keeps only {num_keep} of {num_tokens}; lower the ratio "
            "or protect fewer tokens"
        )
    return protect
