"""Training batches from a pair dir, in an order fixed by (seed, epoch) so a run can resume exactly.

Each rank reads its own slice of every global batch (no overlap across ranks), and the position
in the data is a pure function of the optimizer step: resuming needs only the step counter.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lftk.data.images import load_rgb
from lftk.data.pairset import PairSet, template_fields
from lftk.errors import LftkError
from lftk.runtime.pixels import image_to_model

TEMPLATE_KEY = "data.prompt_template"


def check_prompts(template: str, *pair_sets: PairSet | None) -> None:
    """Fail at start, not in a loader worker hours in: the template must fit every pair.

    Pairs of several horizons need `{horizon}` in the template: otherwise two pairs with the same
    frame and instruction ask for different futures under one prompt, and the model cannot tell
    the offsets apart. A template with `{horizon}` needs every pair to have one."""
    sets = [ps for ps in pair_sets if ps is not None]
    try:
        fields = template_fields(template)
    except LftkError as exc:
        raise LftkError(f"{TEMPLATE_KEY}: {exc}") from None
    horizons = sorted({h for ps in sets for h in ps.horizons()})
    if len(horizons) > 1 and "horizon" not in fields:
        where = ", ".join(str(ps.split_dir) for ps in sets)
        raise LftkError(
            f"{where}: the pairs have horizons {horizons} (frames ahead), but {TEMPLATE_KEY} {template!r} "
            "does not state the horizon, so the model could not tell the offsets apart: put {horizon} in it, "
            "e.g. data.prompt_template=\"Scene {horizon} frames after executing '{instruction}'\""
        )
    if "horizon" in fields:
        for ps in sets:
            missing = ps.without_horizon()
            if missing:
                raise LftkError(
                    f"{ps.prompt_source(missing[0])}: no 'horizon', but {TEMPLATE_KEY} {template!r} uses {{horizon}} "
                    f"({len(missing)} of {len(ps)} pairs in {ps.split_dir} have none)"
                )


class PairDataset(Dataset):
    """Pixels of (current, future) and the prompt's token ids; or, with `latents`, their cached VAE latents."""

    def __init__(self, items: PairSet, resolution: int, tokenizer, template: str, latents=None):
        self.items = items  # kept as is: its columns are shared with DataLoader workers, not copied
        self.future_pixels = False  # also return the future frame's pixels with cached latents (aux losses)
        self.current_pixels = False  # and the current frame's (colour-weighted loss)
        self.resolution = resolution
        self.tokenizer = tokenizer
        self.template = template
        self.latents = latents  # lftk.train.latent_cache.LatentArrays, row i = item i

    def __len__(self) -> int:
        return len(self.items)

    def _pixels(self, path: str) -> torch.Tensor:
        arr = load_rgb(path, self.resolution)  # (H, W, 3) uint8
        return image_to_model(arr)  # (3, H, W) in [-1, 1]

    def tokenize(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(
            text, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids[0]

    def __getitem__(self, key_index: tuple[int, int] | int) -> dict:
        # (key, index): key is the sample's global position in the data stream (seeds its noise).
        key, i = key_index if isinstance(key_index, tuple) else (key_index, key_index)
        items = self.items
        row = {"key": key, "input_ids": self.tokenize(items.format(i, self.template))}  # with pair i's horizon
        if self.latents is not None:
            if self.future_pixels:
                row["future"] = self._pixels(items.future(i))
            if self.current_pixels:
                row["current"] = self._pixels(items.current(i))
            return {**row, **self.latents.row(i)}
        return {**row, "current": self._pixels(items.current(i)), "future": self._pixels(items.future(i))}


class StepSampler(Sampler[tuple[int, int]]):
    """(key, index) for this rank from global batch `start_batch` on; epochs reshuffle with (seed, epoch).
    The key is the sample's position in the global stream, the same whatever the number of ranks."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start_batch: int = 0):
        if n < global_batch:
            raise ValueError(f"{n} training pairs are fewer than one global batch of {global_batch}")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.start_batch = seed, start_batch
        self.batches_per_epoch = n // global_batch  # drop the ragged tail: every step has the same batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_rank = self.global_batch // self.world
        batch = self.start_batch
        order_epoch, order = -1, None
        while True:
            epoch, within = divmod(batch, self.batches_per_epoch)
            if epoch != order_epoch:  # one permutation per epoch, not per batch
                order_epoch, order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
            chunk = order[within * self.global_batch : (within + 1) * self.global_batch]
            first = batch * self.global_batch + self.rank * per_rank
            mine = chunk[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
            yield from ((first + j, idx) for j, idx in enumerate(mine))
            batch += 1

    def __len__(self) -> int:  # endless; the loop stops at max_steps
        return 2**62


def make_loader(
    dataset: PairDataset, micro_batch: int, grad_accum: int, rank: int, world: int, seed: int, start_micro: int, workers: int
) -> DataLoader:
    """One micro batch per loader item; the sampler works in global micro batches (micro_batch x world)."""
    sampler = StepSampler(len(dataset), micro_batch * world, rank, world, seed, start_batch=start_micro)
    return DataLoader(
        dataset,
        batch_size=micro_batch,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )
