"""Text-to-image requests: one at a time on a worker thread, behind a short bounded queue.

Sampling a PixelSNAIL takes seconds to minutes and uses every core, so requests are never run side by side: a
job waits its turn, at most `max_waiting` jobs wait, and a request beyond that is refused (HTTP 429) instead of
piling up. A job draws its n samples in chunks, so the page can show images as they finish; when it is done the
images are ordered by CLIP score and the best `rerank` kept (the same reranking as `TextToImage.generate`).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import logging
import queue
import secrets
import threading
import time

from clipsnail.serve.images import png_bytes

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


@dataclasses.dataclass
class Job:
    prompt: str
    n: int
    rerank: int
    guidance: float
    temperature: float
    seed: int
    id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(8))
    status: str = "queued"  # queued -> running -> done | failed
    images: list[dict] = dataclasses.field(default_factory=list)  # {"image": PNG data URL, "score": float}
    drawn: int = 0  # samples finished so far (n when done, even when reranking kept fewer)
    error: str | None = None
    created: float = dataclasses.field(default_factory=time.time)
    seconds: float | None = None
    finished: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)


class GenerationQueue:
    def __init__(self, generator, max_waiting: int = 4, chunk: int = 4, keep_jobs: int = 64):
        self.generator, self.max_waiting, self.chunk = generator, max_waiting, max(1, chunk)
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.keep_jobs = keep_jobs
        self.waiting: collections.deque[str] = collections.deque()
        self.lock = threading.Lock()
        self.todo: queue.Queue[Job | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="clipsnail-generate", daemon=True)
        self.worker.start()

    def submit(self, prompt: str, n: int, rerank: int, guidance: float, temperature: float,
               seed: int | None) -> Job:
        seed = secrets.randbelow(2**31) if seed is None else seed
        job = Job(prompt=prompt, n=n, rerank=rerank, guidance=guidance, temperature=temperature, seed=seed)
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} generation requests are already waiting; try again later")
            self.waiting.append(job.id)
            self.jobs[job.id] = job
            self._forget_old()
        self.todo.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def view(self, job: Job) -> dict:
        """The job as the API returns it (a consistent snapshot)."""
        with self.lock:
            position = self.waiting.index(job.id) + 1 if job.id in self.waiting else 0
            return {"id": job.id, "status": job.status, "position": position, "prompt": job.prompt, "n": job.n,
                    "rerank": job.rerank, "guidance": job.guidance, "temperature": job.temperature,
                    "seed": job.seed, "drawn": job.drawn,
                    "images": list(job.images), "error": job.error, "seconds": job.seconds}

    def close(self) -> None:
        self.todo.put(None)

    def _forget_old(self) -> None:
        while len(self.jobs) > self.keep_jobs:
            oldest = next(iter(self.jobs.values()))
            if oldest.status not in ("done", "failed"):
                break
            self.jobs.popitem(last=False)

    def _work(self) -> None:
        while (job := self.todo.get()) is not None:
            with self.lock:
                self.waiting.remove(job.id)
                job.status = "running"
            start = time.perf_counter()
            try:
                self._run(job)
            except Exception as e:  # a failed job is reported to its caller; the worker keeps serving
                log.exception("generation failed for %r", job.prompt)
                with self.lock:
                    job.status, job.error = "failed", f"{type(e).__name__}: {e}"
            job.seconds = round(time.perf_counter() - start, 2)
            job.finished.set()

    def _run(self, job: Job) -> None:
        from clipsnail.inference.sampling import to_pil

        for i, first in enumerate(range(0, job.n, self.chunk)):
            m = min(self.chunk, job.n - first)
            images, scores = self.generator.generate(job.prompt, n=m, guidance=job.guidance, rerank=0,
                                                     temperature=job.temperature, seed=job.seed + i)
            new = [{"image": "data:image/png;base64," + base64.b64encode(png_bytes(im)).decode(),
                    "score": round(float(s), 4)} for im, s in zip(to_pil(images), scores)]
            with self.lock:  # best first so far, so the page can redraw as chunks arrive
                job.images = sorted(job.images + new, key=lambda r: -r["score"])
                job.drawn += m
        with self.lock:
            if job.rerank:
                job.images = job.images[:job.rerank]
            job.status = "done"
