"""A web page to caption photos and see where the model looked, served on this machine.

    python app.py                                  # the released model, on http://127.0.0.1:7860/
    python app.py --checkpoint model_files/<run>/best.pt --port 8000

A --host that other machines can reach (0.0.0.0, an address of the network) prints one warning line that the
page is open to the network, with the addresses it is reached at.

The page (app.html: one HTML page, plain JavaScript, nothing fetched from elsewhere) takes a photo by upload,
by drag and drop, or from the sample photos in docs/photos/. It shows the greedy caption, the beam-search
caption with its score (the beam size is a slider), and a strip of pictures: the photo, then for each word of
the beam caption the photo under that word's attention, drawn by `attention_maps.attention_panels` as
`inference.py --attention-map` draws them. Captions come from `imcap.Captioner`, as inference.py's do.

The page uses a small JSON API, which scripts and curl can use too:

    curl --data-binary @photo.jpg 'http://127.0.0.1:7860/caption?beam_size=5&name=photo.jpg'

- POST /caption?beam_size=K&name=FILE, the image file as the body -> {"greedy", "beam", "beam_size", "score",
  "finished", "words", "image" and "maps" (JPEG data URLs: the photo, one attention picture per word),
  "seconds"}. An unreadable image (not an image, empty, truncated, over 200 megapixels) or a bad beam size is
  a 400, an upload over --max-upload-mb a 413, each with {"error": one line}; the server goes on serving.
- GET / the page; GET /samples/NAME a sample photo; GET /health the model's name and the captions served.

Concurrency: each request decodes its image in Starlette's thread pool (at most DECODE_SLOTS at once, so a burst
of huge uploads cannot hold many decoded images in memory); one worker thread owns the model and captions
the images that arrived while it was busy as one batch per beam size, so requests that come together share
the encoder pass and the beam search rather than wait in turn for a lock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import io
import ipaddress
import queue
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import imcap
from attention_maps import attention_panels
from checkpoints import RELEASED_MODEL
from cli import EXIT_BAD_OPTION, Parser, UserError, int_in, pick_device, run_cli, threads_int
from decoding import DecodeConfig, add_decode_options
from imcap import Result
from pytorch_dataset_class import IMAGE_EXTENSIONS, preprocess_image

try:  # the web libraries come from requirements-app.txt, not requirements.txt
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    MISSING_WEB_LIBRARY = None
except ModuleNotFoundError as err:
    MISSING_WEB_LIBRARY = err.name

PAGE_FILE = Path(__file__).resolve().parent / "app.html"  # the page; {{model}}, {{samples}}, {{max_beam}} filled in
SAMPLES_DIR = Path(__file__).resolve().parent / "docs" / "photos"
PANEL_PX = 160  # side of the photo and of each word's attention picture on the page
SLIDER_MAX_BEAM = 20  # the page's slider offers beams 1..20; a request may ask for any beam DecodeConfig accepts
MAX_BATCH = 8  # most images the worker captions together
MAX_UPLOAD_MB = 2000  # an upload is held in memory while it is read: a larger limit would not protect it
DECODE_SLOTS = 2  # uploads decoded at once: a 12000 x 12000 PNG holds 576 MB while it decodes


class BadRequest(Exception):
    """A request the user can fix: answered with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Upload(io.BytesIO):
    """Uploaded bytes as a file that preprocess_image's messages name by the upload's file name."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:  # Pillow's "cannot identify image file %r"
        return repr(self.name)


# ----------------------------------------------------------------------------------------------
# The model, behind one worker thread


@dataclass
class Job:
    image: torch.Tensor  # uint8 (3, S, S)
    beam_size: int
    future: Future  # -> imcap.Result


class CaptionWorker:
    """One thread owns the model; the jobs that queued up while it worked are captioned together, one batch per
    beam size (batched decoding gives each image the caption it gets alone)."""

    def __init__(self, captioner: imcap.Captioner, max_batch: int = MAX_BATCH) -> None:
        self.captioner, self.max_batch = captioner, max_batch
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="captioner", daemon=True)
        self.thread.start()

    def submit(self, image: torch.Tensor, beam_size: int) -> Future:
        """uint8 image (3, S, S) -> a Future of its imcap.Result."""
        job = Job(image, beam_size, Future())
        self.jobs.put(job)
        return job.future

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self.jobs.get()]
            while len(batch) < self.max_batch and not self.jobs.empty():
                batch.append(self.jobs.get_nowait())
            stop = None in batch
            # A job whose request was cancelled meanwhile (the server stopping) is dropped.
            jobs = [j for j in batch if j is not None and j.future.set_running_or_notify_cancel()]
            for k in dict.fromkeys(j.beam_size for j in jobs):  # beam sizes in order of arrival
                group = [j for j in jobs if j.beam_size == k]
                try:
                    images = torch.stack([j.image for j in group])  # (b, 3, S, S)
                    results = self.captioner.batch(images, beam_size=k)
                except Exception as err:  # answered as a 500; the worker goes on
                    for j in group:
                        j.future.set_exception(err)
                    continue
                for j, r in zip(group, results):
                    j.future.set_result(r)


class CaptionService:
    """Bytes of an uploaded image -> the captions and attention pictures the page shows."""

    def __init__(self, captioner: imcap.Captioner, name: str) -> None:
        self.captioner, self.image_size, self.name = captioner, captioner.image_size, name
        self.worker = CaptionWorker(captioner)
        self.served = 0

    def decode(self, data: bytes, name: str) -> tuple[torch.Tensor, np.ndarray]:
        """-> (uint8 model input (3, S, S), uint8 picture for the panels (3, S', S')); BadRequest when unreadable.

        The model input is made as imcap makes it for inference.py (Captioner.preprocess), so the page's captions
        are the command line's.
        """
        if not data:
            raise BadRequest(f"{name}: the upload is empty (0 bytes): choose an image file")
        try:
            image = self.captioner.preprocess(Upload(data, name))  # (3, S, S)
            # A small model's input is too coarse to show: decode again at the panels' size.
            display = image.numpy() if self.image_size >= PANEL_PX else preprocess_image(Upload(data, name), PANEL_PX)
        except UserError as err:
            raise BadRequest(str(err)) from None
        return image, display

    def describe(self, r: Result, display: np.ndarray) -> dict:
        """The JSON answer: both captions, the beam caption's words and one attention picture per word."""
        panels = attention_panels(display, r.attention.flatten(1), PANEL_PX)  # (T, P) -> photo, then one per word
        urls = [jpeg_data_url(p) for p in panels]
        return {"greedy": r.greedy, "beam": r.beam, "beam_size": r.beam_size, "score": round(r.beam_score, 4),
                "finished": r.beam_finished, "words": r.beam_words, "image": urls[0], "maps": urls[1:]}

    def warm_up(self) -> None:
        """Caption a grey image as a request does, so that the first visitor does not wait for what is set up on
        first use (the model's kernels, matplotlib's import for the attention pictures)."""
        png = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 128, 128)).save(png, format="PNG")
        image, display = self.decode(png.getvalue(), "warm-up.png")
        self.describe(self.worker.submit(image, 5).result(), display)


def jpeg_data_url(panel: np.ndarray) -> str:
    """float (side, side, 3) picture in 0..255 -> a data: URL of a JPEG (a few KB) for an <img>."""
    buf = io.BytesIO()
    Image.fromarray(np.clip(panel, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def sample_path(folder: Path, name: str) -> Path | None:
    """The file a sample name stands for, resolved; None unless it is an image file inside `folder` (a symbolic link
    that points elsewhere, to /etc/passwd or to ~/.ssh, is no sample, whatever its name)."""
    try:
        root, path = folder.resolve(strict=True), (folder / name).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a broken or looping link
        return None
    return path if path.parent == root and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() else None


def sample_photos(folder: Path = SAMPLES_DIR) -> list[str]:
    """Names of the image files in docs/photos/ (links only to files in that folder), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                  and sample_path(folder, p.name) is not None)


def parse_beam_size(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = 0
    high = DecodeConfig.LIMITS["beam_size"]
    if not 1 <= k <= high:
        raise BadRequest(f"beam_size must be a whole number from 1 to {high}, got {text!r}")
    return k


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body; one over `limit` bytes is a 413.

    The rest of a body too large is read and dropped rather than kept: a client that is still sending when the
    answer comes (a browser, urllib) would otherwise see the connection reset instead of the message.
    """
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:  # memory stays under `limit`
            chunks.append(chunk)
    if size > limit:
        raise BadRequest(f"the upload ({size / 1e6:.1f} MB) is over the limit of {limit / 1e6:g} MB "
                         "(app.py --max-upload-mb)", 413)
    return b"".join(chunks)


# ----------------------------------------------------------------------------------------------
# The web app


def render_page(template: str, **values: str) -> str:
    """The page with each {{name}} replaced by values[name] (already escaped HTML)."""
    for name, value in values.items():
        template = template.replace("{{" + name + "}}", value)
    return template


def make_app(service: CaptionService, max_upload_bytes: int, samples_dir: Path = SAMPLES_DIR) -> Starlette:
    samples = sample_photos(samples_dir)
    buttons = "".join(f'<button type="button" class="sample" data-name="{html.escape(n)}" title="{html.escape(n)}">'
                      f'<img src="/samples/{html.escape(n)}" alt="{html.escape(n)}"></button>' for n in samples)
    try:
        template = PAGE_FILE.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"{PAGE_FILE}: cannot read the page ({err.strerror or err}); it comes with app.py") from None
    page = render_page(template, model=html.escape(service.name), samples=buttons or "none found",
                       max_beam=str(SLIDER_MAX_BEAM))
    decoding = asyncio.Semaphore(DECODE_SLOTS)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def sample(request: Request) -> Response:
        name = request.path_params["name"]
        path = sample_path(samples_dir, name) if name in samples else None  # resolved again: a link may change
        if path is None:  # only the listed files, and nothing outside docs/photos/
            return JSONResponse({"error": f"no sample photo named {name!r}"}, status_code=404)
        return FileResponse(path)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": service.name, "image_size": service.image_size,
                             "captions_served": service.served})

    async def caption(request: Request) -> Response:
        started = time.perf_counter()
        name = Path(request.query_params.get("name", "") or "upload").name
        try:
            k = parse_beam_size(request.query_params.get("beam_size", "5"))
            data = await read_body(request, max_upload_bytes)
            async with decoding:
                image, display = await run_in_threadpool(service.decode, data, name)
            del data  # up to --max-upload-mb: not kept while the caption is made
            result = await asyncio.wrap_future(service.worker.submit(image, k))
            answer = await run_in_threadpool(service.describe, result, display)
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        except ClientDisconnect:  # the client went away mid-upload: nobody to answer, nothing wrong here
            return Response(status_code=499)
        except Exception as err:  # a bug, not the user's doing: one line for the page, the traceback here
            traceback.print_exc()
            return JSONResponse({"error": f"{name}: captioning failed ({type(err).__name__}: {err})"},
                                status_code=500)
        service.served += 1
        return JSONResponse({**answer, "seconds": round(time.perf_counter() - started, 4)})

    return Starlette(routes=[Route("/", index), Route("/health", health), Route("/samples/{name}", sample),
                             Route("/caption", caption, methods=["POST"])])


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a UserError that says what to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # before the URL is printed: a client that reads it can connect at once
    except (OSError, OverflowError) as err:  # in use, not an address here; a port over 65535
        sock.close()
        why = getattr(err, "strerror", None) or err
        raise UserError(f"--host {host} --port {port}: cannot listen there ({why}); check --host, or pick another "
                        "--port (0 takes a free one)", EXIT_BAD_OPTION) from None
    return sock


def addresses(sock: socket.socket) -> tuple[str, list[str]]:
    """Where the page of a listening socket opens: (the URL to open on this machine, the URLs other machines
    reach it at). The second is empty for a loopback address; for 0.0.0.0 (or ::) it names this machine's host
    name and its addresses, never 0.0.0.0, which no browser can open."""
    host, port = sock.getsockname()[:2]
    ip = ipaddress.ip_address(host.split("%")[0])  # an IPv6 address may end in %<interface>

    def url(h: str) -> str:
        return f"http://[{h}]:{port}/" if ":" in h else f"http://{h}:{port}/"

    if ip.is_loopback:
        return url(host), []
    if not ip.is_unspecified:
        return url(host), [url(host)]
    names = []
    with contextlib.suppress(OSError):  # a host name that does not resolve: its addresses stay unknown
        name = socket.gethostname()
        family = socket.AF_INET if ip.version == 4 else socket.AF_UNSPEC  # :: takes IPv4 too (dual stack)
        found = {a[4][0] for a in socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)}
        names = [name, *sorted(a for a in found if not ipaddress.ip_address(a.split("%")[0]).is_loopback)]
    return url("127.0.0.1" if ip.version == 4 else "::1"), [url(n) for n in names]


def network_warning(host: str, sock: socket.socket) -> str | None:
    """The one warning line for a --host that other machines can reach (None for a loopback one)."""
    remote = addresses(sock)[1]
    if not remote:
        return None
    return (f"app.py: warning: --host {host} opens the page to the network: anyone who can reach this machine can "
            f"caption photos with it, at {', '.join(remote)} (--host 127.0.0.1 keeps it to this machine)")


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None):
    p = Parser(description="Serve a web page that captions photos and shows the attention of each word.")
    p.add_argument("--checkpoint", type=Path, default=RELEASED_MODEL,
                   help="a checkpoint written by train.py (best.pt); the default is the released Flickr8k model")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 shows the page to the whole network)")
    p.add_argument("--port", type=int_in(0, 65535), default=7860, help="port to listen on (0 = any free port)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=threads_int, default=torch.get_num_threads(),
                   help="torch threads of the one thread that runs the model (torch's default: the physical cores)")
    add_decode_options(p, skip=("beam_size", "batch_size"))  # the page picks the beam size; MAX_BATCH the batch
    p.add_argument("--max-upload-mb", type=int_in(1, MAX_UPLOAD_MB), default=100, help="largest upload accepted, in MB")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if MISSING_WEB_LIBRARY:
        raise UserError(f"the web page needs {MISSING_WEB_LIBRARY}, which is not installed: "
                        f"pip install -r requirements-app.txt (make app does it)")
    device = pick_device(args.device)
    sock = listen(args.host, args.port)  # a port in use is reported before the model loads
    torch.set_num_threads(args.threads)
    captioner = imcap.load(args.checkpoint, device, **asdict(DecodeConfig.from_args(args)))
    name = (f"{args.checkpoint.name} ({captioner.model.config.encoder} encoder, {captioner.image_size} px, "
            f"{len(captioner.vocab)} words)")
    service = CaptionService(captioner, name)
    service.warm_up()
    url, _ = addresses(sock)
    warning = network_warning(args.host, sock)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"Serving {name} on {device}, {captioner.precision}: open {url}  (Ctrl-C stops it)", flush=True)
    config = uvicorn.Config(make_app(service, args.max_upload_mb * 1_000_000), log_level="warning",
                            access_log=False, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])  # until Ctrl-C or SIGTERM
    finally:
        service.worker.close()
    return 0


if __name__ == "__main__":
    run_cli(main)
