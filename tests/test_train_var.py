"""scripts/train_var.py's folder options: a run saved with --reference-tokenizer references the tokenizer folder
(shipped class and text models share one), and --init-from starts a run from a saved pipeline's weights."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import train_var  # noqa: E402
from vlm.var import VAR_CONFIGS  # noqa: E402
from vlm.var_pipeline import VARPipeline  # noqa: E402
from vlm.vqvae import MultiScaleVQVAE  # noqa: E402


@pytest.fixture
def tokenizer(tmp_path, monkeypatch):
    # VAR-tiny with the shapes world's 48 classes, on the tiny tokenizer it matches
    monkeypatch.setitem(VAR_CONFIGS, "VAR-tiny48", {**VAR_CONFIGS["VAR-tiny"], "num_classes": 48})
    torch.manual_seed(0)
    MultiScaleVQVAE.from_name("vqvae-tiny").save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def run(tmp_path, name, tokenizer, *extra):
    args = train_var.parse_args(["--out", str(tmp_path / name), "--model", "VAR-tiny48", "--tokenizer",
                                 str(tokenizer), "--steps", "2", "--batch-size", "4", "--cpu", "--eval-n", "2",
                                 "--eval-every", "1000", "--ckpt-every", "1000", *extra])
    train_var.main(args)


def test_reference_tokenizer_and_init_from(tmp_path, tokenizer):
    first = tmp_path / "first"
    run(tmp_path, "a", tokenizer, "--save-to", str(first), "--reference-tokenizer")
    assert not (first / "tokenizer").exists()
    import json
    names = json.loads((first / "model_index.json").read_text())["id2label"]  # generate --label "red star"
    assert len(names) == 48 and names["0"] == "red circle"
    pipe = VARPipeline.from_pretrained(first)
    tok = MultiScaleVQVAE.from_pretrained(tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(pipe.vqvae.state_dict().values(), tok.state_dict().values()))

    # lr 0: the second run's saved weights are the first run's (fp16 round trip), not a fresh initialisation
    run(tmp_path, "b", tokenizer, "--init-from", str(first), "--lr", "0")
    again = VARPipeline.from_pretrained(tmp_path / "b" / "model").transformer.state_dict()
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(again[k], v), k
    torch.manual_seed(123)  # sanity: a fresh initialisation differs from the saved weights
    fresh = train_var.VAR.from_name("VAR-tiny48").state_dict()
    assert any(not torch.equal(fresh[k].half().float(), v.float()) for k, v in again.items())


def test_init_from_a_different_size_is_refused(tmp_path, tokenizer):
    first = tmp_path / "first"
    run(tmp_path, "a", tokenizer, "--save-to", str(first))
    monkey = {**VAR_CONFIGS["VAR-tiny48"], "depth": 3}
    VAR_CONFIGS["VAR-tiny48-d3"] = monkey
    try:
        with pytest.raises(ValueError, match="config differs"):
            train_var.main(train_var.parse_args(["--out", str(tmp_path / "c"), "--model", "VAR-tiny48-d3",
                                                 "--tokenizer", str(tokenizer), "--steps", "1", "--cpu",
                                                 "--init-from", str(first)]))
    finally:
        del VAR_CONFIGS["VAR-tiny48-d3"]
