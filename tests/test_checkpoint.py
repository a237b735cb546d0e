"""PEFT-format checkpoints in both directions on the real MiniLM model, and a table of bad checkpoints."""

import json
import pickle

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import rotfunc
from rotfunc import bind
from rotfunc.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_adapter, save_adapter

pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"),
    # PEFT warns that a local base_model_name_or_path cannot be checked against the hub when offline
    pytest.mark.filterwarnings("ignore::UserWarning:peft"),
]

TARGETS = ["query", "value", "intermediate.dense"]


def rf_config(method):
    return {
        "road": rotfunc.RoadConfig(variant="road_4", group_size=32, target_modules=TARGETS),
        "oft": rotfunc.OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS, num_cayley_neumann_terms=7),
        "randlora": rotfunc.RandLoraConfig(r=32, randlora_alpha=64, projection_prng_key=3, target_modules=TARGETS),
    }[method]


def peft_config(method):
    d = rf_config(method).to_peft_dict()
    return {"road": peft.RoadConfig, "oft": peft.OFTConfig, "randlora": peft.RandLoraConfig}[method](**d)


def randomize_(named_params, seed, names):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in named_params:
            if any(n in k for n in names):
                scale = 0.05 if "oft_R" in k or k.endswith(".q") else 0.3
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype) * (p.abs().mean() + 0.1))


TRAINABLE = ("road_", "oft_R", "randlora_lambda", "randlora_gamma", ".rotfunc.")


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize("kind", [None, "nf4"])
@pytest.mark.parametrize("method", ["road", "oft", "randlora"])
def test_peft_to_rotfunc(minilm, tmp_path, method, kind):
    batch = minilm.batch()
    pm = peft.get_peft_model(minilm.model(kind), peft_config(method))
    randomize_(pm.named_parameters(), 11, TRAINABLE)
    expected = hidden(pm, batch)
    pm.save_pretrained(tmp_path)
    model = minilm.model(kind)
    load_adapter(model, tmp_path)
    got = hidden(model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - hidden(minilm.model(kind), batch)).abs().max() > 1e-2  # not the base model


@pytest.mark.parametrize("kind", [None, "nf4"])
@pytest.mark.parametrize("method", ["road", "oft", "randlora"])
def test_rotfunc_to_peft(minilm, tmp_path, method, kind):
    batch = minilm.batch()
    model = minilm.model(kind)
    bind.attach(model, rf_config(method))
    randomize_(model.named_parameters(), 12, TRAINABLE)
    expected = hidden(model, batch)
    save_adapter(model, tmp_path)
    cfg = peft.PeftConfig.from_pretrained(tmp_path)
    assert cfg.peft_type.value == rf_config(method).peft_type
    pm = peft.PeftModel.from_pretrained(minilm.model(kind), tmp_path)
    got = hidden(pm, batch)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - hidden(minilm.model(kind), batch)).abs().max() > 1e-2


def test_randlora_without_saved_projection_regenerates_bases(minilm, tmp_path):
    batch = minilm.batch()
    cfg = rotfunc.RandLoraConfig(r=32, randlora_alpha=64, projection_prng_key=5, target_modules=TARGETS, save_projection=False)
    model = minilm.model()
    bind.attach(model, cfg)
    randomize_(model.named_parameters(), 13, TRAINABLE)
    expected = hidden(model, batch)
    save_adapter(model, tmp_path)
    assert not any("randlora_A" in k or "randlora_B" in k for k in load_file(tmp_path / WEIGHTS_NAME))
    fresh = minilm.model()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(hidden(fresh, batch), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ bad checkpoints


def _drop_key(d):
    t = load_file(d / WEIGHTS_NAME)
    k = sorted(t)[0]
    del t[k]
    save_file(t, str(d / WEIGHTS_NAME))


def _extra_key(d):
    t = load_file(d / WEIGHTS_NAME)
    t["base_model.model.encoder.layer.0.attention.self.key.road_theta"] = torch.zeros(192)
    save_file(t, str(d / WEIGHTS_NAME))


def _wrong_shape(d):
    t = load_file(d / WEIGHTS_NAME)
    k = sorted(t)[0]
    t[k] = torch.zeros(t[k].numel() + 2)
    save_file(t, str(d / WEIGHTS_NAME))


def _edit_config(drop=(), **changes):
    def edit(d):
        cfg = json.loads((d / CONFIG_NAME).read_text())
        cfg.update(changes)
        for k in drop:
            del cfg[k]
        (d / CONFIG_NAME).write_text(json.dumps(cfg))

    return edit


def _truncate(d):
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _pickle_only(d):
    t = load_file(d / WEIGHTS_NAME)
    (d / WEIGHTS_NAME).unlink()
    with open(d / "adapter_model.bin", "wb") as f:
        pickle.dump({k: v.numpy() for k, v in t.items()}, f)


def _garbage_config(d):
    (d / CONFIG_NAME).write_text("{not json")


BAD = [
    # (case, how the directory is damaged, what the error must name)
    ("missing key", _drop_key, r"missing key 'base_model\.model\.encoder\.layer\.0\.attention\.self\.query\.road_alpha'"),
    ("extra key", _extra_key, r"has key 'base_model\.model\.encoder\.layer\.0\.attention\.self\.key\.road_theta'"),
    ("wrong shape", _wrong_shape, r"'base_model\.model\.encoder\.layer\.0\.attention\.self\.query\.road_alpha' has shape=\(\d+,\)"),
    ("another method", _edit_config(peft_type="LORA"), r"peft_type='LORA' is not an adapter rotfunc knows"),
    ("other method's config", _edit_config(drop=("variant", "group_size"), peft_type="OFT", r=0, oft_block_size=32), r"missing key .*oft_R\.weight"),
    ("unknown field", _edit_config(rotation_magic=3), r"rotation_magic"),
    ("truncated file", _truncate, r"adapter_model\.safetensors is not a readable safetensors file"),
    ("pickle", _pickle_only, r"adapter_model\.bin is a pickle file; rotfunc never unpickles"),
    ("bad json", _garbage_config, r"adapter_config\.json is not valid JSON"),
]


@pytest.mark.parametrize("case,damage,message", BAD, ids=[b[0] for b in BAD])
def test_bad_checkpoints_raise_and_leave_the_model_unchanged(minilm, tmp_path, case, damage, message):
    src = minilm.model()
    bind.attach(src, rotfunc.RoadConfig(group_size=32, target_modules=["query", "value"]))
    save_adapter(src, tmp_path)
    damage(tmp_path)
    model = minilm.model()
    bind.attach(model, rotfunc.OFTConfig(r=0, oft_block_size=32, target_modules=["key"]), adapter_name="other")
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        load_adapter(model, tmp_path)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert bind.adapter_names(model) == ["other"]


def test_a_pickle_file_path_is_refused_without_reading_it(minilm, tmp_path):
    bad = tmp_path / "adapter.pt"
    bad.write_bytes(b"\x80\x04this would run code if unpickled")
    with pytest.raises(CheckpointError, match=r"adapter\.pt is a pickle file"):
        load_adapter(minilm.model(), bad)


def test_saved_config_names_the_model_not_a_local_path_and_files_are_readable(minilm, tmp_path):
    import os
    import stat

    model = minilm.model()
    assert os.path.isabs(model.config._name_or_path)  # loaded from a directory inside site-packages
    bind.attach(model, rf_config("road"))
    out = save_adapter(model, tmp_path / "a")
    cfg = json.loads((out / CONFIG_NAME).read_text())
    name = cfg["base_model_name_or_path"]
    assert name and os.sep not in name and name == os.path.basename(model.config._name_or_path)
    save_adapter(model, tmp_path / "b", base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    assert json.loads((tmp_path / "b" / CONFIG_NAME).read_text())["base_model_name_or_path"] == (
        "sentence-transformers/all-MiniLM-L6-v2")
    umask = os.umask(0)
    os.umask(umask)
    for f in (WEIGHTS_NAME, CONFIG_NAME):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o666 & ~umask, f
