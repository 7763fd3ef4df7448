"""The download stage: url → image bytes, with img2dataset's resizer behind a guarded fetch.

What is img2dataset's and what is not: decoding, resizing (resize modes, interpolation) and
encoding (format, quality) are img2dataset's ``Resizer``, unchanged. The fetch step is replaced
by :mod:`pipelines.download.fetch` (address checks on every redirect hop, a total deadline, a byte cap,
opt-out headers, retries of transient failures only), and a Pillow header check runs before
decoding (:mod:`pipelines.stage.decode`: not-an-image, decompression bombs, truncated files). The
resizer runs in a child process with a memory limit and a deadline (:mod:`pipelines.download.decode_process`),
so an image that would take gigabytes or minutes to decode costs only its row.

Like img2dataset, each worker fetches with a pool of threads and decodes one image at a time;
the bodies it holds, read or waiting to be decoded, are bounded in bytes
(``max_bytes_in_flight``). On Ray, workers are actors (one per CPU by default), fed a
shard at a time with Ray Data's backpressure; the stage ends its phase, so downloaded bytes are
on disk before any later, costlier stage runs.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow as pa

from pipelines.download.decode_process import DecodeProcess
from pipelines.download.fetch import (
    DEFAULT_DISALLOWED,
    BodyBudget,
    Fetcher,
    FetchError,
    FetchPolicy,
    is_transient_reason,
)
from pipelines.stage import Rejections, Resources, Stage, default_resources
from pipelines.stage.decode import (
    DEFAULT_MAX_DECODE_BYTES,
    DEFAULT_MAX_JPEG_SCANS,
    DEFAULT_MAX_PIXELS,
    DecodeLimits,
    Encoded,
    ImageRejected,
    ResizeSettings,
)
from schemas.columns import HEIGHT, IMAGE, ORIGINAL_HEIGHT, ORIGINAL_WIDTH, SHA256, SOURCE_SHA256, URL, WIDTH
from schemas.rejects import INTERNAL_ERROR

log = logging.getLogger(__name__)


@dataclass
class Download(Stage):
    """Downloads each url and stores the image re-encoded by img2dataset's resizer.

    Fetch: ``threads`` concurrent requests per worker; ``timeout`` seconds in all per attempt and
    ``total_timeout`` per url (attempts, backoff and ``Retry-After`` waits together);
    at most ``max_bytes`` read; ``max_redirects`` hops; ``retries`` more attempts for transient
    failures (timeouts, connection errors, 429, 5xx) after ``backoff`` × 2^attempt seconds with
    jitter, or the server's ``Retry-After`` up to ``max_retry_after``; ``X-Robots-Tag``
    directives in ``disallowed_header_directives`` honoured for every agent and for
    any of ``robots_agents``; loopback, private, link-local, multicast and other non-global
    addresses refused unless listed in ``allow_addresses`` (addresses or CIDR ranges).

    Memory: at most ``max_bytes_in_flight`` bytes of bodies held per worker (plus one body), a
    fetch waiting for room within its deadline.

    Image: ``max_pixels``, ``max_decode_bytes`` and ``max_jpeg_scans`` (decompression-bomb
    limits, checked on the header and, for memory, enforced on the decoder process), at most
    ``decode_timeout`` seconds to decode, resize and encode, then img2dataset's resizer with
    ``image_size``, ``resize_mode``, ``resize_only_if_bigger``, ``encode_format``,
    ``encode_quality`` and ``min_image_size``. The defaults follow DataComp's download
    (512 px, keep_ratio, only if bigger, JPEG quality 95).
    """

    name: ClassVar[str] = "download"
    input_columns: ClassVar[tuple[str, ...]] = (URL,)
    output_columns: ClassVar[tuple[str, ...]] = (
        IMAGE,
        WIDTH,
        HEIGHT,
        ORIGINAL_WIDTH,
        ORIGINAL_HEIGHT,
        SHA256,
        SOURCE_SHA256,
    )
    checkpoint_after: ClassVar[bool] = True

    resources: Resources = default_resources(batch_size=4096)
    threads: int = 32
    timeout: float = 10.0
    total_timeout: float = 30.0
    max_bytes: int = 32 * 1024 * 1024
    max_bytes_in_flight: int = 256 * 1024 * 1024
    max_redirects: int = 5
    retries: int = 2
    backoff: float = 0.5
    max_retry_after: float = 30.0
    user_agent_token: str = "vlmcurate"
    robots_agents: list[str] = field(default_factory=lambda: ["vlmcurate", "img2dataset"])
    disallowed_header_directives: list[str] = field(default_factory=lambda: list(DEFAULT_DISALLOWED))
    allow_addresses: list[str] = field(default_factory=list)
    image_size: int = 512
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS
    decode_timeout: float = 10.0

    def __post_init__(self) -> None:
        self._resize_settings()  # validates the resize mode and encode format
        for key in (
            "threads",
            "max_bytes",
            "max_bytes_in_flight",
            "image_size",
            "max_pixels",
            "max_decode_bytes",
            "max_jpeg_scans",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("timeout", "total_timeout", "backoff", "max_retry_after", "decode_timeout"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("retries", "max_redirects", "min_image_size"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        try:
            Fetcher.check_allow_list(self.allow_addresses)
        except ValueError as e:
            raise ValueError(f"allow_addresses: {e}") from None

    def is_transient(self, reason: str) -> bool:
        return is_transient_reason(reason)

    def setup(self) -> None:
        self._fetcher = Fetcher(
            FetchPolicy(
                timeout=self.timeout,
                total_timeout=self.total_timeout,
                max_bytes=self.max_bytes,
                max_redirects=self.max_redirects,
                retries=self.retries,
                backoff=self.backoff,
                max_retry_after=self.max_retry_after,
                user_agent_token=self.user_agent_token,
                robots_agents=tuple(self.robots_agents),
                disallowed_directives=tuple(self.disallowed_header_directives),
                allow_addresses=tuple(self.allow_addresses),
                resolver_threads=self.threads,
            )
        )
        self._reencode = DecodeProcess(
            self._resize_settings(),
            DecodeLimits(
                max_pixels=self.max_pixels, max_decode_bytes=self.max_decode_bytes, max_jpeg_scans=self.max_jpeg_scans
            ),
            timeout=self.decode_timeout,
        )
        self._bodies = BodyBudget(self.max_bytes_in_flight)
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="fetch")

    def _resize_settings(self) -> ResizeSettings:
        return ResizeSettings(
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            resize_only_if_bigger=self.resize_only_if_bigger,
            encode_format=self.encode_format,
            encode_quality=self.encode_quality,
            min_image_size=self.min_image_size,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        urls = batch[URL].to_pylist()
        images: list[Encoded | None] = [None] * len(urls)
        sources: list[str | None] = [None] * len(urls)
        rejections: list[tuple[str, str] | None] = [None] * len(urls)

        def finish(index: int, future: Future) -> None:
            body = None
            try:
                body = future.result()
                images[index] = self._reencode(body)
                sources[index] = hashlib.sha256(body).hexdigest()
            except (FetchError, ImageRejected) as e:
                rejections[index] = (e.reason, e.detail)
            except Exception as e:  # noqa: BLE001 - one url must never fail its whole shard
                log.warning("download of %s failed unexpectedly: %r", urls[index][:200], e)
                rejections[index] = (INTERNAL_ERROR, f"{type(e).__name__}: {e}"[:300])
            finally:
                if body is not None:
                    self._bodies.release(len(body))

        def finish_some() -> None:  # in the order they complete: a finished body frees room for others
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                finish(in_flight.pop(future), future)

        in_flight: dict[Future, int] = {}
        for index, url in enumerate(urls):
            if len(in_flight) >= 2 * self.threads:  # bound the urls queued ahead of the fetch threads
                finish_some()
            in_flight[self._pool.submit(self._fetcher.fetch, url, self._bodies)] = index
        while in_flight:
            finish_some()
        return _columns(images, sources, rejections)


def _columns(
    images: list[Encoded | None], sources: list[str | None], rejections: list[tuple[str, str] | None]
) -> pa.Table:
    def ints(values):
        return pa.array(values, pa.int32())

    table = pa.table(
        {
            IMAGE: pa.array([e.data if e else None for e in images], pa.binary()),
            WIDTH: ints([e.width if e else None for e in images]),
            HEIGHT: ints([e.height if e else None for e in images]),
            ORIGINAL_WIDTH: ints([e.original_width if e else None for e in images]),
            ORIGINAL_HEIGHT: ints([e.original_height if e else None for e in images]),
            SHA256: pa.array([hashlib.sha256(e.data).hexdigest() if e else None for e in images], pa.string()),
            SOURCE_SHA256: pa.array(sources, pa.string()),
        }
    )
    marks = Rejections(len(images))
    for reason in sorted({r[0] for r in rejections if r}):
        mask = [r is not None and r[0] == reason for r in rejections]
        marks.add(mask, reason, pa.array([r[1] if r else None for r in rejections], pa.string()))
    return marks.attach(table)
