"""LLaVA-1.5 loaders: transformers' LlavaForConditionalGeneration (tiny config, random weights) saved in the
llava-hf layout and converted to the original haotian-liu layout, loaded into ours: logits agree to 1e-4 relative
in float32 and greedy generations are identical; bad checkpoints give clear errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm.generate import GenerationConfig, generate
from vlm.llava_loaders import convert_state_dict, detect_layout, load_llava, read_state_dict

IMAGE_TOKEN = 99
N_PATCHES = 4  # 28 px / 14 px patches -> 2 x 2


def tiny_hf_llava(seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          image_size=28, patch_size=14, projection_dim=16, hidden_act="quick_gelu")
    tc = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0, pad_token_id=0, eos_token_id=2,
                     bos_token_id=1, max_position_embeddings=128)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, projector_hidden_act="gelu",
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=N_PATCHES)
    model = LlavaForConditionalGeneration(cfg).eval()
    # Random weights everywhere (norms too), so a wrongly mapped tensor cannot hide behind an init value.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] in (32, 64) else 0.0))
    return model.float().eval()


def prompt_ids():
    # BOS, a few words, the image placeholder, a question, "ASSISTANT:" stand-ins
    return [1, 5, 17, 23, IMAGE_TOKEN, 40, 41, 42, 43, 44, 45]


def hf_ids(ids):
    out = []
    for i in ids:
        out += [IMAGE_TOKEN] * N_PATCHES if i == IMAGE_TOKEN else [i]
    return torch.tensor([out])


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = tiny_hf_llava()
    folder = tmp_path_factory.mktemp("llava_hf")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _ours_logits(vlm, pixel_values, ids):
    feats = vlm.vision_tower(pixel_values)
    out = vlm.model(torch.tensor([ids]), feats)
    return out["logits"]


def _hf_logits(model, pixel_values, ids):
    with torch.no_grad():
        return model(input_ids=hf_ids(ids), pixel_values=pixel_values).logits


def test_llava_hf_layout_parity(hf_folder):
    model, folder = hf_folder
    assert detect_layout(load_file(next(folder.glob("*.safetensors")))) == "llava-hf"
    vlm = load_llava(folder)
    assert vlm.model.config.image_token_id == IMAGE_TOKEN and vlm.model.num_kv_heads == 2
    assert vlm.model.config.rope_theta == 500.0
    torch.manual_seed(1)
    pixel_values = torch.randn(1, 3, 28, 28)
    ids = prompt_ids()
    with torch.no_grad():
        ours = _ours_logits(vlm, pixel_values, ids)
    ref = _hf_logits(model, pixel_values, ids)
    assert ours.shape == ref.shape == (1, len(ids) + N_PATCHES - 1, 100)
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, rel

    # Greedy generation: ours (prefill + KV cache) equals transformers' generate token for token.
    with torch.no_grad():
        x = vlm.model.build_inputs(torch.tensor([ids]), vlm.vision_tower(pixel_values))
        mine = generate(vlm.model, x, GenerationConfig(max_new_tokens=12))[0]
        theirs = model.generate(input_ids=hf_ids(ids), pixel_values=pixel_values, max_new_tokens=12, do_sample=False,
                                eos_token_id=None, pad_token_id=0, min_new_tokens=12)[0, hf_ids(ids).shape[1]:]
    assert mine == theirs.tolist()


def to_module_names(state: dict) -> dict:
    """The saved (hub) llava-hf names -> the module names of transformers >= 4.52 (model.language_model.* ...)."""
    out = {}
    for k, v in state.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        elif k == "language_model.lm_head.weight":
            k = "lm_head.weight"
        elif k.startswith(("multi_modal_projector.", "vision_tower.")):
            k = "model." + k.replace("vision_tower.vision_model.", "vision_tower.")
        out[k] = v
    return out


def to_original_layout(state: dict) -> dict:
    """llava-hf keys -> the haotian-liu layout (inverse of the loader's mapping, written independently)."""
    out = {}
    for k, v in to_module_names(state).items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.multi_modal_projector.linear_1."):
            out["model.mm_projector.0." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.multi_modal_projector.linear_2."):
            out["model.mm_projector.2." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.vision_tower."):
            out["model.vision_tower.vision_tower.vision_model." + k[len("model.vision_tower."):]] = v
        elif k == "lm_head.weight":
            out[k] = v
        else:
            raise AssertionError(k)
    out["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints carry it: ignored
    return out


def original_config(hf_cfg: dict) -> dict:
    t, v = hf_cfg["text_config"], hf_cfg["vision_config"]
    return {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": t["hidden_size"],
            "intermediate_size": t["intermediate_size"], "num_hidden_layers": t["num_hidden_layers"],
            "num_attention_heads": t["num_attention_heads"], "num_key_value_heads": t["num_key_value_heads"],
            "vocab_size": t["vocab_size"], "rms_norm_eps": t["rms_norm_eps"], "rope_theta": 500.0,
            "max_position_embeddings": 128, "mm_hidden_size": v["hidden_size"], "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
            "vision_config": {k: v[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "image_size", "patch_size", "hidden_act",
                                                "layer_norm_eps", "projection_dim")}}


def test_original_layout_conversion(hf_folder, tmp_path):
    model, folder = hf_folder
    state = to_original_layout(read_state_dict(folder))
    # Two shards and an index, as the released checkpoints come; the second shard as a torch .bin file.
    keys = sorted(state)
    half = len(keys) // 2
    save_file({k: state[k].contiguous() for k in keys[:half]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: state[k].contiguous() for k in keys[half:]}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(original_config(json.loads((folder / "config.json").read_text()))))
    layout, lm, tower = convert_state_dict(read_state_dict(tmp_path))
    assert layout == "original" and "mm_projector.0.weight" in lm and "embeddings.class_embedding" in tower
    vlm = load_llava(tmp_path)
    assert vlm.model.config.image_token_id == -200
    torch.manual_seed(2)
    pixel_values = torch.randn(1, 3, 28, 28)
    ids = prompt_ids()
    ids_orig = [-200 if i == IMAGE_TOKEN else i for i in ids]
    with torch.no_grad():
        ours = _ours_logits(vlm, pixel_values, ids_orig)
    ref = _hf_logits(model, pixel_values, ids)
    assert ((ours - ref).abs().max() / ref.abs().max()) < 1e-4


@pytest.mark.parametrize("variant", ["module_names", "hub_vision_model"])
def test_llava_hf_key_variants(hf_folder, tmp_path, variant):
    """Both llava-hf spellings load to the same model: model.language_model.* / model.vision_tower.* and the hub's
    language_model.model.* / vision_tower.vision_model.*."""
    model, folder = hf_folder
    state = read_state_dict(folder)
    if variant == "module_names":
        state = to_module_names(state)
        assert any(k.startswith("model.language_model.layers.") for k in state)
    else:
        state = {k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
                 for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    vlm = load_llava(tmp_path)
    pixel_values = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = _ours_logits(vlm, pixel_values, prompt_ids())
    ref = _hf_logits(model, pixel_values, prompt_ids())
    assert ((ours - ref).abs().max() / ref.abs().max()) < 1e-4


def test_bin_checkpoint_read_with_weights_only(hf_folder, tmp_path):
    model, folder = hf_folder
    state = read_state_dict(folder)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    vlm = load_llava(tmp_path)
    torch.testing.assert_close(vlm.model.mm_projector[0].weight,
                               state["multi_modal_projector.linear_1.weight"], rtol=0, atol=0)


def test_bad_checkpoints_are_refused(hf_folder, tmp_path):
    model, folder = hf_folder
    state = read_state_dict(folder)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    missing = {k: v for k, v in to_module_names(state).items() if "layers.1.mlp.up_proj" not in k}
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.mlp.up_proj.weight'\]"):
        load_llava(tmp_path)
    extra = dict(to_module_names(state), **{"model.language_model.layers.0.extra.weight": torch.zeros(2)})
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.0.extra.weight'\]"):
        load_llava(tmp_path)
    stray = dict(state, **{"something_else.weight": torch.zeros(2)})
    save_file(stray, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected keys"):
        load_llava(tmp_path)
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a LLaVA checkpoint"):
        load_llava(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llava(tmp_path / "nowhere")
