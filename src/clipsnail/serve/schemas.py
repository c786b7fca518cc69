"""What the web app's API takes and answers: its limits, and the pydantic models of its JSON (which make the
OpenAPI schema at /openapi.json)."""

from __future__ import annotations

import dataclasses

from pydantic import BaseModel, Field, model_validator


@dataclasses.dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * 2**20
    # ~ a 7,700 x 5,200 photo; PIL's own warning starts at 89 M. Not lower for queries: a large JPEG is decoded at
    # 1/8 scale, whatever its size, and other formats (decoded whole, at most max_decoding at a time) cost 4-8
    # bytes a pixel while decoded, 160-320 MB at this limit; refusing 36-Mpx camera photos would save nothing.
    max_image_pixels: int = 40_000_000
    max_query_chars: int = 200
    max_k: int = 100
    max_classes: int = 50
    max_class_chars: int = 100
    max_generate_n: int = 16
    max_waiting_generations: int = 4
    generate_chunk: int = 4  # samples per generator call: the page shows each chunk as it finishes
    generate_wait_s: float = 600.0  # the longest a `wait: true` request blocks
    thumb_size: int = 256
    thumb_cache: int = 1024  # thumbnails kept in memory (about 10-20 kB each)
    max_json_bytes: int = 16 * 2**10
    max_decoding: int = 2  # images decoded at once (each briefly holds its full-size pixels unless a JPEG)


# ----------------------------------------------------------------------------------------------- answers


class Hit(BaseModel):
    id: int = Field(description="the photo's id in the index (kept across updates); the only way to name an image")
    name: str = Field(description="file name (no folder)")
    path: str = Field(description="path relative to the index root: names the image as a term of a search query")
    score: float = Field(description="cosine similarity")
    thumb_url: str


class SearchResult(BaseModel):
    hits: list[Hit]
    seconds: float


class Label(BaseModel):
    label: str
    prob: float


class ZeroShotResult(BaseModel):
    labels: list[Label] = Field(description="every class, most likely first")
    seconds: float


class Info(BaseModel):
    images: int
    dim: int
    model: str
    generator: bool
    generator_image_size: int | None
    limits: dict
    catalogue: dict | None = Field(None, description="the photos' dates taken, cameras and positions (`index info`); "
                                                    "None for an index made before catalogues")


class GeneratedImage(BaseModel):
    image: str = Field(description="PNG as a data: URL")
    score: float = Field(description="CLIP cosine similarity to the prompt")


class GenerationJob(BaseModel):
    id: str
    status: str = Field(description="queued, running, done or failed")
    position: int = Field(description="place in the queue (0 once running)")
    prompt: str
    n: int
    rerank: int
    guidance: float
    temperature: float
    seed: int
    drawn: int = Field(description="samples finished so far")
    images: list[GeneratedImage] = Field(description="best CLIP score first; when done, the best `rerank` of n")
    error: str | None
    seconds: float | None


# ----------------------------------------------------------------------------------------------- requests


def generate_request(limits: Limits) -> type[BaseModel]:
    """The body of POST /api/generate, bounded by `limits` (pydantic reads the bounds when the class is made)."""

    class GenerateRequest(BaseModel):
        prompt: str = Field(min_length=1, max_length=limits.max_query_chars)
        n: int = Field(8, ge=1, le=limits.max_generate_n, description="samples to draw")
        rerank: int = Field(4, ge=0, le=limits.max_generate_n, description="keep the best k by CLIP score (0: all)")
        guidance: float = Field(3.0, ge=0.0, le=10.0, allow_inf_nan=False,
                                description="classifier-free guidance scale (1: none)")
        temperature: float = Field(1.0, ge=0.05, le=2.0, allow_inf_nan=False)
        seed: int | None = Field(None, ge=0, le=2**31 - 1, description="random when not given")
        wait: bool = Field(False, description="answer when the job is done instead of at once")

        @model_validator(mode="after")
        def _rerank_at_most_n(self):
            if self.rerank > self.n:
                raise ValueError(f"rerank ({self.rerank}) must be at most n ({self.n})")
            return self

    return GenerateRequest
