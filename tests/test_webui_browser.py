"""LLaMA Board in a real browser (Playwright + Debian's chromium) against a real ``llamafactory-cli webui``.

One run of the user's path: tiny grounding model, grounding template, synthetic dataset, bbox head on; preview the
command; grounding preview of the dataset; train; predict with the bbox head; the IoU metrics and the box gallery
appear. Then an edit run (trained by the CLI into LLaMA Board's save dir): predict from the Evaluate tab runs the
edit stage; the CLIP metrics and the source / output / target gallery appear. Screenshots go to
``$LFV_SCREENSHOTS`` (default: pytest's tmp dir); README's copies are in docs/webui/.

The browser comes from ``make install`` (apt-get install chromium, as root). The test skips, saying why, only where
no chromium binary exists (a machine without root/apt); under CI (``$CI`` set) a missing browser fails instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, REPO, cli_env, edit_config, read_jsonl, run_cli, write_yaml

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MODEL_NAME = "Qwen2-VL-2B-Instruct-Grounding"  # the twin our registry adds beside the host's Qwen2-VL-2B-Instruct
EDIT_MODEL_NAME = "LLaVA-1.5-7B-Chat-Edit"  # the llava_edit twin of the host's LLaVA-1.5-7B-Chat
EDIT_RUN = "edit_run"
TRAIN_EXTRA = {  # the host's extra-args JSON: a few CPU steps
    "optim": "adamw_torch",
    "max_steps": 4,
    "gradient_accumulation_steps": 1,
    "preprocessing_num_workers": 1,
    "learning_rate": 1e-3,
}


def chromium_path() -> str | None:
    found = os.environ.get("LFV_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return found if found and os.access(found, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser_path() -> str:
    pytest.importorskip("playwright", reason="playwright is not installed (pip install -e '.[dev]')")
    path = chromium_path()
    if path is None:
        message = "no chromium binary: run `make install` as root (apt-get install chromium) or set LFV_CHROMIUM"
        if os.environ.get("CI"):  # CI runs as root with apt: a missing browser there is a broken setup, not a skip
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("LFV_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def board(tmp_path_factory, browser_path):
    """A ``llamafactory-cli webui`` on a free localhost port, in a fresh working dir with a tiny model and data."""
    from llamafactory_vision.synth import generate_grounding
    from llamafactory_vision.tiny import build_tiny

    work = tmp_path_factory.mktemp("board")
    port = free_port()
    env = cli_env(GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", GRADIO_ANALYTICS_ENABLED="False")
    proc = None
    for attempt in range(3):
        # gradio gives up when its own 3 s HEAD to localhost times out (a loaded CI machine): start again then
        log_path = work / f"webui{attempt}.log"
        log = log_path.open("w")
        proc = subprocess.Popen([str(BIN / "llamafactory-cli"), "webui"], cwd=work, env=env, stdout=log, stderr=log)
        if attempt == 0:  # while the UI imports: the tiny model and the data it will be pointed at
            model = build_tiny("qwen2_vl", work / "model", seed=0)
            generate_grounding(work / "data", n=12, seed=2, val_frac=0.34, preset="demo")
        deadline = time.time() + 300
        # gradio prints this line once its localhost check passed; polling the page here would only add load
        while "To create a public link" not in log_path.read_text() and proc.poll() is None:
            if time.time() > deadline:
                proc.kill()
                raise AssertionError(f"webui did not start in 300 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        if proc.poll() is None:
            break
        log.close()
    else:
        raise AssertionError(f"webui exited:\n{log_path.read_text()[-4000:]}")
    url = f"http://127.0.0.1:{port}/"
    yield {"url": url, "work": work, "model": model, "data": work / "data", "port": port, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def listeners(pid: int) -> set[int]:
    """TCP ports in LISTEN state owned by ``pid`` and its children (from /proc)."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {c.laddr.port for p in procs for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def label(text: str) -> re.Pattern:
    """A host control by its English label: case-sensitive, as its accessible name continues with the info text."""
    return re.compile(re.escape(text))


def choose(page, locator, text: str) -> None:
    """Pick ``text`` in a gradio dropdown: focus (the host lists choices on focus), type, Enter."""
    locator.click()
    locator.fill(text)
    page.wait_for_timeout(300)
    locator.press("Enter")
    page.wait_for_timeout(300)


@contextlib.contextmanager
def browser_page(browser_path: str, profile: Path) -> Iterator:
    """A page of a headless chromium with a fresh user-data-dir ``profile``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=browser_path,
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def test_train_predict_and_pictures_in_browser(board, browser_path, shots):
    started = time.time()
    with browser_page(browser_path, board["work"] / "profile") as page:
        drive(page, board, shots)
    # no listener beyond LLaMA Board's own port
    assert listeners(board["proc"].pid) <= {board["port"]}
    print(f"browser test took {time.time() - started:.0f} s; screenshots in {shots}")


def drive(page, board: dict, shots: Path) -> None:
    """The user's path through LLaMA Board, asserting what each step shows."""
    from playwright.sync_api import expect

    page.set_default_timeout(60_000)
    page.goto(board["url"], timeout=120_000)
    panel = page.locator("div[role=tabpanel]:visible")

    # top: the grounding twin of Qwen2-VL-2B-Instruct defaults to our template
    choose(page, page.get_by_label(label("Model name")), MODEL_NAME)
    expect(page.get_by_label(label("Chat template"))).to_have_value("qwen2_vl_ground")
    page.get_by_label(label("Model path")).fill(str(board["model"]))

    # Train tab: our dataset (formatting: grounding) is listed from dataset_info.json
    panel.get_by_label(label("Data dir")).fill(str(board["data"]))
    choose(page, panel.get_by_label(label("Dataset")), "synth_ground_train")
    choose(page, panel.get_by_label(label("Compute type")), "fp32")
    panel.get_by_text("Extra configurations").click()
    panel.get_by_label(label("Extra arguments")).fill(json.dumps(TRAIN_EXTRA))
    panel.get_by_text("Grounding (llamafactory-vision)").click()
    panel.locator("#lfv-train-bbox_head input").check()
    panel.locator("#lfv-train-bbox_loss_weight input").fill("0.5")

    panel.get_by_role("button", name="Preview command").click()
    output = panel.locator("div.prose").filter(has_text="llamafactory-cli train")
    expect(output).to_contain_text("--bbox_head True")
    expect(output).to_contain_text("--bbox_loss_weight 0.5")
    expect(output).to_contain_text("--template qwen2_vl_ground")
    page.screenshot(path=str(shots / "webui_train_options.png"), full_page=True)

    # grounding preview from the dataset preview box: the real pipeline's target boxes
    panel.get_by_role("button", name="Preview dataset").click()
    page.get_by_role("button", name="Grounding preview").click()
    expect(page.locator("#lfv-train-preview img").first).to_be_visible(timeout=120_000)
    page.locator(".modal-box").screenshot(path=str(shots / "webui_grounding_preview.png"))
    page.locator(".modal-box").get_by_role("button", name="Close").click()

    # train
    panel.get_by_role("button", name="Start").click()
    expect(panel.get_by_text("Finished.").first).to_be_visible(timeout=300_000)
    train_dir = panel.get_by_label(label("Output dir")).input_value()

    # Evaluate & Predict with the trained adapter and its bbox head
    page.get_by_role("tab", name="Evaluate & Predict").click()
    choose(page, page.get_by_label(label("Checkpoint path")), train_dir)
    panel.get_by_label(label("Data dir")).fill(str(board["data"]))
    choose(page, panel.get_by_label(label("Dataset")), "synth_ground_val")
    tokens = panel.get_by_label(label("Maximum new tokens")).first
    tokens.fill("24")
    tokens.press("Enter")
    panel.get_by_role("button", name="Preview command").click()
    preview = panel.locator("div.prose").filter(has_text="llamafactory-cli train")
    expect(preview).to_contain_text("--image_max_pixels 589824")
    expect(preview).to_contain_text("--max_new_tokens 24")
    panel.get_by_role("button", name="Start").click()
    metrics = panel.locator("div.prose").filter(has_text="predict_acc@0.5")
    expect(metrics).to_be_visible(timeout=300_000)
    expect(metrics).to_contain_text("predict_miou")
    gallery = page.locator("#lfv-eval-predictions")
    expect(gallery.locator("img").first).to_be_visible(timeout=60_000)
    assert gallery.locator("img").count() == 4  # one picture per row of synth_ground_val
    gallery.scroll_into_view_if_needed()
    gallery.screenshot(path=str(shots / "webui_prediction_gallery.png"))
    metrics.locator("pre").first.screenshot(path=str(shots / "webui_metrics.png"))  # the metrics JSON block


@pytest.fixture(scope="module")
def edit_run(board, edit_models, edit_data) -> Path:
    """A tiny edit run (1 step, 2 denoising steps recorded for predict) where LLaMA Board lists checkpoints."""
    work = board["work"]
    out = work / "saves" / EDIT_MODEL_NAME / "lora" / EDIT_RUN
    config = edit_config(edit_models, edit_data, out, max_steps=1, edit_num_inference_steps=2, edit_max_new_tokens=4)
    run_cli(["llamafactory-cli", "train", str(write_yaml(work / "edit_train.yaml", config))], cwd=work)
    return out


def test_edit_predict_metrics_and_gallery_in_browser(board, edit_run, edit_models, edit_data, browser_path, shots):
    from playwright.sync_api import expect

    started = time.time()
    n_rows = len(read_jsonl(edit_data / "edit_val.jsonl"))
    with browser_page(browser_path, board["work"] / "profile_edit") as page:
        page.set_default_timeout(60_000)
        page.goto(board["url"], timeout=120_000)
        panel = page.locator("div[role=tabpanel]:visible")
        choose(page, page.get_by_label(label("Model name")), EDIT_MODEL_NAME)
        expect(page.get_by_label(label("Chat template"))).to_have_value("llava_edit")
        page.get_by_label(label("Model path")).fill(str(edit_models["llava"]))

        page.get_by_role("tab", name="Evaluate & Predict").click()
        choose(page, page.get_by_label(label("Checkpoint path")), EDIT_RUN)
        panel.get_by_label(label("Data dir")).fill(str(edit_data))
        choose(page, panel.get_by_label(label("Dataset")), "synth_edit_val")
        panel.get_by_text("Image editing (llamafactory-vision)").click()
        panel.locator("#lfv-eval-edit_clip_model").get_by_role("textbox").fill(str(edit_models["clip"]))
        panel.get_by_role("button", name="Preview command").click()
        preview = panel.locator("div.prose").filter(has_text="llamafactory-cli train")
        expect(preview).to_contain_text("--stage edit")
        expect(preview).to_contain_text("--edit_num_inference_steps 2")  # recorded by the run
        expect(preview).to_contain_text(f"--edit_clip_model {edit_models['clip']}")

        panel.get_by_role("button", name="Start").click()
        metrics = panel.locator("div.prose").filter(has_text="predict_clip_i")
        expect(metrics).to_be_visible(timeout=300_000)
        expect(metrics).to_contain_text("predict_clip_t")
        expect(metrics).to_contain_text("predict_l1")
        gallery = page.locator("#lfv-eval-edits")
        expect(gallery.locator("img").first).to_be_visible(timeout=60_000)
        assert gallery.locator("img").count() == 3 * n_rows  # source, output, target per row of synth_edit_val
        expect(gallery).to_contain_text("#0 source")
        gallery.scroll_into_view_if_needed()
        gallery.screenshot(path=str(shots / "webui_edit_gallery.png"))
        metrics.locator("pre").first.screenshot(path=str(shots / "webui_edit_metrics.png"))  # the metrics JSON block
        shown = json.loads(metrics.locator("pre").first.inner_text())
        run_name = panel.get_by_label(label("Output dir")).input_value()
    out = board["work"] / "saves" / EDIT_MODEL_NAME / "lora" / run_name
    # oracle: eval/edit_eval.py (the metric CLI) on the images the run wrote and the dataset's targets
    result = run_cli([sys.executable, str(REPO / "eval" / "edit_eval.py"), "--outputs", str(out / "edited"),
                      "--dataset", str(edit_data / "edit_val.jsonl"), "--clip_model", str(edit_models["clip"])],
                     cwd=board["work"])  # fmt: skip
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert shown["predict_n"] == scores["n"] == n_rows
    for key in ("clip_i", "clip_t", "l1", "l2"):
        assert shown[f"predict_{key}"] == pytest.approx(scores[key], rel=1e-4), key
    print(f"edit browser test took {time.time() - started:.0f} s; screenshots in {shots}")
