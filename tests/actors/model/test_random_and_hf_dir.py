"""random:<preset> models, make-random-model folders read by transformers, and HF folder errors."""
from __future__ import annotations

import json

import pytest
import torch
from greedy_compare import assert_same_greedy, transformers_greedy

from fastdecode.actors.model import LlamaModel, ModelError, load_model
from fastdecode.actors.model import hf_dir
from fastdecode.actors.model.presets import PRESETS
from fastdecode.actors.model.weights import hf_state_dict, init_random_weights
from fastdecode.actors.reference import reference_generate
from fastdecode.actors.request import SamplingParams
from fastdecode.cli.make_random_model import make_random_model

SEED = 3


@pytest.fixture(scope="module")
def written_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny"
    make_random_model("tiny", SEED, out)
    return out


def test_same_seed_same_weights_other_seed_others():
    a, _ = load_model("random:tiny", dtype="float32", device="cpu", seed=1)
    b, _ = load_model("random:tiny", dtype="float32", device="cpu", seed=1)
    c, _ = load_model("random:tiny", dtype="float32", device="cpu", seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.layers[0].qkv_weight, c.layers[0].qkv_weight)
    norms = a.layers[1].post_norm
    assert 0.5 < norms.mean().item() < 1.5 and norms.std().item() > 0.01


def test_bfloat16_weights_are_the_float32_ones_rounded():
    f32, _ = load_model("random:tiny", dtype="float32", device="cpu", seed=4)
    bf16, _ = load_model("random:tiny", dtype="bfloat16", device="cpu", seed=4)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16.layers[0].gate_up_weight, f32.layers[0].gate_up_weight.to(torch.bfloat16))


def test_random_generation_happens_in_chunks_on_the_device(monkeypatch):
    """Large presets are filled piece by piece: no float32 copy of a whole big tensor."""
    from fastdecode.actors.model import weights

    monkeypatch.setattr(weights, "_RANDOM_CHUNK_ELEMENTS", 1000)
    sizes = []
    real_randn = torch.randn

    def spy(*args, **kwargs):
        out = real_randn(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(weights.torch, "randn", spy)
    model = LlamaModel(PRESETS["tiny"], dtype=torch.bfloat16, device="cpu")
    init_random_weights(model, 0)
    assert max(sizes) <= 1000 and sum(sizes) == sum(p.numel() for p in model.parameters())


def test_tiny_tokenizer_is_real(tiny_model):
    _, tokenizer = tiny_model
    ids = tokenizer.encode("The capital of France is Paris.")
    assert ids[0] == tokenizer.bos_token_id and len(ids) < len("The capital of France is Paris.")
    assert tokenizer.decode(ids) == "The capital of France is Paris."
    assert tokenizer.encode_chat([{"role": "user", "content": "hi"}])[:1] == [tokenizer.bos_token_id]


def test_written_model_loads_back_identically(written_tiny):
    ours, _ = load_model("random:tiny", dtype="float32", device="cpu", seed=SEED)
    back, tokenizer = load_model(str(written_tiny), dtype="float32", device="cpu")
    assert back.config == ours.config
    assert all(torch.equal(x, y) for x, y in zip(ours.parameters(), back.parameters()))
    assert tokenizer.eos_token_ids == ours.config.eos_token_ids


@pytest.mark.slow
def test_transformers_loads_written_model_with_same_greedy_tokens(written_tiny):
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(written_tiny), dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(written_tiny))
    ours, tokenizer = load_model("random:tiny", dtype="float32", device="cpu", seed=SEED)
    text = "The capital of France is"
    prompt = tokenizer.encode(text)
    assert prompt == hf_tokenizer(text)["input_ids"]
    reference, gaps = transformers_greedy(hf_model, prompt, 32)
    result = reference_generate(ours, tokenizer, prompt, SamplingParams(temperature=0.0, max_tokens=32,
                                                                          ignore_eos=True))
    assert_same_greedy(result.token_ids, reference, gaps, label="make-random-model tiny")
    assert hf_tokenizer.decode(result.token_ids, skip_special_tokens=True) == result.text
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)


def test_sharded_folder_round_trips(tmp_path, monkeypatch, tiny_model):
    model, tokenizer = tiny_model
    monkeypatch.setattr(hf_dir, "MAX_SHARD_BYTES", 64 * 1024)
    hf_dir.write_hf_model(tmp_path, model, tokenizer)
    index = json.loads((tmp_path / hf_dir.INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    back, _ = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), back.parameters()))


def test_a_folder_of_pytorch_model_bin_files_loads_the_same_weights(written_tiny, tmp_path):
    """Older folders hold pickled state dicts (one file, or shards), which vLLM loads; they were refused."""
    from safetensors.torch import load_file

    state = load_file(written_tiny / "model.safetensors")
    names = sorted(state)
    cases = ((tmp_path / "one", [names], True), (tmp_path / "two", [names[::2], names[1::2]], True),
             (tmp_path / "legacy", [names], False))  # torch's format before 1.6: no mmap
    for folder, shards, is_zip in cases:
        _copy_folder(written_tiny, folder)
        (folder / "model.safetensors").unlink()
        for number, part in enumerate(shards, start=1):
            torch.save({name: state[name] for name in part}, folder / f"pytorch_model-{number:05d}.bin",
                       _use_new_zipfile_serialization=is_zip)
        back, _ = load_model(str(folder), dtype="float32", device="cpu")
        expected, _ = load_model(str(written_tiny), dtype="float32", device="cpu")
        assert all(torch.equal(x, y) for x, y in zip(expected.parameters(), back.parameters()))
    (tmp_path / "two" / "pytorch_model-00001.bin").write_bytes(b"not a pickle")
    with pytest.raises(ModelError, match="corrupt weights file .*pytorch_model-00001.bin"):
        load_model(str(tmp_path / "two"), dtype="float32", device="cpu")


def _copy_folder(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").unlink(), "missing file .*config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "corrupt JSON file"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 16), "corrupt safetensors"),
        (lambda d: (d / "model.safetensors").unlink(), "no \\*.safetensors"),
        (lambda d: (d / "tokenizer.json").write_text("[]"), "corrupt tokenizer file"),
        (lambda d: (d / "tokenizer.json").unlink(), "missing tokenizer file"),
        (lambda d: (d / "config.json").write_text(json.dumps({"architectures": ["BertModel"]})),
         "unsupported architecture 'BertModel'"),
    ],
)
def test_damaged_folders_give_one_line_model_errors(written_tiny, tmp_path, damage, message):
    folder = _copy_folder(written_tiny, tmp_path / "m")
    damage(folder)
    with pytest.raises(ModelError, match=message) as info:
        load_model(str(folder), dtype="float32", device="cpu")
    assert "\n" not in str(info.value)


def test_missing_tensor_is_named(written_tiny, tmp_path, tiny_model):
    from safetensors.torch import save_file

    folder = _copy_folder(written_tiny, tmp_path / "m")
    tensors = hf_state_dict(load_model(str(folder), dtype="float32", device="cpu")[0])
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelError, match="lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(str(folder), dtype="float32", device="cpu")


def test_unknown_names_and_options():
    with pytest.raises(ModelError, match="unknown model"):
        load_model("/no/such/folder")
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model("random:tiny", dtype="float64")
    with pytest.raises(ModelError, match="unknown device"):
        load_model("random:tiny", device="tpu")
    with pytest.raises(ModelError, match="unknown device"):
        load_model("random:tiny", device="cuda:x")
    # the dense thread, CUDA graphs and Triton kernels work on the current GPU: another one is chosen as vLLM does
    with pytest.raises(ModelError, match="CUDA_VISIBLE_DEVICES=1 with device cuda"):
        load_model("random:tiny", device="cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ModelError, match="no CUDA GPU"):
        load_model("random:tiny", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_random_model_on_cuda_defaults_to_bfloat16():
    model, _ = load_model("random:tiny", device="auto")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
