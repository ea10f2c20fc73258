"""Training data for the reference model, with no downloads: bytes of text already on every machine.

The default corpus is the Python standard library's own ``.py`` files: code, comments and English docstrings
mixed, which gives experts something to specialize on (indentation, identifiers, prose, numbers). The files
are listed in sorted order, shuffled with ``random.Random(seed)`` and concatenated until the corpus has
``n_bytes``, so the same seed on the same Python installation gives the same bytes.

Where the standard library's sources are missing (some embedded or stripped Pythons ship only ``.pyc``), a
synthetic corpus stands in: a documented mixture of distinct byte sources (see ``synthetic_corpus``).

Shape legend: B batch, S sequence length (block_size), N corpus bytes.
"""

from __future__ import annotations

import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCES = ("auto", "stdlib", "synthetic")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_FILE_SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Corpus:
    """A byte corpus split into train and validation parts (uint8 tensors on the CPU)."""

    train_N: torch.Tensor
    val_N: torch.Tensor
    source: str  # "stdlib" or "synthetic"
    description: str  # where the bytes came from, for run metadata

    @property
    def vocab_size(self) -> int:
        return 256


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The standard library's ``.py`` files in sorted order, without installed packages or test suites."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        return []
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus_bytes(n_bytes: int, seed: int, root: str | os.PathLike[str] | None = None) -> bytes:
    """``n_bytes`` of standard-library source, files chosen in a seeded order; b"" if there are no sources."""
    files = stdlib_files(root)
    random.Random(seed).shuffle(files)
    parts: list[bytes] = []
    total = 0
    for path in files:
        if total >= n_bytes:
            break
        try:
            data = path.read_bytes()
        except OSError:
            continue
        parts.append(data)
        total += len(data) + len(_FILE_SEPARATOR)
    return _FILE_SEPARATOR.join(parts)[:n_bytes]


def synthetic_corpus(n_bytes: int, seed: int, n_sources: int = 8, alphabet: int = 24) -> bytes:
    """A mixture of ``n_sources`` distinct byte sources, in segments of 32 to 256 bytes.

    Source j emits bytes from its own alphabet (``alphabet`` consecutive byte values starting at 32 +
    j*alphabet, wrapping inside the printable range) with its own first-order Markov chain: each byte has 3
    likely successors. Segments switch source at random, so a model does best by recognizing the source from
    context: the kind of structure that lets experts specialize.
    """
    gen = torch.Generator().manual_seed(seed)
    printable = 126 - 32 + 1
    # (n_sources, alphabet, alphabet) transition matrices: three favoured successors per byte, the rest rare.
    logits_JAA = torch.randn(n_sources, alphabet, alphabet, generator=gen)
    favoured = torch.randint(0, alphabet, (n_sources, alphabet, 3), generator=gen)
    logits_JAA.scatter_add_(2, favoured, torch.full(favoured.shape, 4.0))
    trans_JAA = logits_JAA.softmax(dim=-1)
    cdf_JAA = trans_JAA.cumsum(dim=-1)
    cdf_JAA[..., -1] = 1.0  # guard the rounding of the cumulative sum
    chunks: list[torch.Tensor] = []
    total = 0
    while total < n_bytes:
        # M segments walked in lockstep for 256 steps, then each cut to its own length (32 to 256 bytes).
        M = n_bytes // 128 + 64
        source_M = torch.randint(0, n_sources, (M,), generator=gen)
        length_M = torch.randint(32, 257, (M,), generator=gen)
        state_M = torch.randint(0, alphabet, (M,), generator=gen)
        steps = []
        for _ in range(256):
            steps.append(state_M)
            u_M1 = torch.rand(M, 1, generator=gen)
            state_M = torch.searchsorted(cdf_JAA[source_M, state_M], u_M1).squeeze(1).clamp_(max=alphabet - 1)
        seq_MS = torch.stack(steps, dim=1)
        bytes_MS = 32 + (source_M.unsqueeze(1) * alphabet + seq_MS) % printable
        keep_MS = torch.arange(256).unsqueeze(0) < length_M.unsqueeze(1)
        chunks.append(bytes_MS[keep_MS])
        total += chunks[-1].numel()
    return torch.cat(chunks)[:n_bytes].to(torch.uint8).numpy().tobytes()


def build_corpus(
    n_bytes: int = 1_000_000, seed: int = 0, source: str = "auto", val_fraction: float = 0.1
) -> Corpus:
    """The corpus the demo trains on.

    ``source="auto"`` uses the standard library where it has enough sources, else the synthetic mixture.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if n_bytes < 1024:
        raise ValueError(f"n_bytes must be >= 1024, got {n_bytes}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    data = b""
    used = "synthetic"
    if source in ("auto", "stdlib"):
        data = stdlib_corpus_bytes(n_bytes, seed)
        used = "stdlib"
        if len(data) < n_bytes // 2:  # too little source on this installation to be worth using
            if source == "stdlib":
                raise RuntimeError(
                    f"the standard library under {sysconfig.get_paths()['stdlib']} has no .py files"
                )
            data, used = b"", "synthetic"
    if used == "synthetic":
        data = synthetic_corpus(n_bytes, seed)
    all_N = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n_val = max(int(len(all_N) * val_fraction), 1)
    if used == "stdlib":
        stdlib = sysconfig.get_paths()["stdlib"]
        description = f"{len(data)} bytes of Python standard-library source ({stdlib}), seed {seed}"
    else:
        description = f"{len(data)} bytes of the synthetic 8-source byte mixture, seed {seed}"
    return Corpus(
        train_N=all_N[:-n_val].clone(), val_N=all_N[-n_val:].clone(), source=used, description=description
    )


class BatchSampler:
    """Random (B, S) windows of a corpus split, as int64 inputs and next-byte targets on ``device``.

    Draws from its own generator, so the batches depend only on ``seed``, not on the global RNG.
    """

    def __init__(
        self,
        corpus: Corpus,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        split: str = "train",
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.data_N = corpus.train_N if split == "train" else corpus.val_N
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
        if len(self.data_N) <= block_size:
            raise ValueError(
                f"the {split} split has {len(self.data_N)} bytes, too few for block_size={block_size}"
            )
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_BS, y_BS): y is x shifted one byte ahead."""
        S = self.block_size
        start_B = torch.randint(0, len(self.data_N) - S, (self.batch_size,), generator=self.generator)
        window_BS = start_B.unsqueeze(1) + torch.arange(S + 1)  # (B, S + 1) positions
        chunk_BS = self.data_N[window_BS].long()
        x_BS, y_BS = chunk_BS[:, :-1], chunk_BS[:, 1:]
        if self.device.type == "cuda":
            return x_BS.pin_memory().to(self.device, non_blocking=True), y_BS.pin_memory().to(
                self.device, non_blocking=True
            )
        return x_BS.to(self.device), y_BS.to(self.device)

    def __iter__(self):
        while True:
            yield self.next()
