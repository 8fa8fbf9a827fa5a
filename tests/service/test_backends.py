"""Loading a backend: the graph opens on the calling thread while the tokenizer loads on another."""

import threading
import time

import pytest

from core.errors import ArtifactError
from service.backends import while_loading


def test_both_results_come_back_and_the_two_run_at_once():
    started = threading.Event()
    threads = {}

    def load():
        threads["load"] = threading.current_thread()
        started.set()
        time.sleep(0.2)
        return "tokenizer"

    def build():
        threads["build"] = threading.current_thread()
        assert started.wait(5), "the load did not start while the graph was being built"
        return "session"

    assert while_loading(load, build) == ("tokenizer", "session")
    assert threads["build"] is threading.current_thread() and threads["load"] is not threading.current_thread()


def test_a_failed_build_raises_its_error_after_the_load_has_ended():
    ended = threading.Event()

    def load():
        time.sleep(0.1)
        ended.set()

    def build():
        raise ArtifactError("model.onnx: ONNX Runtime cannot load it")

    with pytest.raises(ArtifactError, match="cannot load it"):
        while_loading(load, build)
    assert ended.is_set()


def test_a_failed_load_raises_its_error():
    def load():
        raise ArtifactError("run/artifact: cannot load the tokenizer from model/")

    with pytest.raises(ArtifactError, match="tokenizer"):
        while_loading(load, lambda: "session")


def test_when_both_fail_the_build_says_why():
    def load():
        raise ArtifactError("run/artifact: cannot load the tokenizer from model/")

    def build():
        raise ArtifactError("model.onnx: ONNX Runtime cannot load it")

    with pytest.raises(ArtifactError, match="ONNX Runtime"):
        while_loading(load, build)
