"""WebDataset tar shards, streamed: data larger than memory, read by every rank and DataLoader worker
from its own shards (`key.jpg|png|webp` + `key.cls` label + `key.txt` caption per sample, about 1,000
samples a shard, as open_clip and img2dataset write them, or cl-pack).

An epoch is floor(samples / global batch) steps on every rank. Its shards are shuffled from (seed,
epoch) and dealt to ranks, then to each rank's workers; each worker reads its shards through a shuffle
buffer and yields its quota of batches (its share of the rank's steps, in proportion to its samples).
A worker whose shards run out first reads them again (a second lap); one with more leaves the rest.
Every batch carries its worker's reading position (lap, shard, samples read in it) and the places of
the samples its shuffle buffer holds, which a checkpoint written inside an epoch keeps: a resumed worker
reads those samples again into its buffer and goes on from the position, so the resumed epoch trains on
every sample the stopped one had not, once (in another order than an uninterrupted run)."""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UserError
from .images import Splits
from .samples import DAMAGED, IMAGE_KEYS, decode_on, parse, read_samples, webdataset

log = logging.getLogger(__name__)
INDEX = "index.json"  # what cl-pack writes beside its shards
FORMAT = "contrastive_cli/shards/1"  # its format
POSITION = 4  # a worker's reading position: lap, shard in the lap, samples read from that shard, batches yielded
# (then how many samples its buffer holds and, for each, its shard place in the lap and number in the shard)


@dataclass
class Shard:
    path: str
    count: int


def shard_paths(path: str, key: str = "dataset.source.path") -> tuple[list[str], Path | None]:
    """The training shards of a folder (cl-pack's, or every .tar in it), a brace list
    ('shard-{000000..000099}.tar', as open_clip takes them) or one .tar; and the folder holding them."""
    from braceexpand import braceexpand

    p = os.path.expanduser(str(path))
    if os.path.isdir(p):
        index = Path(p, INDEX)
        if index.is_file():
            names = [s["name"] for s in _read_index(index)["train"]]
        else:
            names = sorted(n for n in os.listdir(p) if n.endswith(".tar") and not n.startswith((".", "test-")))
        if not names:
            raise UserError(f"{key}={path}: a folder with no .tar shards in it")
        return [os.path.join(p, n) for n in names], Path(p)
    found = list(braceexpand(p))
    there = [f for f in found if os.path.isfile(f)]
    if not there:
        raise UserError(f"{key}={path}: matches no shard file ({len(found)} name(s) expanded, none exists)")
    if len(there) < len(found):
        log.warning("%s: %d of the %d shards it names do not exist; training on the other %d", path,
                    len(found) - len(there), len(found), len(there))
    return there, Path(there[0]).parent


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
        index["train"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{path}: not an index of shards (cl-pack writes it; delete it to count the shards "
                        "another way)") from None
    return index


def shard_counts(paths: list[str], folder: Path | None, num_samples: int | None, key: str) -> list[Shard]:
    """Samples per shard: from cl-pack's index.json, else a sizes.json (open_clip's), else num_samples
    spread evenly, else one line saying which to give."""
    names = {os.path.basename(p): p for p in paths}
    index, sizes = (folder / INDEX, folder / "sizes.json") if folder else (None, None)
    if index is not None and index.is_file():
        counts = {s["name"]: int(s["count"]) for part in ("train", "test") for s in _read_index(index).get(part, [])}
    elif sizes is not None and sizes.is_file():
        try:
            counts = {os.path.basename(k): int(v) for k, v in json.loads(sizes.read_text()).items()}
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            raise UserError(f"{sizes}: not a sizes.json (a JSON object of shard name: sample count)") from None
    elif num_samples:
        base, extra = divmod(int(num_samples), len(paths))
        return [Shard(p, base + (i < extra)) for i, p in enumerate(paths)]
    else:
        raise UserError(f"{key}: the number of samples in its shards is unknown; give dataset.source.num_samples=N, "
                        f"or put a sizes.json (shard name: count) beside them, or pack them with cl-pack")
    missing = [n for n in names if n not in counts]
    if missing:
        raise UserError(f"{key}: {missing[0]} is not counted in {index if index.is_file() else sizes}; "
                        "give dataset.source.num_samples=N instead")
    return [Shard(p, counts[n]) for n, p in names.items()]


@dataclass
class ShardImages:
    """A split of shards: what the loop, cl-eval and cl-embed take batches from (`stream`)."""

    shards: list[Shard]
    image_size: int
    channels: int
    classes: list[str] = field(default_factory=list)
    labeled: bool = False  # every sample has a .cls
    has_captions: bool = False  # samples have a .txt
    shuffle_buffer: int = 1000
    decode: str = "cpu"  # or gpu: the workers pass the encoded bytes, the device decodes the batch
    tokenize: object = None  # the image-text methods' tokenizer: batches then carry caption tokens for labels

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def all_labeled(self) -> bool:
        """Every batch carries labels: .cls, or, for the image-text methods, the captions' tokens."""
        return self.labeled or self.tokenize is not None

    def device(self) -> torch.device:
        """Where dataset.decode=gpu decodes: this process's CUDA device (its rank's, under DDP)."""
        return torch.device("cuda", torch.cuda.current_device())

    def head(self, n: int) -> torch.Tensor:
        """The first n readable images of the first shards, uint8 (n, C, S, S)."""
        for x, _ in self.stream(n, seed=0, epoch=0, shuffle=False, drop_last=False):  # the evaluation's order
            return x
        raise UserError(f"{self.shards[0].path}: no readable image in these shards")

    def check_slots(self, world: int, workers: int) -> None:
        slots = world * max(1, workers)
        if len(self.shards) < slots:
            raise UserError(f"{len(self.shards)} shard(s) for {world} process(es) x {max(1, workers)} worker(s): every "
                            f"worker reads its own shards, so {slots} are needed; lower trainer.workers, or re-pack "
                            f"with a smaller shard_size (cl-pack ... shard_size={max(1, len(self) // slots)})")

    def stream(self, batch_size: int, seed: int, epoch: int, workers: int = 0, pin: bool = False,
               shuffle: bool = True, drop_last: bool = True, rank: int = 0, world: int = 1, start: int = 0,
               resume: torch.Tensor | None = None) -> Stream:
        return Stream(self, batch_size, seed, epoch, workers, pin, shuffle, drop_last, rank, world, start, resume)


def deal(shards: list[Shard], seed: int, epoch: int, rank: int, world: int, workers: int) -> list[list[int]]:
    """Each worker's shards (indices) for this rank and epoch: shuffled from (seed, epoch), dealt to
    ranks, then to the rank's workers (webdataset's split by node, then by worker)."""
    order = torch.randperm(len(shards), generator=torch.Generator().manual_seed(seed * 7_919 + epoch)).tolist()
    mine = order[rank::world]
    return [mine[w::workers] for w in range(workers)]


def quotas(samples: list[int], steps: int) -> list[int]:
    """`steps` batches shared between workers in proportion to their samples (largest remainders)."""
    total = sum(samples) or 1
    exact = [steps * s / total for s in samples]
    q = [int(e) for e in exact]
    for i in sorted(range(len(q)), key=lambda i: q[i] - exact[i])[: steps - sum(q)]:
        q[i] += 1
    return q


class Stream:
    """One rank's batches of one epoch: `steps` of them when training (drop_last), or every sample once
    in shard order (evaluation: shuffle=False). `position()` is where each worker has got to."""

    def __init__(self, data: ShardImages, batch_size, seed, epoch, workers, pin, shuffle, drop_last, rank, world,
                 start, resume):
        self.data, self.batch_size, self.pin, self.shuffle = data, batch_size, pin, shuffle
        self.workers = max(1, workers) if shuffle else 1
        self.loader_workers = workers if shuffle else 0
        self.seed, self.epoch, self.rank = seed, epoch, rank
        if shuffle:
            data.check_slots(world, workers)
            self.plan = deal(data.shards, seed, epoch, rank, world, self.workers)
            steps = len(data) // (batch_size * world) if drop_last else -(-len(data) // (batch_size * world))
            self.quota = quotas([sum(data.shards[i].count for i in p) for p in self.plan], steps)
        else:  # every sample once, in order
            self.plan, self.quota = [list(range(len(data.shards)))], [-1]
        width = POSITION + 1 + 2 * (data.shuffle_buffer if shuffle else 0)
        self.pos = torch.zeros(self.workers, width, dtype=torch.long)
        if resume is not None:
            if tuple(resume.shape) != (self.workers, width):
                raise UserError(f"the checkpoint stopped inside an epoch read by {len(resume)} worker(s) per process "
                                f"with another shuffle buffer; resume with trainer.workers={len(resume)} and "
                                f"dataset.source.shuffle_buffer as it was")
            self.pos = resume.clone()
        elif start:
            raise UserError("a shards epoch resumes from the workers' positions, which this checkpoint does not hold")
        self.steps = sum(self.quota) - int(self.pos[:, 3].sum()) if shuffle else -1

    def __len__(self) -> int:
        return self.steps

    def position(self) -> torch.Tensor:
        return self.pos.clone()

    def __iter__(self):
        d = self.data
        encoded = d.decode == "gpu"
        source = _Workers(d.shards, self.plan, self.quota, self.pos.clone(), self.batch_size, d.image_size,
                          d.channels, d.shuffle_buffer if self.shuffle else 0, encoded, d.tokenize,
                          (self.seed, self.epoch, self.rank))
        loader = DataLoader(source, batch_size=None, num_workers=self.loader_workers, pin_memory=self.pin,
                            generator=torch.Generator().manual_seed(self.seed * 100_019 + self.epoch * 1_013 + self.rank))
        for item in loader:
            if isinstance(item, str):  # a worker's one-line error (an exception would arrive with its traceback)
                raise UserError(item)
            x, y, meta = item
            self.pos[int(meta[0])] = meta[1:]
            if encoded:
                x = decode_on(d.device(), x, d.image_size, d.channels)
            yield x, y


class _Workers(IterableDataset):
    """What each DataLoader worker runs: its shards, laps, shuffle buffer and batches (see the module)."""

    def __init__(self, shards, plan, quota, pos, batch_size, size, channels, buffer, encoded, tokenize, seeds):
        self.shards, self.plan, self.quota, self.pos = shards, plan, quota, pos
        self.batch_size, self.size, self.channels, self.buffer = batch_size, size, channels, buffer
        self.encoded, self.tokenize, self.seeds = encoded, tokenize, seeds

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        try:
            yield from self._run(w)
        except UserError as e:
            yield str(e)

    def _lap(self, w: int, lap: int) -> list[int]:
        mine = self.plan[w]
        if lap == 0:
            return mine
        rng = random.Random(hash((*self.seeds, w, lap)))
        return rng.sample(mine, len(mine))

    def _samples(self, shard: Shard, skip: int = 0, only: set[int] | None = None):
        """(number in the shard from 1, parsed sample or None) after the first `skip` (or only those in
        `only`); a damaged shard ends early with one warning."""
        read, bad = 0, 0
        try:
            for _, fields in read_samples(shard.path):
                read += 1
                if read <= skip or (only is not None and read not in only):
                    continue
                got = parse(fields, self.size, self.channels, self.encoded)
                bad += got is None
                yield read, got
        except DAMAGED as e:
            log.warning("skipped the rest of shard %s: corrupt or truncated (%s)", shard.path,
                        str(e).split(" @ ")[0][:120])
        if bad and only is None:
            log.warning("skipped %d sample(s) of shard %s without a readable image", bad, shard.path)

    def _run(self, w: int):
        lap, at, skip, done, held = (int(v) for v in self.pos[w, :5])
        quota, size = self.quota[w], self.batch_size
        rng = random.Random(hash((*self.seeds, w, lap, at, skip, done)))
        order = self._lap(w, lap)
        buffer = []  # (sample, shard place in the lap, number in the shard): a checkpoint names what it holds
        pairs = self.pos[w, 5 : 5 + 2 * held].view(-1, 2).tolist()
        for place in sorted({a for a, _ in pairs}):  # resumed: what the buffer held at the stop, read again
            wanted = {n for a, n in pairs if a == place}
            buffer += [(got, place, n) for n, got in self._samples(self.shards[order[place]], only=wanted) if got]
        batch, read_in_lap = [], len(buffer)
        while quota < 0 or done < quota:
            order = self._lap(w, lap)
            if at >= len(order):  # the lap is over: what the buffer holds goes out in random order
                while buffer and (quota < 0 or done < quota):
                    batch.append(buffer.pop(rng.randrange(len(buffer)))[0])
                    if len(batch) == size:
                        done += 1
                        yield self._collate(batch, (w, lap, at, 0, done), buffer)
                        batch = []
                if quota < 0:
                    break
                if read_in_lap == 0:
                    raise UserError(f"no readable sample in the shards of this worker ({self.shards[order[0]].path}"
                                    f"{' and others' if len(order) > 1 else ''})")
                lap, at, skip, read_in_lap = lap + 1, 0, 0, 0
                continue
            for n, got in self._samples(self.shards[order[at]], skip):
                if got is None:
                    continue
                read_in_lap += 1
                buffer.append((got, at, n))
                while len(buffer) > self.buffer:
                    batch.append((buffer.pop(rng.randrange(len(buffer))) if self.buffer else buffer.pop(0))[0])
                    if len(batch) == size:
                        done += 1
                        yield self._collate(batch, (w, lap, at, n, done), buffer)
                        batch = []
                        if done == quota:
                            return
            at, skip = at + 1, 0
        if quota < 0 and batch:
            yield self._collate(batch, (w, lap, at, 0, done + 1), buffer)

    def _collate(self, batch, where, buffer):
        images = [b[0] for b in batch]
        x = images if self.encoded else torch.stack(images)
        if self.tokenize is not None and all(b[2] is not None for b in batch):
            y = self.tokenize([b[2] for b in batch])
        else:
            y = torch.tensor([b[1] for b in batch], dtype=torch.long)
        # where this worker has got to: (lap, shard place, samples read there, batches), then what its buffer holds
        meta = torch.full((1 + POSITION + 1 + 2 * self.buffer,), -1, dtype=torch.long)
        meta[: 1 + POSITION] = torch.tensor(where)
        meta[1 + POSITION] = len(buffer)
        if buffer:
            meta[2 + POSITION : 2 + POSITION + 2 * len(buffer)] = torch.tensor([(a, n) for _, a, n in buffer]).view(-1)
        return x, y, meta


def _peek(path: str) -> dict:
    """The fields of a shard's first sample (what its samples hold)."""
    try:
        for _, fields in read_samples(path, None):
            return fields
    except DAMAGED as e:
        raise UserError(f"{path}: not a readable tar shard ({str(e).split(' @ ')[0][:120]})") from None
    raise UserError(f"{path}: an empty shard (no samples)")


def load_shards(path: str, image_size: int = 64, channels: int = 3, num_samples: int | None = None,
                test_path: str | None = None, shuffle_buffer: int = 1000, decode: str = "auto") -> Splits:
    """Shards as a dataset: training shards from `path`, held-out ones from `test_path` (cl-pack's
    test-*.tar beside the training shards are found by themselves). Labels from .cls, class names from
    cl-pack's index.json; without labels there is no test split (as a flat image folder)."""
    webdataset()
    import torchvision.io  # noqa: F401  (imported once here, not in each worker's first batch: about a second)

    if decode not in ("auto", "cpu", "gpu"):
        raise UserError(f"dataset.decode={decode}: choose from auto, cpu, gpu")
    if decode == "gpu" and not torch.cuda.is_available():
        raise UserError("dataset.decode=gpu: no CUDA device here; use dataset.decode=cpu (the workers decode)")
    paths, folder = shard_paths(path)
    shards = shard_counts(paths, folder, num_samples, f"dataset.source.path={path}")
    index = _read_index(folder / INDEX) if folder and (folder / INDEX).is_file() else {}
    first = _peek(shards[0].path)
    ext = next((k for k in IMAGE_KEYS if k in first), None)
    if ext is None:
        raise UserError(f"{shards[0].path}: its samples have no image (found {', '.join(sorted(k for k in first if not k.startswith('__'))) or 'nothing'}; "
                        f"expected one of .{', .'.join(IMAGE_KEYS)})")
    if decode == "auto":  # measured: docs/benchmarks.md, "Data that does not fit in memory"
        decode = "gpu" if torch.cuda.is_available() and ext in ("jpg", "jpeg") else "cpu"
    if decode == "gpu" and ext not in ("jpg", "jpeg"):
        raise UserError(f"dataset.decode=gpu: the shards hold .{ext} images; the GPU decodes JPEG only "
                        "(use dataset.decode=cpu)")
    labeled = "cls" in first
    classes = list(index.get("classes") or [])
    common = dict(image_size=image_size, channels=channels, classes=classes, labeled=labeled,
                  has_captions="txt" in first, shuffle_buffer=shuffle_buffer, decode=decode)
    train = ShardImages(shards, **common)
    test_names = [s["name"] for s in index.get("test", [])]
    test = None
    if test_path:
        t_paths, t_folder = shard_paths(test_path, "dataset.source.test_path")
        test = ShardImages(shard_counts(t_paths, t_folder, None, f"dataset.source.test_path={test_path}"), **common)
    elif test_names:
        test = ShardImages(shard_counts([str(folder / n) for n in test_names], folder, None,
                                        f"dataset.source.path={path}"), **common)
    if test is not None and not labeled:
        test = None
    log.info("shards %s: %d samples in %d shards for training%s", path, len(train), len(train.shards),
             f", {len(test)} held out" if test is not None else "")
    return Splits(train, test)

