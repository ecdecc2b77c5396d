"""A new user's first hour (the README only): nothing of theirs destroyed, no tracebacks, the right
advice for each mistake, and quiet logs."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from kiln.cli import cli
from runtime.errors import NotSupportedError, RequestError

ROOT = Path(__file__).resolve().parents[1]


def _kiln(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    return r


# ---- kiln build --out never destroys what it did not make ---------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_a_users_folder_is_never_replaced(tiny_export, tmp_path, force):
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    r = _kiln("build", tiny_export, "--out", out, "--backend", "onnxruntime", *(["--force"] if force else []))
    assert r.exit_code == 2
    assert "exists and is a folder that is not a kiln artifact" in r.output and "notes.txt, photos" in r.output
    assert (out / "notes.txt").read_text() == "keep me" and (out / "photos" / "a.jpg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_file_is_never_replaced(tiny_export, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# my project")
    r = _kiln("build", tiny_export, "--out", readme, "--backend", "onnxruntime")
    assert r.exit_code == 2 and "exists and is a file" in r.output
    assert readme.read_text() == "# my project" and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    r = _kiln("export", "tiny", "--out", readme)
    assert r.exit_code == 2 and readme.read_text() == "# my project"


def test_an_empty_folder_and_an_old_artifact_are_fine_and_your_files_in_it_stay(tiny_export, tiny_artifact, tmp_path):
    (tmp_path / "empty").mkdir()
    assert _kiln("build", tiny_export, "--out", tmp_path / "empty", "--backend", "onnxruntime").exit_code == 0
    old = shutil.copytree(tiny_artifact, tmp_path / "old")
    (old / "notes.txt").write_text("mine")
    (old / "best").mkdir()
    (old / "best" / "sample.png").write_bytes(b"png")
    assert _kiln("build", tiny_export, "--out", old, "--backend", "onnxruntime", "--force").exit_code == 0
    assert (old / "notes.txt").read_text() == "mine" and (old / "best" / "sample.png").read_bytes() == b"png"
    from runtime import load_pipeline

    load_pipeline(old)  # still a valid artifact, with the user's files beside it


def test_a_path_through_a_file_is_refused(tiny_export, tmp_path):
    (tmp_path / "afile").write_text("x")
    r = _kiln("build", tiny_export, "--out", tmp_path / "afile" / "sub", "--backend", "onnxruntime")
    assert r.exit_code == 2 and "is a file, not a folder" in r.output


# ---- schedulers ---------------------------------------------------------------------------------------


def test_every_scheduler_that_is_accepted_runs(tiny_artifact):
    """Each short name, and each diffusers scheduler class the check lets through, at 1, 2 and 3 steps."""
    import diffusers

    from runtime import load_pipeline
    from runtime.errors import SchedulerError
    from runtime.schedulers import SCHEDULERS, scheduler_from_name

    pipe = load_pipeline(tiny_artifact)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config
    accepted = []
    for name in [*SCHEDULERS, *(n for n in dir(diffusers) if n.endswith("Scheduler"))]:
        try:
            scheduler = scheduler_from_name(name, base)
        except SchedulerError:
            continue
        accepted.append(name)
        for steps in (1, 2, 3):
            pipe.scheduler = scheduler_from_name(name, base)
            images = pipe("a fox", height=64, width=64, num_inference_steps=steps, output_type="np").images
            assert images.shape == (1, 64, 64, 3), (name, steps)
        del scheduler
    assert set(SCHEDULERS) <= set(accepted) and "FlowMatchEulerDiscreteScheduler" not in accepted


def test_every_listed_scheduler_runs_and_others_are_refused_before_work(tiny_artifact, tmp_path):
    r = _kiln("generate", tiny_artifact, "a fox", "--steps", "2", "--scheduler", "lms", "-o", tmp_path / "lms.png")
    assert r.exit_code == 0, r.output
    r = _kiln("generate", tiny_artifact, "a fox", "--steps", "2", "--scheduler", "FlowMatchEulerDiscreteScheduler",
              "-o", tmp_path / "flow.png")
    assert r.exit_code == 2 and "FlowMatchEulerDiscreteScheduler cannot drive this model" in r.output
    assert not (tmp_path / "flow.png").exists()


def test_the_service_refuses_a_scheduler_that_cannot_drive_the_unet(tiny_artifact):
    from fastapi.testclient import TestClient

    from runtime import load_pipeline
    from runtime.server import ServeOptions, create_app

    with TestClient(create_app(None, ServeOptions(), pipe=load_pipeline(tiny_artifact))) as c:
        r = c.post("/v1/images", json={"prompt": "x", "scheduler": "FlowMatchEulerDiscreteScheduler"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "scheduler"]


# ---- every user mistake: exit 2, no traceback, the right advice ---------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--init-image", "{tmp}/not-an-image.png"], "is not an image PIL can read"),
    (["-o", "{tmp}/out.xyz"], "has no image file extension PIL can write"),
    (["-o", "{tmp}/out.psd"], "has no image file extension PIL can write"),  # PIL reads .psd, cannot write it
    (["-o", "{tmp}/not-an-image.png/x.png"], "is a file, so"),
    (["--guidance", "nan"], "NaN is not a guidance scale"),
    (["--guidance", "-5"], "Invalid value for '--guidance'"),
    (["--init-image", "{tmp}/init.png", "--strength", "0"], "strength is how much of the init image is replaced by noise"),
    (["--height", "0"], "Invalid value for '--height'"),
    (["--strength", "0.5"], "--strength applies to img2img: pass --init-image"),
    (["--init-image", "{tmp}/init.png", "--height", "64"], "the image sets the size; leave out --height/--width"),
    (["--init-image", "{tmp}/odd.png"], "the init image is 70x100 (height x width); these engines need both sides a "
                                        "multiple of 64. Resize it, e.g. to 64x128"),
    (["--init-image", "{tmp}/init.png", "--strength", "0.01", "--steps", "20"], "runs no denoising step"),
])
def test_generate_mistakes(tiny_artifact, tmp_path, monkeypatch, args, message):
    import runtime

    (tmp_path / "not-an-image.png").write_text("hello")
    Image.new("RGB", (128, 64)).save(tmp_path / "init.png")
    Image.new("RGB", (100, 70)).save(tmp_path / "odd.png")
    monkeypatch.setattr(runtime, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    r = _kiln("generate", tiny_artifact, "a fox", "--steps", "2", *[a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "out.xyz").exists()


def test_an_empty_prompt_or_one_too_long_is_refused_as_over_http(tiny_artifact, tmp_path):
    r = _kiln("generate", tiny_artifact, "  ")
    assert r.exit_code == 2 and "the prompt is empty" in r.output
    long = "lighthouse " * 10
    r = _kiln("generate", tiny_artifact, long, "--steps", "1", "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and "tokens long and the text encoder reads at most 77" in r.output
    r = _kiln("generate", tiny_artifact, long, "--steps", "1", "-o", tmp_path / "x.png", "--truncate-prompts")
    assert r.exit_code == 0


def test_prompt_embeds_of_the_wrong_width_are_a_shape_error(tiny_artifact):
    from runtime import load_pipeline
    from runtime.errors import ShapeError

    pipe = load_pipeline(tiny_artifact)
    with pytest.raises(ShapeError, match=r"prompt_embeds must have shape \[batch, 77, 32\] for these engines, got "
                                         r"\[1, 77, 768\]") as err:
        pipe(prompt_embeds=torch.zeros(1, 77, 768), negative_prompt_embeds=torch.zeros(1, 77, 768), num_inference_steps=1)
    assert err.value.field == "prompt_embeds"
    with pytest.raises(ShapeError, match=r"prompt_embeds must have shape \[batch, 77, 32\].*got \[77, 100\]"):
        pipe(prompt_embeds=torch.zeros(77, 100), num_inference_steps=1)


def test_loadtest_needs_a_scheme():
    r = _kiln("loadtest", "127.0.0.1:8000", "--requests", "1")
    assert r.exit_code == 2 and "must start with http:// or https://" in r.output and "http://127.0.0.1:8000" in r.output


def test_a_busy_port_is_found_before_the_model_loads(tiny_artifact):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "kiln", "serve", str(tiny_artifact), "--port", str(port)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert "another program has it" in r.stderr and "serving" not in r.stderr  # nothing was loaded
    from runtime.errors import ServiceError
    from runtime.server import check_port

    with pytest.raises(ServiceError, match="check --host"):
        check_port("192.0.2.1", 18778)  # TEST-NET-1: an address of no machine here


def test_loadtest_without_a_single_success_exits_non_zero(tmp_path):
    import threading
    import time

    import uvicorn

    from runtime.server import ServeOptions, create_app
    from tests.stub_pipe import StubPipe

    stub = StubPipe(tmp_path / "a")
    stub.fail, stub.fail_all = RuntimeError("engine down"), True
    server = uvicorn.Server(uvicorn.Config(create_app(None, ServeOptions(max_wait=0), pipe=stub), host="127.0.0.1",
                                           port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        r = _kiln("loadtest", f"http://127.0.0.1:{port}", "--requests", "2", "--clients", "1")
    finally:
        server.should_exit = True
        thread.join(10)
    assert r.exit_code == 2 and "no request succeeded: the service answered {'500': 2}" in r.output


# ---- the pipeline says what it cannot do --------------------------------------------------------------


def test_the_pipeline_refuses_what_engines_cannot_do(tiny_artifact, tmp_path):
    from runtime import load_pipeline

    pipe = load_pipeline(tiny_artifact)
    assert pipe.to("cpu") is pipe and pipe.to(torch.float32) is pipe
    with pytest.raises(NotSupportedError, match=r"run on cpu .* cannot move to cuda: build an artifact for it"):
        pipe.to("cuda")
    with pytest.raises(NotSupportedError, match=r"precision is built into them \(fp32.*--precision fp16"):
        pipe.to(torch.float16)
    with pytest.raises(NotSupportedError, match="cannot move to cuda"):
        pipe.to(0)
    with pytest.raises(NotSupportedError, match="precision is built into them"):
        pipe.to(torch_dtype=torch.float16)
    with pytest.raises(NotSupportedError):
        pipe.fuse_lora()
    pipe.enable_vae_slicing()  # VAE slicing and tiling run on engines (tests/test_vae_tiling.py)
    assert pipe.vae.use_slicing
    with pytest.raises(RequestError, match="load_lora_weights needs a LoRA"):  # tiny is refittable: LoRAs load
        pipe.load_lora_weights()
    calls = []
    pipe.unet.engine = lambda **kw: calls.append(kw)
    with pytest.raises(NotSupportedError, match=r"a LoRA scale of 0.5 at call time.*fused into the engines"):
        pipe("a cat", num_inference_steps=1, cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(NotSupportedError, match="no IP-Adapter"):
        pipe("a cat", num_inference_steps=1, ip_adapter_image=Image.new("RGB", (64, 64)))
    assert calls == []
    with pytest.raises(NotSupportedError, match="the artifact folder is what you ship"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


# ---- quiet, honest logs -------------------------------------------------------------------------------


@pytest.mark.model
def test_quiet_logs(tiny_export, tmp_path):
    r = subprocess.run([sys.executable, "-m", "kiln", "export", "tiny", "--out", str(tmp_path / "e"), "--check", "min"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for noise in ("torchvision", "should be kept in float32", "[transformers]", "\r"):
        assert noise not in r.stderr, noise
    build = [sys.executable, "-m", "kiln", "build", str(tiny_export), "--out", str(tmp_path / "a"), "--backend",
             "onnxruntime"]
    subprocess.run(build, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    again = subprocess.run(build, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert (again.stdout + again.stderr).count("up to date") == 1
    gen = subprocess.run([sys.executable, "-m", "kiln", "generate", str(tmp_path / "a"), "a fox", "--steps", "3", "-o",
                          str(tmp_path / "f.png")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0 and "%|" not in gen.stderr and "\r" not in gen.stderr and "[transformers]" not in gen.stderr
    assert "3 steps" in gen.stdout


def test_long_work_shows_it_is_alive(caplog):
    import logging
    import time

    from runtime.quiet import heartbeat

    log = logging.getLogger("exporters.test")
    with caplog.at_level(logging.INFO, logger="exporters.test"), heartbeat(log, "exporting unet", every=0.05):
        time.sleep(0.18)
    assert caplog.text.count("... still exporting unet") >= 2


def test_small_wording(tiny_artifact, tmp_path):
    r = _kiln("generate", tiny_artifact, "a fox", "--steps", "1", "-o", tmp_path / "one.png", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["scheduler"] == "DDIMScheduler"
    r = _kiln("generate", tiny_artifact, "a fox", "--steps", "1", "-o", tmp_path / "one.png")
    assert "(128x128, 1 step," in r.output
    from kiln.text import plural

    assert (plural(1, "run"), plural(3, "run")) == ("1 run", "3 runs")
    r = _kiln("generate", tiny_artifact, "a fox", "--steps", "1", "--scheduler", "dpm++2m-karras", "-o", tmp_path / "k.png",
              "--json")
    data = json.loads(r.stdout)
    assert (data["scheduler"], data["scheduler_class"]) == ("dpm++2m-karras", "DPMSolverMultistepScheduler")
