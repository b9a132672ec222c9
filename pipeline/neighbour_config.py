"""The nearest-neighbour index's settings, apart from pipeline/neighbours.py so that the command
line (which shows these defaults) does not import faiss and scipy in every `vlforge` process."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NeighbourConfig:
    ivf_threshold: int = 50_000  # below this many vectors the exact flat index is fast enough
    nlist: int | None = None  # None: clamp(4 * sqrt(n), 16, 65536)
    nprobe: int = 32
    batch_size: int = 4096
    use_gpu: bool = True  # only takes effect when faiss has GPUs
    seed: int = 1234
    train_size: int = 39  # training vectors per list (faiss's minimum without a warning)
    train_iterations: int = 5  # k-means passes; recall depends on nprobe far more than on these
    storage: str = "fp16"  # IVF list vectors: "fp16" (half the bytes to scan) or "flat" (float32)
    pq_threshold: int = 2_000_000  # at/above this many vectors: IVF-PQ (memory, see above)
    pq_bytes: int = 32  # bytes per vector in IVF-PQ (sub-quantizers of 8 bits)
