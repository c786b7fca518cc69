"""The web app's routes, on APIRouters: the page, /api/info, search (text, image, similar), zero-shot labels,
thumbnails, and text-to-image jobs. Each route takes the app's `SearchService` by `Depends`;
a router is made for the app's `Limits`, which bound its parameters in the OpenAPI schema."""

import dataclasses
import time
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response

from clipsnail.core.display import display_name
from clipsnail.core.errors import ClipsnailError
from clipsnail.inference.catalogue import parse_filters
from clipsnail.serve.generation import GenerationQueue, QueueFull
from clipsnail.serve.schemas import GenerationJob, Info, Label, Limits, SearchResult, ZeroShotResult, generate_request
from clipsnail.serve.security import page_and_csp
from clipsnail.serve.service import SearchService, bad_request


def service(request: Request) -> SearchService:
    return request.app.state.service


def generation_queue(request: Request) -> GenerationQueue:
    queue = request.app.state.generation
    if queue is None:
        raise bad_request(404, "generation is disabled: start the server with --generator RUN")
    return queue


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 4)


def parse_classes(text: str, limits: Limits) -> list[str]:
    classes = list(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    if len(classes) < 2:
        raise bad_request(422, "give at least two comma-separated classes, e.g. 'cat, dog'")
    if len(classes) > limits.max_classes:
        raise bad_request(422, f"at most {limits.max_classes} classes, got {len(classes)}")
    if any(len(c) > limits.max_class_chars for c in classes):
        raise bad_request(422, f"a class name is longer than {limits.max_class_chars} characters")
    return classes


def page_routes() -> APIRouter:
    router = APIRouter()
    page, csp = page_and_csp()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home():
        return HTMLResponse(page, headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"})

    @router.get("/api/info", response_model=Info, tags=["info"])
    def info(request: Request, svc: SearchService = Depends(service)):
        index, generator = svc.index, request.app.state.generator
        model_name = display_name(Path(index.model_dir).name) if index.model_dir else "?"
        return Info(images=len(index), dim=index.dim, model=model_name, generator=generator is not None,
                    generator_image_size=generator.config.data.image_size if generator is not None else None,
                    limits=dataclasses.asdict(svc.limits),
                    catalogue=svc.catalogue_summary())

    return router


def search_routes(limits: Limits) -> APIRouter:
    router = APIRouter()
    upload_body_limit = limits.max_upload_bytes + 64 * 2**10  # the file plus multipart headers and small fields
    k_query = Query(10, ge=1, le=limits.max_k, description="number of results")
    k_form = Form(10, ge=1, le=limits.max_k, description="number of results")
    image_id = PathParam(ge=0, le=2**31, description="a photo's id in the index (from a search hit)")

    @router.get("/api/search", response_model=SearchResult, tags=["search"])
    def search_text(q: str = Query(min_length=1, max_length=limits.max_query_chars,
                                   description="text, or weighted terms added and subtracted: '2:golden retriever "
                                               "+ trip/pool.jpg - fruit' (an image term is an indexed image's path, "
                                               "as hits show it)"),
                    k: int = k_query, svc: SearchService = Depends(service),
                    after: str | None = Query(None, max_length=32, description="taken on or after: 2019, 2019-06, "
                                                                                 "2019-06-15 or 2019-06-15T14:30"),
                    before: str | None = Query(None, max_length=32, description="taken before (same forms)"),
                    camera: str | None = Query(None, max_length=64, description="camera make or model contains"),
                    folder: str | None = Query(None, max_length=1024, description="in this folder under the root"),
                    near: str | None = Query(None, max_length=64, description="LAT,LON,RADIUS (km, or m): "
                                                                              "48.85,2.35,10km")):
        start = time.perf_counter()
        try:  # checked before any model work: a bad filter is a 422 naming it
            filters = parse_filters(after, before, camera, folder, near)
        except ClipsnailError as e:
            raise bad_request(422, str(e)) from None
        return SearchResult(hits=svc.search(svc.query_vector(q), k, filters), seconds=elapsed(start))

    @router.post("/api/search/image", response_model=SearchResult, tags=["search"], max_body_size=upload_body_limit)
    async def search_image(file: UploadFile = File(description="an image (PNG, JPEG, GIF, WebP, BMP, TIFF)"),
                           k: int = k_form, svc: SearchService = Depends(service)):
        start = time.perf_counter()
        image = await svc.read_upload(file)
        hits = await run_in_threadpool(lambda: svc.search(svc.embed_image(image), k))
        return SearchResult(hits=hits, seconds=elapsed(start))

    @router.get("/api/similar/{id}", response_model=SearchResult, tags=["search"])
    async def similar(id: int = image_id, k: int = k_query, svc: SearchService = Depends(service)):
        """Images like the indexed image `id` (it comes first, with score ~1)."""
        svc.check_id(id)
        start = time.perf_counter()
        image = await svc.decode(svc.indexed_image, id)
        hits = await run_in_threadpool(lambda: svc.search(svc.embed_image(image), k))
        return SearchResult(hits=hits, seconds=elapsed(start))

    @router.post("/api/zeroshot", response_model=ZeroShotResult, tags=["zero-shot"], max_body_size=upload_body_limit)
    async def zeroshot(file: UploadFile = File(description="an image"),
                       classes: str = Form(min_length=1, max_length=limits.max_classes * (limits.max_class_chars + 2),
                                           description="comma-separated class names, e.g. 'cat, dog, car'"),
                       svc: SearchService = Depends(service)):
        start = time.perf_counter()
        names = parse_classes(classes, limits)
        image = await svc.read_upload(file)

        def labels() -> list[Label]:
            probs = svc.zero_shot(image, names)
            return [Label(label=names[j], prob=round(float(probs[j]), 4)) for j in (-probs).argsort(kind="stable")]

        return ZeroShotResult(labels=await run_in_threadpool(labels), seconds=elapsed(start))

    @router.get("/api/thumb/{id}", tags=["images"], response_class=Response,
                responses={200: {"content": {"image/png": {}, "image/jpeg": {}}},
                           404: {"description": "no such id"}})
    async def thumb(id: int = image_id, svc: SearchService = Depends(service)):
        """A thumbnail of the indexed image `id` (PNG for small images, JPEG otherwise)."""
        svc.check_id(id)
        key = (svc.served.generation, id)  # a photo changed in place keeps its id: one state's thumbnail
        cached = svc.thumbs.get(key)  # a hit need not wait for a decoding thread
        if cached is None:
            cached = await svc.decode(svc.thumb_bytes, id)
            svc.thumbs.put(key, cached)
        data, media_type = cached
        # no-cache: the browser asks again (answered from the cache here): a photo changed in place keeps its id
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, no-cache"})

    return router


def generation_routes(limits: Limits) -> APIRouter:
    router = APIRouter()
    GenerateRequest = generate_request(limits)  # noqa: N806  (a class, made for these limits)

    @router.post("/api/generate", response_model=GenerationJob, status_code=202, tags=["generate"],
                 responses={200: {"model": GenerationJob, "description": "done (with wait: true)"},
                            404: {"description": "no generator"}, 429: {"description": "queue full"}})
    async def generate(body: GenerateRequest, request: Request):
        """Queue a text-to-image job; poll GET /api/generate/{id} (images appear as they finish)."""
        queue = generation_queue(request)  # here, not by Depends: a malformed body is a 422 even with no generator
        prompt = body.prompt.strip()
        if not prompt:
            raise bad_request(422, "the prompt is empty")
        try:
            job = queue.submit(prompt, body.n, body.rerank, body.guidance, body.temperature, body.seed)
        except QueueFull as e:
            return JSONResponse({"detail": str(e)}, status_code=429, headers={"Retry-After": "10"})
        if body.wait:
            await run_in_threadpool(job.finished.wait, limits.generate_wait_s)
        return JSONResponse(queue.view(job), status_code=200 if job.finished.is_set() else 202)

    @router.get("/api/generate/{job_id}", response_model=GenerationJob, tags=["generate"])
    def generation(request: Request, job_id: str = PathParam(pattern=r"^[0-9a-f]{16}$")):
        queue = generation_queue(request)
        job = queue.get(job_id)
        if job is None:
            raise bad_request(404, "no such generation job (finished jobs are kept for a while only)")
        return queue.view(job)

    return router
