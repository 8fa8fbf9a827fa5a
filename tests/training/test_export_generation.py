"""A causal LM's decoder exported with its key/value cache, decoded by core.decoding without torch: greedy output
equals transformers' generate token for token, alone and in left-padded batches."""

import subprocess
import sys
from pathlib import Path

import pytest

from core.decoding import Generated, OnnxDecoder
from tests.conftest import byte_level_bpe
from training.export.decoder import export_decoder

ROOT = Path(__file__).resolve().parents[2]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Summaries are short; descriptions are long and detailed.",
    "copy files and directories from one place to another",
    "list directory contents, sorted by name or by time",
    "Print lines that match a pattern in each file.",
    "A small model writes a few words, then it stops.",
    "remove files or directories, and report what was removed",
    "Concatenate files and print them on the standard output.",
]
PROMPTS = ["The quick brown fox", "copy files", "Print lines that match a pattern in each"]
NEW = 12


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random 2-layer Llama (4 heads, 2 of them for keys and values) with a byte-level BPE tokenizer whose
    end-of-sequence token is "<|im_end|>", saved together; its ONNX export beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = byte_level_bpe(SENTENCES * 4, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size=1000,
                               eos_token="<|im_end|>", pad_token="<|im_end|>", padding_side="left",
                               clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(directory)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    onnx_path = export_decoder(directory, directory / "onnx" / "decoder.onnx")
    return model, tokenizer, onnx_path


@pytest.fixture(scope="module")
def decoder(tiny_lm):
    _, tokenizer, onnx_path = tiny_lm
    return OnnxDecoder(onnx_path, tokenizer, tokenizer.eos_token_id, threads=1)


def _ids(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _torch_greedy(model, tokenizer, prompts, max_new_tokens, eos_token_id=None):
    """transformers' greedy continuation of each prompt (one left-padded batch), cut after its first eos."""
    import torch

    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id)
    rows = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def test_gpt2_exports_and_decodes_the_same_way(tiny_lm, tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_lm[1]
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "gpt2")
    gpt2 = OnnxDecoder(export_decoder(tmp_path / "gpt2", tmp_path / "gpt2.onnx"), tokenizer, tokenizer.eos_token_id)
    assert (gpt2.num_layers, gpt2.kv_heads, gpt2.head_dim) == (2, 2, 16)
    prompts = _ids(tokenizer, PROMPTS)
    assert [list(g.token_ids) for g in gpt2.generate(prompts, NEW)] == _torch_greedy(model, tokenizer, prompts, NEW)


def test_export_names_the_cache_by_layer(decoder):
    assert decoder.num_layers == 2 and (decoder.kv_heads, decoder.head_dim) == (2, 16)
    assert decoder.past_names == ["past_key_values.0.key", "past_key_values.0.value",
                                  "past_key_values.1.key", "past_key_values.1.value"]
    assert decoder.present_names == ["present.0.key", "present.0.value", "present.1.key", "present.1.value"]


def test_greedy_equals_transformers_generate_for_one_prompt(tiny_lm, decoder):
    model, tokenizer, _ = tiny_lm
    prompt = _ids(tokenizer, PROMPTS[:1])
    [expected] = _torch_greedy(model, tokenizer, prompt, NEW)
    [got] = decoder.generate(prompt, NEW)
    assert isinstance(got, Generated)
    assert list(got.token_ids) == expected and got.tokens == len(expected) == NEW
    assert got.finish_reason == "length"
    assert got.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_greedy_equals_transformers_generate_for_a_left_padded_batch(tiny_lm, decoder):
    model, tokenizer, _ = tiny_lm
    prompts = _ids(tokenizer, PROMPTS)
    assert len({len(p) for p in prompts}) == 3  # three lengths: two rows are padded
    expected = _torch_greedy(model, tokenizer, prompts, NEW)
    got = decoder.generate(prompts, NEW)
    assert [list(g.token_ids) for g in got] == expected
    # Batch invariance: each prompt alone gives what it gives in the batch.
    assert [decoder.generate([p], NEW)[0] for p in prompts] == got


def test_an_end_of_sequence_token_stops_its_row_only(tiny_lm, decoder):
    model, tokenizer, onnx_path = tiny_lm
    prompts = _ids(tokenizer, PROMPTS)
    free = decoder.generate(prompts, NEW)
    # Take a token that greedy writes in the middle of the first row as the end of sequence.
    eos = free[0].token_ids[4]
    stop_at = free[0].token_ids.index(eos)
    stopping = OnnxDecoder(onnx_path, tokenizer, [eos], threads=1)
    got = stopping.generate(prompts, NEW)
    assert got[0].finish_reason == "stop" and got[0].token_ids == free[0].token_ids[:stop_at + 1]
    assert got[0].text == tokenizer.decode(free[0].token_ids[:stop_at], skip_special_tokens=True)
    assert [list(g.token_ids) for g in got] == _torch_greedy(model, tokenizer, prompts, NEW, eos_token_id=eos)
    assert {g.finish_reason for g in got} == {"stop", "length"}
    for g, f in zip(got, free):
        assert (g.finish_reason == "stop") == (eos in f.token_ids)
        assert g.tokens == (f.token_ids.index(eos) + 1 if eos in f.token_ids else NEW)


def test_a_stop_string_cuts_the_text_where_it_begins(decoder, tiny_lm):
    tokenizer = tiny_lm[1]
    prompt = _ids(tokenizer, PROMPTS[1:2])
    [free] = decoder.generate(prompt, NEW)
    cut = len(tokenizer.decode(free.token_ids[:5], skip_special_tokens=True))
    stop = free.text[cut:cut + 3]
    assert len(stop) == 3
    [got] = decoder.generate(prompt, NEW, stop=["never written", stop])
    start = free.text.find(stop)
    assert got.finish_reason == "stop" and got.text == free.text[:start]
    assert got.token_ids == free.token_ids[:got.tokens] and got.tokens < NEW
    # The row stopped at the token that completed the stop string.
    assert stop not in tokenizer.decode(got.token_ids[:-1], skip_special_tokens=True)
    assert stop in tokenizer.decode(got.token_ids, skip_special_tokens=True)


def test_seeded_sampling_repeats_with_its_seed_and_differs_with_another(decoder, tiny_lm):
    prompts = _ids(tiny_lm[1], PROMPTS)
    sample = {"temperature": 1.5, "top_p": 0.95, "top_k": 200}
    first = decoder.generate(prompts, NEW, seed=7, **sample)
    assert decoder.generate(prompts, NEW, seed=7, **sample) == first
    assert decoder.generate(prompts, NEW, seed=8, **sample) != first
    assert [g.token_ids for g in first] != [g.token_ids for g in decoder.generate(prompts, NEW)]
    # Per-prompt seeds give a prompt the same draws in a batch as alone.
    alone = [decoder.generate([p], NEW, seed=[s], **sample)[0] for p, s in zip(prompts, [1, 2, 3])]
    assert decoder.generate(prompts, NEW, seed=[1, 2, 3], **sample) == alone


def test_top_k_of_one_is_greedy(decoder, tiny_lm):
    prompts = _ids(tiny_lm[1], PROMPTS)
    assert decoder.generate(prompts, NEW, temperature=0.7, top_k=1, seed=3) == decoder.generate(prompts, NEW)


@pytest.mark.parametrize("options", [{}, {"stop": ["never written"]}, {"temperature": 1.0, "seed": 5}])
def test_streamed_chunks_join_to_the_generated_text(decoder, tiny_lm, options):
    [prompt] = _ids(tiny_lm[1], PROMPTS[:1])
    [expected] = decoder.generate([prompt], NEW, **options)
    stream = decoder.stream(prompt, NEW, every=3, **options)
    chunks = []
    while True:
        try:
            chunks.append(next(stream))
        except StopIteration as done:
            result = done.value
            break
    assert len(chunks) > 1 and all(chunks)
    assert "".join(chunks) == expected.text and result == expected


def test_streaming_holds_back_a_possible_stop_string(decoder, tiny_lm):
    [prompt] = _ids(tiny_lm[1], PROMPTS[1:2])
    [free] = decoder.generate([prompt], NEW)
    stop = free.text[len(free.text) // 2:][:4]
    [expected] = decoder.generate([prompt], NEW, stop=[stop])
    chunks = list(decoder.stream(prompt, NEW, stop=[stop], every=1))
    assert "".join(chunks) == expected.text and stop not in "".join(chunks)


def test_closing_a_stream_stops_decoding(tiny_lm):
    tokenizer, onnx_path = tiny_lm[1], tiny_lm[2]
    decoder = OnnxDecoder(onnx_path, tokenizer, tokenizer.eos_token_id, threads=1)
    runs = []
    run = decoder.session.run
    decoder.session = type("Counting", (), {"run": lambda self, *a: runs.append(1) or run(*a)})()
    stream = decoder.stream(_ids(tokenizer, PROMPTS[:1])[0], 200, every=2)
    next(stream)
    stream.close()
    assert len(runs) < 10  # the steps up to the first chunk, none of the 200 after it


@pytest.mark.parametrize("options, field", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
])
def test_bad_sampling_options_name_the_field(decoder, options, field):
    with pytest.raises(ValueError, match=field):
        decoder.generate([[5, 6]], 4, **options)


def test_bad_lengths_are_refused(decoder):
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate([[5, 6]], 0)
    with pytest.raises(ValueError, match="at least one token"):
        decoder.generate([[5, 6], []], 3)
    assert decoder.generate([], 3) == []


def test_a_graph_without_a_cache_is_refused(tmp_path, tiny_lm):
    import onnx
    from onnx import TensorProto, helper

    from core.errors import ArtifactError

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    with pytest.raises(ArtifactError, match="attention_mask.*past_key_values"):
        OnnxDecoder(path, tiny_lm[1], 0)
    # A session opened beforehand (the service opens it while the tokenizer loads) is checked the same way.
    from core.onnx_runner import open_session
    with pytest.raises(ArtifactError, match="^not a decoder graph.*attention_mask"):
        OnnxDecoder(open_session(path), tiny_lm[1], 0)


def test_the_selftest_takes_prompts_of_one_padded_width_that_run_as_one_batch():
    from core.decoding import PAD_MULTIPLE
    from training.export.decoder import SELFTEST_EXAMPLES, selftest_rows

    assert SELFTEST_EXAMPLES == 4
    lengths = [90, 74, 40, 104, 50, 112, 60, 45, 33, 70, 64]  # widths 96, 96, 64, 128, 64, 128, 64, 64, 64, 96, 64
    prompts = [[0] * n for n in lengths]
    # The narrowest width with four prompts (64: rows 2, 4, 6, 7, 8, 10), in order; row 8 (33 tokens) is not a
    # candidate (its text was written differently by a kept decoder, say).
    chosen = selftest_rows(prompts, [i for i in range(len(lengths)) if i != 8])
    assert chosen == [2, 4, 6, 7]
    assert {-(-lengths[i] // PAD_MULTIPLE) for i in chosen} == {2}
    # No width with four: the shortest prompts.
    assert selftest_rows(prompts, [0, 1, 3, 5, 2]) == [2, 1, 0, 3]
    assert selftest_rows(prompts, [5, 3]) == [3, 5]


def test_decoding_needs_no_torch(tiny_lm, decoder):
    """core.decoding imports and decodes in a process where torch cannot be imported.

    torch is hidden by an import hook, as in an environment without it: the shortcut ``sys.modules['torch'] = None``
    breaks scipy (imported by core's metrics), which takes any entry there for the module itself."""
    tokenizer, onnx_path = tiny_lm[1], tiny_lm[2]
    prompt = _ids(tokenizer, PROMPTS[:1])
    [expected] = decoder.generate(prompt, NEW)
    script = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "try:\n"
        "    import torch\n"
        "    raise SystemExit('torch was importable')\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "from tokenizers import Tokenizer\n"
        "from core.decoding import OnnxDecoder\n"
        f"tok = Tokenizer.from_file({str(onnx_path.parent.parent / 'tokenizer.json')!r})\n"
        f"[g] = OnnxDecoder({str(onnx_path)!r}, tok, {tokenizer.eos_token_id}, threads=1).generate({prompt!r}, {NEW})\n"
        "assert not any(m.split('.')[0] == 'torch' for m in sys.modules)\n"
        "print(list(g.token_ids)); print(repr(g.text))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [str(list(expected.token_ids)), repr(expected.text)]


def test_an_int8_decoder_answers_the_same_alone_as_pooled_with_longer_prompts(tiny_lm, tmp_path):
    """8-bit weights with int8 arithmetic quantise activations at run time, which turns rounding-level differences
    into visible ones; each prompt is padded to a width of its own (a multiple of PAD_MULTIPLE), never to its
    batch-mates', so what it writes cannot depend on them. Sampling draws per row, so the seeded draws too."""
    from core.decoding import PAD_MULTIPLE
    from training.export.decoder import quantize_decoder

    _, tokenizer, onnx_path = tiny_lm
    int8 = OnnxDecoder(quantize_decoder(onnx_path, tmp_path / "model.int8.onnx"), tokenizer, [], threads=1)
    words = " ".join(SENTENCES).split()
    # lengths on both sides of several padded widths, so rows of different widths share a call
    prompts = [tokenizer(" ".join(words[:n]), add_special_tokens=False)["input_ids"] for n in (2, 5, 21, 30, 47)]
    assert len({-(-len(p) // PAD_MULTIPLE) for p in prompts}) >= 2
    for options in ({}, {"temperature": 1.0, "seed": [11, 12, 13, 14, 15]}):
        pooled = int8.generate(prompts, NEW, **options)
        seeds = options.pop("seed", [None] * len(prompts))
        alone = [int8.generate([p], NEW, seed=[s], **options)[0] for p, s in zip(prompts, seeds)]
        assert [a.token_ids for a in alone] == [p.token_ids for p in pooled]
        assert all(len(p.token_ids) == NEW for p in pooled)  # no end-of-sequence token: every row ran its course


def test_a_tied_embedding_is_stored_once_and_decodes_and_quantises_as_before(tmp_path):
    """SmolLM2 ties its output projection to its input embedding; the export keeps one copy (a Transpose of the
    table, folded by ONNX Runtime at start-up) and the logits stay bit for bit those of the graph with two copies.
    The int8 decoder still has its output projection in 8 bits."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.export.decoder import _materialise_tied_embeddings, quantize_decoder, share_tied_embeddings

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=1, pad_token_id=1)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "lm")
    tied = export_decoder(tmp_path / "lm", tmp_path / "tied" / "model.onnx", all_logits=True)
    shapes = [list(w.dims) for w in onnx.load(str(tied)).graph.initializer]
    assert shapes.count([300, 32]) == 1 and [32, 300] not in shapes

    # The same graph with the second copy put back, as the exporter wrote it; sharing finds the copy again.
    untied = onnx.load(str(tied))
    _materialise_tied_embeddings(untied)
    two_copies, shared_again = tmp_path / "two-copies.onnx", tmp_path / "shared-again.onnx"
    onnx.save(untied, str(two_copies))
    onnx.save(untied, str(shared_again))
    assert share_tied_embeddings(shared_again) == 1
    assert two_copies.stat().st_size > tied.stat().st_size + 300 * 32 * 4 - 1024  # the table's bytes

    feeds = {"input_ids": np.array([[5, 17, 250, 3]]), "attention_mask": np.ones((1, 4), dtype=np.int64),
             "position_ids": np.arange(4)[None]}
    feeds |= {f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 8), dtype=np.float32) for i in range(2)
              for k in ("key", "value")}
    # A decoder over 2 GB keeps its weights outside the graph file: the shared graph does too, in one file.
    outside = tmp_path / "outside" / "model.onnx"
    outside.parent.mkdir()
    onnx.save(untied, str(outside), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert share_tied_embeddings(outside) == 1
    assert sorted(p.name for p in outside.parent.iterdir()) == ["model.onnx", "model.onnx.data"]

    logits = [ort.InferenceSession(str(p)).run(["logits"], feeds)[0] for p in (tied, two_copies, shared_again, outside)]
    assert all(np.array_equal(logits[0], other) for other in logits[1:])
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(feeds["input_ids"])).logits.numpy()
    np.testing.assert_allclose(logits[0], expected, atol=1e-4)

    int8 = onnx.load(str(quantize_decoder(tied, tmp_path / "model.int8.onnx")))
    assert [n.op_type for n in int8.graph.node].count("MatMulNBits") == 2 * 7 + 1  # 7 per layer, and the projection
