"""app.py, the web page: its HTTP API on a tiny checkpoint, then the page in a real browser (Debian's chromium).

The server runs as a user starts it, `python app.py --port 0` in a subprocess. APP_CHECKPOINT=PATH serves that
checkpoint instead of the tiny one, and APP_SCREENSHOT=PATH keeps the browser test's screenshot; so

    APP_CHECKPOINT=model_files/flickr8k_efficientnet_lite0.pt APP_SCREENSHOT=docs/app_screenshot.png \\
        .venv/bin/python -m pytest tests/test_app.py -s

remakes the README's screenshot with the released model and prints the latencies and the throughput.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import random
import shutil
import socket
import statistics
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from helpers import ROOT, make_checkpoint, run_script, shapes_word_map, start_script
from PIL import Image

import app
import attention_maps
import checkpoints
import decoding
import inference
from checkpoints import load_checkpoint, model_from_checkpoint
from decoding import DecodeConfig
from pytorch_dataset_class import preprocess_image
from shapes import _sample_objects, render

SAMPLE = ROOT / "docs" / "photos" / "chelsea.jpg"  # the README's sample photo
REAL_CHECKPOINT = os.environ.get("APP_CHECKPOINT")
MAX_LEN = 50 if REAL_CHECKPOINT else 12  # the tiny random model says words until --max-len: keep that short
UPLOAD_LIMIT_MB = 20


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    output: list[str]  # its stdout and stderr lines

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS line")

    def alive(self) -> bool:
        return self.proc.poll() is None and get_json(self.url + "health")["status"] == "ok"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    if REAL_CHECKPOINT:
        return Path(REAL_CHECKPOINT)
    return make_checkpoint(tmp_path_factory.mktemp("app") / "tiny.pt", shapes_word_map())


@pytest.fixture(scope="module")
def server(checkpoint) -> Server:
    """`python app.py --port 0` with one torch thread (two shared cores); its URL is read from what it prints."""
    proc = start_script("app.py", "--checkpoint", checkpoint, "--port", "0", "--device", "cpu", "--threads", "1",
                        "--max-len", MAX_LEN, "--max-upload-mb", UPLOAD_LIMIT_MB, stderr_to_stdout=True)
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def drain() -> None:  # keeps reading, so that the server never blocks on a full pipe
        for line in proc.stdout:
            output.append(line)
            lines.put(line)

    threading.Thread(target=drain, daemon=True).start()
    url, deadline = None, time.monotonic() + 120
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        url = next((w for w in line.split() if w.startswith("http://")), None)
    if url is None:
        proc.kill()
        pytest.fail("app.py printed no URL:\n" + "".join(output))
    assert url.startswith("http://127.0.0.1:")  # the default host: this machine only
    yield Server(url, proc, output)
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert "Traceback" not in "".join(output), "".join(output)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def post(server: Server, data: bytes, beam_size: int | str = 5, name: str = "photo.jpg") -> tuple[int, dict]:
    """POST /caption -> (HTTP status, JSON answer)."""
    req = urllib.request.Request(f"{server.url}caption?beam_size={beam_size}&name={quote(name)}", data=data,
                                 method="POST", headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def cli_captions(checkpoint: Path, image: Path, beam_size: int, capsys) -> dict:
    """What `inference.py --json` says of one image."""
    inference.main(["--checkpoint", str(checkpoint), "--json", "--beam-size", str(beam_size), "--max-len",
                    str(MAX_LEN), "--workers", "0", str(image)])
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def data_url_image(url: str) -> np.ndarray:
    head, data = url.split(",", 1)
    assert head == "data:image/jpeg;base64"
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is width x height: enough for a decompression-bomb check, which reads the header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_the_page_and_captions_equal_the_command_line(server, checkpoint, capsys):
    page = urllib.request.urlopen(server.url, timeout=30).read().decode()
    assert 'id="file"' in page and 'id="beam"' in page
    samples = sorted(p.name for p in SAMPLE.parent.glob("*.jpg"))
    assert len(samples) == 3 and 'data-name="README.md"' not in page
    assert all(f'data-name="{n}"' in page for n in samples)  # every photo of docs/photos/ can be picked
    assert urllib.request.urlopen(server.url + "samples/chelsea.jpg", timeout=30).read() == SAMPLE.read_bytes()
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(server.url + "samples/..%2Fapp.py", timeout=30)

    for k in (1, 5):  # the beam-size control: each answer is inference.py's for that beam size
        status, answer = post(server, SAMPLE.read_bytes(), k, "chelsea.jpg")
        assert status == 200, answer
        expected = cli_captions(checkpoint, SAMPLE, k, capsys)
        assert (answer["greedy"], answer["beam"], answer["beam_size"]) == (expected["greedy"], expected["beam"], k)
        assert answer["score"] == pytest.approx(expected["score"], abs=1e-3)
        assert answer["words"] == answer["beam"].split() and len(answer["maps"]) == len(answer["words"]) > 0

    # The pictures are inference.py's drawing (attention_panels) of this caption's attention, word by word.
    ckpt = load_checkpoint(checkpoint)
    model, word_map = model_from_checkpoint(ckpt)
    size = ckpt["image_size"]
    _, (beam,) = decoding.caption_batch(model, torch.from_numpy(preprocess_image(SAMPLE, size))[None], word_map,
                                         DecodeConfig(max_len=MAX_LEN).for_checkpoint(ckpt))
    display = preprocess_image(SAMPLE, max(size, app.PANEL_PX))  # as inference.py --attention-map does
    panels = attention_maps.attention_panels(display, beam.alphas[: len(answer["words"])], app.PANEL_PX)
    shown = [data_url_image(answer["image"])] + [data_url_image(u) for u in answer["maps"]]
    assert len(shown) == len(panels) and shown[0].shape == (app.PANEL_PX, app.PANEL_PX, 3)
    for got, want in zip(shown, panels):
        assert np.abs(got - want).mean() < 4  # equal but for JPEG's loss
    assert np.abs(shown[1] - shown[0]).mean() > 20  # and the heat map is drawn over the photo

    for bad in (0, 101, "five"):  # the slider stops at 20; a request may ask for what DecodeConfig accepts
        status, answer = post(server, SAMPLE.read_bytes(), bad)
        assert status == 400 and answer["error"].startswith("beam_size must be a whole number from 1 to 100")


def test_bad_input_gets_a_message_and_the_server_keeps_serving(server, tmp_path):
    photo = SAMPLE.read_bytes()
    huge = io.BytesIO()  # a 12000 x 12000 photo: inference.py captions it, so the page does too
    with Image.open(SAMPLE) as im:
        im.resize((12000, 12000), Image.Resampling.NEAREST).save(huge, format="JPEG", quality=75)
    cases = [
        (b"these are notes, not a photo\n", "notes.txt", 400, "notes.txt: cannot read image"),
        (b"", "empty.jpg", 400, "empty.jpg: the upload is empty"),
        (photo[: len(photo) // 3], "cut.jpg", 400, "cut.jpg: cannot read image (OSError: image file is truncated"),
        (png_header(20_000, 20_000), "bomb.png", 400, "bomb.png: image too large"),
        (bytes(UPLOAD_LIMIT_MB * 1_000_000 + 1), "big.jpg", 413, f"over the limit of {UPLOAD_LIMIT_MB} MB"),
        (huge.getvalue(), "12000px.jpg", 200, None),
    ]
    for data, name, status, message in cases:
        got, answer = post(server, data, 3, name)
        assert got == status, (name, answer)
        if message:
            assert message in answer["error"] and "\n" not in answer["error"], answer
        else:
            assert answer["beam"] and len(answer["maps"]) == len(answer["words"])
        assert server.alive(), name
    got, answer = post(server, photo, 3, "chelsea.jpg")
    assert got == 200 and answer["beam"]


def test_eight_concurrent_requests_are_all_answered_correctly(server):
    rng = random.Random(0)
    images = [p.read_bytes() for p in sorted(SAMPLE.parent.glob("*.jpg"))]
    for _ in range(8 - len(images)):
        buf = io.BytesIO()
        render(_sample_objects(rng), 96).save(buf, format="PNG")
        images.append(buf.getvalue())
    beams = [5, 3, 5, 1, 5, 3, 5, 2]  # several beam sizes at once: one batch each
    alone = [post(server, data, k, f"img{i}.png") for i, (data, k) in enumerate(zip(images, beams))]
    assert all(status == 200 for status, _ in alone)

    start = threading.Barrier(8)

    def timed(i: int) -> tuple[float, tuple[int, dict]]:
        start.wait()
        t0 = time.perf_counter()
        result = post(server, images[i], beams[i], f"img{i}.png")
        return time.perf_counter() - t0, result

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(timed, range(8)))
    wall = time.perf_counter() - t0
    for (_, (status, answer)), (_, want) in zip(results, alone):
        assert status == 200, answer
        assert (answer["greedy"], answer["beam"], answer["beam_size"]) == (want["greedy"], want["beam"],
                                                                          want["beam_size"])
        assert answer["score"] == pytest.approx(want["score"], abs=1e-3)
    latencies = sorted(t for t, _ in results)
    print(f"\n8 concurrent captions: {8 / wall:.1f} captions/s, latency median {statistics.median(latencies):.2f} s, "
          f"max {latencies[-1]:.2f} s; one at a time: {statistics.median(a['seconds'] for _, a in alone):.2f} s")


def test_fifty_captions_in_a_row_keep_memory_bounded(server):
    photos = [p.read_bytes() for p in sorted(SAMPLE.parent.glob("*.jpg"))]
    for i in range(5):  # allocator pools and lazy initialisation fill up first
        assert post(server, photos[i % len(photos)], 5)[0] == 200
    before = server.rss_mb()
    for i in range(50):
        status, answer = post(server, photos[i % len(photos)], 1 + i % 5)
        assert status == 200 and answer["beam"], answer
    growth = server.rss_mb() - before
    print(f"\nRSS {before:.0f} MB, then {growth:+.1f} MB over 50 captions")
    assert growth < 100


def test_missing_checkpoint_or_busy_port_is_one_line(checkpoint, tmp_path, monkeypatch):
    released = tmp_path / "model_files" / "flickr8k_efficientnet_lite0.pt"
    monkeypatch.setattr(app, "RELEASED_MODEL", released)  # as before the release lands
    monkeypatch.setattr(checkpoints, "RELEASED_MODEL", released)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        cases = [([], 1, (f"no released model at {released}", "pass --checkpoint PATH")),
                 (["--checkpoint", str(tmp_path / "nope.pt")], 1, ("--checkpoint", "nope.pt: file not found")),
                 (["--checkpoint", str(checkpoint), "--port", port], 2, (f"--port {port}: cannot listen there",
                                                                         "pick another --port"))]
        for argv, code, messages in cases:
            r = run_script("app.py", *argv, mode="in_process")
            err = r.err
            assert r.rc == code and err.count("\n") == 1, err
            assert err.startswith("app.py: error: ") and all(m in err for m in messages), err


def chromium() -> str | None:
    """Debian's chromium (apt-get install chromium), or CHROMIUM=PATH."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_the_page_in_a_real_browser(server, tmp_path):
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no chromium here: apt-get install chromium (as root; .ci/run does it) to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright is not installed: pip install -r requirements-app.txt")
    _, expected = post(server, SAMPLE.read_bytes(), 5, SAMPLE.name)
    _, expected_beam1 = post(server, SAMPLE.read_bytes(), 1, SAMPLE.name)
    shot = tmp_path / "app.png"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path)  # headless
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(server.url)
            page.set_input_files("#file", str(SAMPLE))
            page.wait_for_selector("#result:not([hidden])", timeout=60_000)
            assert page.inner_text("#greedy") == expected["greedy"]
            assert page.inner_text("#beam-caption") == expected["beam"]
            assert page.inner_text("#beam-k") == "5"
            assert page.inner_text("#score").startswith(f"{expected['score']:.2f}")
            assert page.locator("#maps figcaption").all_inner_texts() == [SAMPLE.name, *expected["words"]]
            drawn = page.eval_on_selector_all("#maps img", "imgs => imgs.map(i => i.complete && i.naturalWidth)")
            assert drawn == [app.PANEL_PX] * (len(expected["words"]) + 1)  # every picture decoded and shown
            page.screenshot(path=str(shot), full_page=True)

            # The slider re-captions the photo with the new beam size.
            page.locator("#beam").evaluate("e => { e.value = 1; e.dispatchEvent(new Event('input')); "
                                           "e.dispatchEvent(new Event('change')); }")
            page.wait_for_function("document.getElementById('beam-k').textContent === '1'", timeout=60_000)
            assert page.inner_text("#beam-caption") == expected_beam1["beam"]

            # A sample photo picked with a click, then a file that is not an image.
            page.click('.sample[data-name="chelsea.jpg"]')
            page.wait_for_function("document.getElementById('status').textContent.startsWith('chelsea.jpg: "
                                   "captioned')", timeout=60_000)
            page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                  "buffer": b"not a photo"}])
            page.wait_for_function("document.getElementById('error').textContent.includes('cannot read image')",
                                   timeout=60_000)
            assert page.inner_text("#error").startswith("notes.txt: cannot read image")
            assert page.locator("#result").is_hidden()
        finally:
            browser.close()
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width == 1100 and im.height >= 400
    if os.environ.get("APP_SCREENSHOT"):  # for the README: 256 colours, as inference.py writes its pictures
        with Image.open(shot) as im:
            im.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(os.environ["APP_SCREENSHOT"],
                                                                                  optimize=True)


def asgi(application, method: str, path: str, messages: list[dict]) -> tuple[int, bytes]:
    """One request straight to the ASGI app (no server): `messages` are what the client sends; -> (status, body)."""
    import asyncio

    sent: list[dict] = []
    inbox = list(messages)

    async def receive() -> dict:
        if inbox:
            return inbox.pop(0)
        await asyncio.sleep(3600)  # the client waits for the answer (cancelled once it is sent)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [],
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1234)}
    asyncio.run(application(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


class _Service:
    name, image_size, served = "tiny", 32, 0


def test_a_link_in_the_samples_folder_is_not_served_outside_it(tmp_path):
    """A symbolic link among the sample photos that points outside their folder is neither listed nor served; one
    to a photo inside the folder is."""
    samples, secret = tmp_path / "photos", tmp_path / "secret.jpg"
    samples.mkdir()
    shutil.copy(SAMPLE, samples / "cat.jpg")
    secret.write_bytes(b"private bytes, not a photo\n")
    (samples / "evil.jpg").symlink_to(secret)
    (samples / "again.jpg").symlink_to(samples / "cat.jpg")
    assert app.sample_photos(samples) == ["again.jpg", "cat.jpg"]
    web = app.make_app(_Service(), 10**6, samples_dir=samples)
    status, body = asgi(web, "GET", "/samples/evil.jpg", [])
    assert status == 404 and b"private" not in body
    assert asgi(web, "GET", "/samples/again.jpg", []) == (200, SAMPLE.read_bytes())
    (samples / "cat.jpg").unlink()
    (samples / "cat.jpg").symlink_to(secret)  # changed after the server started: checked again when served
    assert asgi(web, "GET", "/samples/cat.jpg", [])[0] == 404


def test_a_client_that_disconnects_mid_upload_leaves_no_traceback(tmp_path, capsys):
    web = app.make_app(_Service(), 10**6, samples_dir=tmp_path)
    status, _ = asgi(web, "POST", "/caption", [{"type": "http.request", "body": b"\xff\xd8", "more_body": True},
                                                {"type": "http.disconnect"}])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ClientDisconnect" not in err and status != 500, err


def test_a_host_open_to_the_network_is_said_with_its_addresses(checkpoint):
    """--host 0.0.0.0: one warning line naming where other machines reach the page (never 0.0.0.0), and the URL
    to open here is 127.0.0.1's. The test connects to 127.0.0.1 only."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        local, remote = app.addresses(sock)
        port = sock.getsockname()[1]
        assert local == f"http://127.0.0.1:{port}/" and remote and f"http://{socket.gethostname()}:{port}/" in remote
        assert not any("0.0.0.0" in u or "127." in u for u in remote)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert app.addresses(sock)[1] == [] and app.network_warning("127.0.0.1", sock) is None
    proc = start_script("app.py", "--checkpoint", checkpoint, "--host", "0.0.0.0", "--port", "0", "--device", "cpu",
                        "--threads", "1", "--max-len", MAX_LEN, stderr_to_stdout=True)
    try:
        output = []
        for line in proc.stdout:
            output.append(line)
            if line.startswith("Serving"):
                break
        text = "".join(output)
        warnings = [line for line in output if "warning:" in line]
        assert len(warnings) == 1 and "--host 0.0.0.0 opens the page to the network" in warnings[0], text
        assert "0.0.0.0:" not in text, text
        url = next(w for w in output[-1].split() if w.startswith("http://"))
        assert url.startswith("http://127.0.0.1:"), text
        assert get_json(url + "health")["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
