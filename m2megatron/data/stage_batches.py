"""Each rank's microbatches for one optimizer step: only the ranks that consume images read and decode them.

    batches = StageBatches(cfg.data, tokenizer, image_size=S, micro_batch_size=b, num_microbatches=M,
                           groups=groups, seed=cfg.train.seed)      # every rank
    microbatches = batches.next_step()   # every rank, once per step (collectives inside, same order)
    state = batches.state_dict()         # every rank: into the checkpoint's per-rank state
    batches.load_state_dict(state)       # on resume, before the first next_step()
    batches.load_global_state(states)    # or, after a layout change: every saved rank's state
    batches.skipped()                    # skip counts by reason: the reading rank's ({} on the others)
    batches.close()

`next_step()` returns M dicts, on `groups.device`:
- first pipeline stage: {"images": float32 [b, 3, S, S] in [−1, 1], "text_ids": long [b, L], "text_mask": long
  [b, L], "microbatch": i}; the images travel as uint8 (to the device and over the TP broadcast: a quarter of
  the bytes) and are normalized on the device (image.normalize_images, bit for bit the host's normalize_uint8);
- later stages: {"text_mask": long [b, L], "microbatch": i} (all they need).

Roles, per data-parallel replica (the TP×PP ranks of one DP rank):
- the **reading rank** (tp 0, pp 0) owns the replica's `TrainLoader` (the only one reading the source,
  with its background thread, DALI pipeline or PIL workers) and its resumable state;
- text ids and masks reach the replica's other ranks by one broadcast of [M, 2, b, L] over Megatron's
  model-parallel group (`groups.collection.mp`);
- images reach the first stage's other TP ranks (`DataConfig.tp_decode`):
  - broadcast (default): the reader decodes everything (ahead of time, in its loader) and broadcasts
    each microbatch's images over `groups.tp`;
  - split: the reader's loader runs in the step, and each chunk's encoded bytes are broadcast over
    `groups.tp`; every TP rank decodes 1/TP and the slices are all-gathered (`split_decode`);
- later pipeline stages never see images.

Order of collectives (the same on every rank): [split only: the tp decode rounds, first stage], the mp
text broadcast, then [broadcast only: M image broadcasts over tp, first stage]. Groups of one rank are
skipped.

State: the reading rank returns its loader's state (`TrainLoader.state_dict()`, unchanged), the other
ranks `FOLLOWER_STATE`; each accepts what it returned (a non-reading rank ignores any state). Exact
resume and skip accounting are therefore those of the single loader. After a layout change,
`load_global_state(states)` takes every saved rank's state: each new reading rank continues with its
share of the samples no saved reader had returned (TrainLoader.load_global_state). Global rank 0 (tp 0, pp 0, dp 0)
is a reading rank, so the logging rank has its replica's skip counts.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from m2megatron.config.data import DataConfig
from m2megatron.data.build import build_train_loader, image_limits
from m2megatron.data.decode import build_decoder, resolve_decoder_kind
from m2megatron.data.image import normalize_images
from m2megatron.parallel.device import to_device

log = logging.getLogger("m2megatron.data")
FOLLOWER_STATE = {"stage_batches": "not the reading rank"}


class StageBatches:
    """Per-step microbatches for this rank (see the module docstring)."""

    def __init__(self, cfg: DataConfig, tokenizer, *, image_size: int, micro_batch_size: int,
                 num_microbatches: int, groups, seed: int):
        self.groups, self.image_size, self.num_microbatches = groups, image_size, num_microbatches
        self.b = micro_batch_size
        self.text_length = tokenizer.max_length
        layout = groups.layout
        self.reader_rank = layout.rank(0, groups.dp_rank, 0)
        self.is_reader = groups.rank == self.reader_rank
        self.is_first_stage = groups.is_first_stage
        self.tp_size, self.mp = layout.tensor_parallel, groups.collection.mp
        self.mp_size = layout.tensor_parallel * layout.pipeline_parallel
        self.mode = "broadcast" if cfg.source == "synthetic" or self.tp_size == 1 else cfg.tp_decode
        self.loader = self._follower = self._split = None
        self.seen_keys = cfg.samples_seen_keys()
        self.last_keys: list[str] = []  # the reading rank's sample keys of the last step (loss-spike logs)
        if self.mode == "split" and self.is_first_stage:
            self._build_split(cfg, tokenizer, seed)
        elif self.is_reader:
            self.loader = build_train_loader(cfg, tokenizer=tokenizer, image_size=image_size,
                                             micro_batch_size=micro_batch_size, dp_rank=groups.dp_rank,
                                             dp_size=layout.data_parallel, seed=seed,
                                             gpu=groups.device.type == "cuda", device=groups.device)
        if self.is_reader and groups.rank == 0:
            log.info("data: tp_decode=%s (%d TP ranks), one reading rank per data-parallel replica", self.mode,
                     self.tp_size)

    def _build_split(self, cfg: DataConfig, tokenizer, seed: int) -> None:
        from m2megatron.data.split_decode import SliceExchange, SplitChunks, SplitFollower

        kind, gpu = resolve_decoder_kind(cfg.decoder, self.groups.device.type == "cuda")
        local = build_decoder(kind, self.image_size, image_limits(cfg), self.b, max(1, cfg.num_workers), gpu,
                              probed=True, raw=True)  # the reading rank's loader has checked every header
        exchange = SliceExchange(local, self.groups.tp, self.reader_rank, self.groups.device, self.image_size)
        if not self.is_reader:
            self._follower = SplitFollower(exchange)
            return
        self._split = SplitChunks(exchange, self.b)
        self.loader = build_train_loader(cfg, tokenizer=tokenizer, image_size=self.image_size,
                                         micro_batch_size=self.b, dp_rank=self.groups.dp_rank,
                                         dp_size=self.groups.layout.data_parallel, seed=seed, gpu=gpu,
                                         device=self.groups.device, decoder=self._split, prefetch=0)
        log.info("data.decoder=%s: split over %d TP ranks, each decoding with %s", cfg.decoder, self.tp_size, kind)

    # -- one step -----------------------------------------------------------------------------------
    def next_step(self) -> list[dict]:
        """This rank's M microbatches of the next optimizer step (a collective over the replica)."""
        m, b = self.num_microbatches, self.b
        batches = [next(self.loader) for _ in range(m)] if self.is_reader else None
        self.last_keys = [k for x in batches for k in x.get("keys", ())] if batches else []
        if self._split is not None:
            self._split.finish_step()
        follower_images = None
        if self._follower is not None:
            self._follower.serve_step()
            follower_images = self._follower.take(m, b)
        text = self._text(batches)
        out = [{"text_mask": text[i, 1], "microbatch": i} for i in range(m)]
        if not self.is_first_stage:
            return out
        images = self._images(batches, follower_images)
        for i in range(m):
            out[i] = {"images": images[i], "text_ids": text[i, 0], "text_mask": text[i, 1], "microbatch": i}
        return out

    def _text(self, batches: list[dict] | None) -> torch.Tensor:
        """[M, 2, b, L] long (ids, mask) on the device, broadcast from the reader over the mp group."""
        shape = (self.num_microbatches, 2, self.b, self.text_length)
        if self.is_reader:
            text = torch.stack([torch.stack([x["text_ids"], x["text_mask"]]) for x in batches])  # [M, 2, b, L]
            text = to_device({"text": text}, self.groups.device)["text"]
        else:
            text = torch.empty(shape, dtype=torch.long, device=self.groups.device)
        if self.mp_size > 1:
            dist.broadcast(text, src=self.reader_rank, group=self.mp)
        return text

    def _images(self, batches: list[dict] | None, follower_images: list[torch.Tensor] | None) -> list[torch.Tensor]:
        device, shape = self.groups.device, (self.b, 3, self.image_size, self.image_size)
        if self.is_reader:
            images = [to_device({"images": x["images"]}, device)["images"] for x in batches]
        elif follower_images is not None:
            return [normalize_images(to_device({"images": x}, device)["images"]) for x in follower_images]
        else:
            images = [torch.empty(shape, dtype=torch.uint8, device=device) for _ in range(self.num_microbatches)]
        if self.mode == "broadcast" and self.tp_size > 1:
            for x in images:
                dist.broadcast(x, src=self.reader_rank, group=self.groups.tp)
        return [normalize_images(x) for x in images]

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The reading rank's loader state (small, JSON-able); FOLLOWER_STATE on the other ranks."""
        return self.loader.state_dict() if self.is_reader else dict(FOLLOWER_STATE)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (the reading rank's loader resumes exactly; the other ranks drop what they
        hold for the next step)."""
        if self._follower is not None:
            self._follower.reset()
        if not self.is_reader:
            return
        if state == FOLLOWER_STATE:
            raise ValueError("data state: this rank reads the data, but the state it got is a non-reading rank's "
                             "(was the checkpoint written at another layout?)")
        self.loader.load_state_dict(state)

    def load_global_state(self, states: list[dict]) -> None:
        """Continue from the states of every rank of a checkpoint saved at another layout (the trainer hands
        over `LoadedCheckpoint.saved_rank_states`): the reading rank's loader shares out the unread rest of
        the saved epochs over this run's readers (`TrainLoader.load_global_state`; FOLLOWER_STATE entries
        are skipped); the other ranks drop what they hold for the next step."""
        if self._follower is not None:
            self._follower.reset()
        if self.is_reader:
            self.loader.load_global_state([s for s in states if s != FOLLOWER_STATE])

    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason as of the last step: the reading rank's counts ({} on the others)."""
        return self.loader.skipped() if self.is_reader else {}

    def samples_seen(self) -> dict[str, int]:
        """Samples returned so far per source and per "lang/<tag>", summed over the data-parallel reading ranks
        (DataConfig.samples_seen_keys). Every rank calls it (an all-reduce over its DP group); the totals are
        right on the reading ranks (global rank 0 logs them), zeros elsewhere."""
        if not self.seen_keys:
            return {}
        local = self.loader.samples_seen() if self.is_reader else {}
        counts = torch.tensor([local.get(k, 0) for k in self.seen_keys], dtype=torch.long, device=self.groups.device)
        if self.groups.layout.data_parallel > 1:
            dist.all_reduce(counts, group=self.groups.dp)
        return dict(zip(self.seen_keys, counts.tolist()))

    @property
    def images_decoded(self) -> int:
        """Images this rank handed to a decoder so far (0 on ranks that decode nothing)."""
        if self._follower is not None:
            return self._follower.images_decoded
        return self.loader.images_decoded if self.loader is not None else 0

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
        if self._follower is not None:
            self._follower.close()
