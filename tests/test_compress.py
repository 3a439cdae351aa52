"""Any model, any engine: `capscale.compress_` puts a format into third-party models (Hugging Face Llama and
GPT-2 built from tiny configs, nothing downloaded), trained by a plain loop, DDP or FSDP2."""
import io
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import capscale
from capscale.trainers.compress import decompress_
from capscale.trainers.layers import CompressedLinear, rotate

transformers = pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[dev]'")


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def by_hand(layer: CompressedLinear, x: torch.Tensor) -> torch.Tensor:
    """The format applied without the module: rotate the operands (a weight-only layer, QuEST's way, only the
    weight), compress each, multiply, add the bias."""
    w = layer.weight.t() if layer.transposed else layer.weight
    if layer.hadamard_block:
        w = rotate(w, layer.hadamard)
        if layer.comp.rotates_activation_only_with_weights() is not False:
            x = rotate(x, layer.hadamard)
    a_fmt, w_fmt = layer.comp.a_fmt, layer.comp.w_fmt
    return F.linear(a_fmt(x) if a_fmt else x, w_fmt(w) if w_fmt else w, layer.bias)


CASES = [(tiny_llama, "int4/int4"), (tiny_llama, "2:4+int4"), (tiny_gpt2, "nvfp4"), (tiny_gpt2, "int4/int4")]


@pytest.mark.parametrize("build,label", CASES, ids=[f"{b.__name__}-{c}" for b, c in CASES])
def test_compress_replaces_every_linear_but_the_head_and_computes_the_format(build, label):
    model = build()
    before = {n: p for n, p in model.named_parameters()}
    capscale.compress_(model, label)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert len(layers) == len(model.capscale_summary) == (14 if build is tiny_llama else 8)
    assert not isinstance(model.get_output_embeddings(), CompressedLinear)
    assert all(p is before[n] for n, p in model.named_parameters())  # the very same tensors
    for layer in layers.values():
        inputs = torch.randn(3, 5, layer.in_features)
        assert torch.equal(layer(inputs), by_hand(layer, inputs))
    assert f"w={label.split('/')[0]}" in str(model.capscale_summary)


@pytest.mark.parametrize("build,label", [(tiny_llama, "2:4+int4"), (tiny_gpt2, "int4/int4")],
                         ids=["llama-2:4+int4", "gpt2-int4/int4"])
def test_a_plain_training_loop_over_a_compressed_model_learns(build, label):
    from capscale.trainers.data import load_tokens, random_batch
    data = load_tokens()
    model = capscale.compress_(build(), label)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        x, _ = random_batch(data.train, 8, 32, gen)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_state_dicts_keep_their_keys_and_reload_to_the_same_outputs():
    plain_keys = set(tiny_llama().state_dict())
    model = capscale.compress_(tiny_llama(), "int4/int4")
    assert set(model.state_dict()) == plain_keys
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    other = capscale.compress_(tiny_llama(seed=1), "int4/int4")
    other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, other(input_ids=x).logits)


def test_siblings_reading_one_input_compress_it_once_with_the_same_outputs_and_gradients(monkeypatch):
    from capscale.trainers.layers import SharedInput
    x = torch.randint(0, 256, (2, 16))

    def step(model):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    shared = capscale.compress_(tiny_llama(), "int4/int4")
    made = []
    original = CompressedLinear._compress_input
    monkeypatch.setattr(CompressedLinear, "_compress_input", lambda self, t: made.append(self) or original(self, t))
    loss, grads = step(shared)
    assert len(made) == 2 * 4  # per layer: q/k/v's input, o's, gate/up's and down's, not one per linear (7)
    alone = capscale.compress_(tiny_llama(), "int4/int4")
    for layer in alone.modules():
        if isinstance(layer, CompressedLinear):
            layer.__dict__["shared_input"] = SharedInput()
    loss_alone, grads_alone = step(alone)
    assert torch.equal(loss, loss_alone)
    assert all(torch.allclose(grads[n], grads_alone[n], rtol=1e-5, atol=1e-7) for n in grads)
    layer = shared.model.layers[0].self_attn.q_proj
    h = torch.randn(2, 16, 64)
    first = layer(h)
    h.mul_(2)  # the same tensor changed in place: compressed again, not served from the last call
    assert not torch.equal(layer(h), first) and torch.equal(layer(h), by_hand(layer, h))
    torch.save(shared, io.BytesIO())  # a pickled model carries no cached tensors
    leaf = torch.randn(2, 16, 64, requires_grad=True)  # one input tensor fed to two forward passes
    for _ in range(2):
        layer(leaf).sum().backward()  # the second pass builds its own graph, not the first one's (freed)


def test_decompress_gives_back_plain_layers_over_the_trained_tensors():
    for build in (tiny_llama, tiny_gpt2):
        model = build()
        reference = {n: p.clone() for n, p in model.state_dict().items()}
        types = {n: type(m) for n, m in model.named_modules()}
        capscale.compress_(model, "int4")
        decompress_(model)
        assert {n: type(m) for n, m in model.named_modules()} == types
        assert all(torch.equal(p, reference[n]) for n, p in model.state_dict().items())


def test_a_filter_chooses_the_layers_and_a_bad_compression_is_one_clear_error():
    model = capscale.compress_(tiny_llama(), "int4", filter_fn=lambda module, name: name.endswith("mlp.down_proj"))
    assert [c.name for c in model.capscale_summary] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(capscale.capacity.InputError, match="no linear layer matched"):
        capscale.compress_(tiny_llama(), "int4", filter_fn=lambda module, name: False)
    with pytest.raises(capscale.capacity.InputError):
        capscale.compress_(tiny_llama(), "int4(bits=nonsense)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_steps(rank: int, world: int, port: int, out: str):
    """Three AdamW steps of a compressed tiny Llama on a global batch of 8, each rank training on its share,
    under DDP and then under FSDP2 (one process group for both: each start-up costs seconds)."""
    from torch.distributed.fsdp import fully_shard
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mode in ("ddp", "fsdp2"):
            model = capscale.compress_(tiny_llama(), "int4/int4")
            if mode == "ddp":
                net = torch.nn.parallel.DistributedDataParallel(model)
            else:
                for layer in model.model.layers:
                    fully_shard(layer)
                net = fully_shard(model)
            optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
            gen = torch.Generator().manual_seed(0)
            for _ in range(3):
                x = torch.randint(0, 256, (8, 16), generator=gen)[rank::world]
                net(input_ids=x, labels=x).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                     for n, p in model.named_parameters()}
            if rank == 0:
                torch.save(state, f"{out}.{mode}")
    finally:
        torch.distributed.destroy_process_group()


def _single_process_steps() -> dict:
    model = capscale.compress_(tiny_llama(), "int4/int4")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randint(0, 256, (8, 16), generator=gen)
        halves = [model(input_ids=x[r::2], labels=x[r::2]).loss / 2 for r in range(2)]  # the mean of the ranks'
        sum(halves).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


def test_ddp_and_fsdp2_with_two_gloo_processes_train_as_one_process(tmp_path):
    from torch.distributed import fsdp
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    out = tmp_path / "state"
    torch.multiprocessing.spawn(_distributed_steps, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    single = _single_process_steps()
    for mode in ("ddp", "fsdp2"):
        distributed = torch.load(f"{out}.{mode}", weights_only=True)
        assert set(distributed) == set(single), mode
        for name, value in single.items():
            assert torch.allclose(distributed[name], value, atol=2e-5, rtol=1e-4), (mode, name)


# -- diagnose any checkpoint's real tensors -----------------------------------------------------------------------
def test_diagnose_reads_a_hugging_face_folder_and_a_state_dict(tmp_path, capsys):
    from capscale.cli import main
    from capscale.trainers.weights import diagnose_weights
    tiny_llama().save_pretrained(tmp_path / "llama")
    table = diagnose_weights(tmp_path / "llama", ["int4", "nvfp4"], samples=1 << 16, progress=False)
    assert table["layer"].nunique() == 14 and set(table["format"]) == {"int4", "nvfp4"}
    assert set(table["rotation"]) == {0, 64, 128}
    # the weights are freshly drawn from a normal: their error is the Gaussian one, with or without rotation
    assert table["ratio"].between(0.85, 1.15).all(), table[["layer", "format", "ratio"]]
    gpt2 = tiny_gpt2()
    gpt2.save_pretrained(tmp_path / "gpt2")  # Conv1D weights, stored (in, out): rows are read as (out, in)
    shapes = diagnose_weights(tmp_path / "gpt2", ["int4"], samples=1 << 16, progress=False).set_index("layer")["shape"]
    assert shapes["transformer.h.0.mlp.c_fc.weight"].iloc[0] == (256, 64)
    torch.save(tiny_llama().state_dict(), tmp_path / "state.pt")
    assert main(["diagnose", str(tmp_path / "state.pt"), "--format", "int4", "--json",
                 "--figure", str(tmp_path / "fig.png")]) in (0, None)
    records = __import__("json").loads(capsys.readouterr().out)["results"]
    assert len(records) == 28 and (tmp_path / "fig.png").stat().st_size > 10_000


def test_diagnose_of_foreign_weights_needs_a_format_and_refuses_what_is_not_a_checkpoint(tmp_path, capsys):
    from capscale.cli import main
    tiny_llama().save_pretrained(tmp_path / "llama")
    assert main(["diagnose", str(tmp_path / "llama")]) == 2
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert main(["diagnose", str(tmp_path / "junk.safetensors"), "--format", "int4"]) == 2
    err = capsys.readouterr().err
    assert "--format SPEC" in err and "not a readable safetensors file" in err and "Traceback" not in err


def test_diagnose_records_a_hugging_face_models_activations_on_calibration_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from capscale.trainers.weights import diagnose_activations
    vocab = {chr(i): i for i in range(256)}  # one token per character: a tokenizer built here, nothing downloaded
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=chr(0)))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    text = tmp_path / "calibration.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 20)
    table = diagnose_activations(folder, ["int4"], text, tokens=512, samples=1 << 16)
    assert table["layer"].nunique() == 14 and table["shape"].map(lambda s: s[0]).eq(512).all()
    assert (table["ratio"] > 0).all() and set(table["rotation"]) == {0, 64, 128}
