"""Packaging: the Dockerfile (parsed, and its install steps replayed in a fresh venv) and `bentoml build`."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import httpx
import pytest

from tests.service.test_serve_process import free_port, stop, wait_ready

ROOT = Path(__file__).resolve().parents[2]


def instructions():
    return dockerfile.parse_file(str(ROOT / "Dockerfile"))


def test_dockerfile_is_a_slim_non_root_cpu_image_with_a_readiness_healthcheck():
    steps = instructions()
    by_cmd = {}
    for step in steps:
        by_cmd.setdefault(step.cmd, []).append(step)
    assert by_cmd["FROM"][-1].value == ("python:3.11-slim",)  # the image; the first stage only picks files
    assert by_cmd["USER"][-1].value[0] not in ("root", "0")
    assert "/readyz" in " ".join(by_cmd["HEALTHCHECK"][0].value)
    assert by_cmd["CMD"][-1].value[:3] == ("bentoml", "serve", ".")
    installs = [s.value[0] for s in by_cmd["RUN"] if "pip install" in s.value[0]]
    assert installs == ["python -m pip install --no-cache-dir -r requirements/serve.txt"]
    copied = {s.value[0] for s in by_cmd["COPY"]}
    assert {"core/", "service/"} <= copied and not any(c.startswith("training") for c in copied)
    # The artifact reaches the image only through the stage that keeps what the ONNX backend loads.
    image_steps = steps[max(i for i, s in enumerate(steps) if s.cmd == "FROM"):]
    assert not any(s.cmd == "COPY" and s.value[0] == "${ARTIFACT}" for s in image_steps)
    assert any(s.cmd == "COPY" and s.flags == ("--from=serving-files",) for s in image_steps)
    pins = [line.split("==")[0].lower() for line in (ROOT / "requirements/serve.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert "torch" not in pins and {"bentoml", "onnxruntime", "transformers"} <= set(pins)
    assert all("==" in line for line in (ROOT / "requirements/serve.txt").read_text().splitlines()
               if line and not line.startswith("#"))


@pytest.mark.slow
def test_the_dockerfiles_install_steps_serve_the_onnx_model_without_torch(artifacts, tmp_path):
    """No Docker engine here: replay the Dockerfile's ENV, COPY and pip steps in a fresh venv, then its CMD."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    app, artifact = tmp_path / "app", tmp_path / "artifact"
    app.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNESERVE_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    build = tmp_path / "build"  # the first stage's /build

    def here(path: str) -> Path:
        return build / Path(path).relative_to("/build") if path.startswith("/build") else app / path

    command = None
    for step in instructions():
        if step.cmd == "ENV":
            env.update(dict(zip(step.value[::2], step.value[1::2])))
        elif step.cmd == "COPY":
            source, target = step.value
            if step.flags == ("--from=serving-files",):
                shutil.copytree(here(source), artifact)
                continue
            src = artifacts["classification"] if source == "${ARTIFACT}" else ROOT / source
            dst = here(target)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
        elif step.cmd == "RUN" and "pip install" in step.value[0]:
            args = shlex.split(step.value[0])
            done = subprocess.run([python, *args[1:]], cwd=app, env=env, capture_output=True, text=True, timeout=1200)
            assert done.returncode == 0, done.stderr[-3000:]
        elif step.cmd == "RUN" and step.value[0].startswith("python /build/"):
            # Run by the bare interpreter of the fresh venv (nothing installed yet): the standard library suffices.
            args = [str(here(a)) if a.startswith("/build") else a for a in shlex.split(step.value[0])[1:]]
            done = subprocess.run([python, *args], env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-3000:]
        elif step.cmd == "CMD":
            command = list(step.value)
    assert not (artifact / "model" / "model.safetensors").exists() and not (artifact / "adapter").exists()
    assert (artifact / "model" / "tokenizer.json").is_file() and (artifact / "manifest.json").is_file()
    assert env["TUNESERVE_MODELS"] == "/srv/models"  # the image serves what its first stage copied there
    env.update(TUNESERVE_MODELS=str(artifact), BENTOML_HOME=str(tmp_path / "bentoml"))
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    port = free_port()
    command = [str(venv / "bin" / command[0]), *command[1:command.index("--host")], "--host", "127.0.0.1", "--port", str(port)]
    with (tmp_path / "serve.log").open("w") as log:
        proc = subprocess.Popen(command, cwd=app, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url)
        r = httpx.post(url + "/predict", json={"texts": ["a superb plot"]})
        assert r.status_code == 200, r.text
        assert r.json()["backend"] in ("onnx", "onnx-int8")
        assert "torch" not in httpx.get(url + "/metadata").json()["versions"]["serving"]
        page = httpx.get(url + "/")  # the page and its files are in the image
        assert page.status_code == 200 and '<script src="/ui/app.js"' in page.text
        assert httpx.get(url + "/ui/app.js").status_code == 200
    finally:
        stop(proc)


def test_bentoml_build_packages_service_core_and_the_registered_model(artifacts, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(BENTOML_HOME=str(tmp_path / "bentoml"), TUNESERVE_MODEL="tiny-sentiment:latest")
    done = subprocess.run([sys.executable, "-m", "training.cli", "register", str(artifacts["classification"]),
                           "--name", "tiny-sentiment"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tag = done.stdout.strip().splitlines()[-1]
    built = subprocess.run([sys.executable, "-m", "bentoml", "build", ".", "--output", "tag"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    info = subprocess.run([sys.executable, "-m", "bentoml", "get", "tuneserve:latest", "-o", "json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    bento = json.loads(info.stdout)
    assert [m["tag"] for m in bento["services"][0]["models"]] == [tag]  # BentoML 1.4 lists models per service
    bentos = tmp_path / "bentoml" / "bentos" / "tuneserve"
    src = next(p for p in bentos.iterdir() if p.is_dir() and p.name != "latest") / "src"
    assert (src / "service" / "service.py").is_file() and (src / "core" / "manifest.py").is_file()
    assert {p.name for p in (src / "service" / "web").iterdir()} >= {"index.html", "app.js", "app.css"}  # the page
    assert not (src / "training").exists() and not (src / "tests").exists()
    requirements = next((src.parent / "env" / "python").glob("requirements*.txt")).read_text()
    assert "onnxruntime==" in requirements and "torch" not in requirements


@pytest.mark.slow
def test_the_dockerfiles_first_stage_takes_a_directory_of_artifacts_and_stores_their_base_once(shared_artifacts,
                                                                                              tmp_path):
    """ARTIFACT may name a directory of artifacts: the first stage copies each one's serving files under its name,
    the base graph the LoRA models share once (the others link to it), and the image's TUNESERVE_MODELS serves the
    set over that base."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("sentiment", "tags"):
        shutil.copytree(shared_artifacts[name], models / name)
    done = subprocess.run([sys.executable, str(ROOT / "core" / "cpu_files.py"), str(models), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "out"
    bases = [out / name / "onnx" / "shared" / "base.onnx" for name in ("sentiment", "tags")]
    assert not bases[0].is_symlink() and bases[1].is_symlink()
    assert bases[1].resolve() == bases[0].resolve() and "tags/onnx/shared/base.onnx -> sentiment/" in done.stdout
    assert all(p.name == "adapter.safetensors" for p in out.rglob("*.safetensors"))  # no PyTorch weights

    _serves_the_set({"TUNESERVE_MODELS": str(out)}, tmp_path / "bentoml")

    done = subprocess.run([sys.executable, str(ROOT / "core" / "cpu_files.py"), str(tmp_path / "bentoml"),
                           str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "neither an artifact" in done.stderr


@pytest.mark.slow
def test_models_over_one_base_are_registered_and_packaged_with_their_base_graph_once(shared_artifacts, tmp_path):
    """`tuneserve register --onnx-only` stores the base graph of LoRA models over one base in one entry of its own,
    which each model's entry names; the service finds it there, and `bentoml build` packages it once."""
    home = tmp_path / "bentoml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")} | {"BENTOML_HOME": str(home)}
    tags = {}
    for name in ("sentiment", "tags", "sentiment"):  # the second registration of one artifact stores nothing
        done = subprocess.run([sys.executable, "-m", "training.cli", "register", str(shared_artifacts[name]),
                               "--onnx-only", "--name", name], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        tags[name] = done.stdout.strip().splitlines()[-1]
    store = home / "models"
    bases = sorted(p for p in store.rglob("base.onnx"))
    assert len(bases) == 1 and bases[0].relative_to(store).parts[0].startswith("tuneserve-base-")
    pointers = {name: next((store / name).rglob("base.store-tag")).read_text().strip() for name in ("sentiment", "tags")}
    assert pointers["sentiment"] == pointers["tags"] and len(list((store / "sentiment").iterdir())) == 2  # + latest

    _serves_the_set({"TUNESERVE_MODELS": f"{tags['sentiment']},{tags['tags']}"}, home)

    # The bento names the two models and the base graph's entry; exported, it holds the base graph once, and
    # served from its own directory (as its image does, with a store of its own) it finds the base there.
    env["TUNESERVE_MODELS"] = f"{tags['sentiment']},{tags['tags']}"
    built = subprocess.run([sys.executable, "-m", "bentoml", "build", ".", "--output", "tag"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    info = json.loads(subprocess.run([sys.executable, "-m", "bentoml", "get", "tuneserve:latest", "-o", "json"],
                                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=120).stdout)
    assert sorted(m["tag"] for m in info["services"][0]["models"]) == sorted([tags["sentiment"], tags["tags"],
                                                                              pointers["sentiment"]])
    archive = tmp_path / "tuneserve.bento"
    done = subprocess.run([sys.executable, "-m", "bentoml", "export", "tuneserve:latest", str(archive)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    bento = tmp_path / "bento"
    bento.mkdir()
    shutil.unpack_archive(archive, bento, format="tar")
    graphs = sorted(p.relative_to(bento / "models").parts[0] for p in (bento / "models").rglob("base.onnx"))
    assert graphs == [pointers["sentiment"].partition(":")[0]]  # once, in the base's entry

    _serves_the_set({"TUNESERVE_MODELS": env["TUNESERVE_MODELS"]}, tmp_path / "empty-home", bento=str(bento))


def _serves_the_set(env: dict, home: Path, bento: str = ".") -> None:
    """A real server over the set of a LoRA classifier and a tagger: /models lists both on their shared base, and
    the classifier answers."""
    from tests.service.test_serve_process import start_server

    proc, url, _ = start_server(env, home, bento=bento)
    try:
        wait_ready(proc, url)
        listed = httpx.get(url + "/models").json()["models"]
        assert [(m["name"], m["backend"]) for m in listed] == [("sentiment", "onnx-shared"), ("tags", "onnx-shared")]
        answer = httpx.post(url + "/predict", json={"texts": ["a fine film"], "model": "sentiment"})
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in ("positive", "negative")
    finally:
        stop(proc)
