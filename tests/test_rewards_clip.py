"""CLIP-based rewards (pickscore, clipscore, aesthetic) with a tiny random CLIP saved locally.

The references compute the scores the way the reference implementation does, through
CLIPModel's own forward (logits_per_image) and a torch MLP with the LAION predictor's layout.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tokenizers import pre_tokenizers  # noqa: E402

from flowgrpo_jax.rewards import registry  # noqa: E402
from flowgrpo_jax.rewards.client import RewardClient  # noqa: E402

PROMPTS = ["a red cube on a table", "two cats", "a photo of a dog at night"]


def tiny_byte_level_vocab():
    """Every byte-level character, alone and word-final, plus CLIP's two special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    vocab = tiny_byte_level_vocab()
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                      crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    special = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                   pad_token_id=vocab["<|endoftext|>"])
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, **special),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=768)  # the aesthetic MLP takes CLIP-L's 768-d embeddings
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    return folder


class AestheticMLP(torch.nn.Module):
    """The LAION improved-aesthetic-predictor layout (dropout is inactive in eval)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    torch.manual_seed(1)
    mlp = AestheticMLP().eval()
    path = tmp_path_factory.mktemp("aesthetic") / "mlp.pth"
    torch.save(mlp.state_dict(), path)
    return path, mlp


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 48, 40, 3), dtype=np.uint8)


def reference_logits(clip_dir, images, padding):
    processor = transformers.CLIPProcessor.from_pretrained(clip_dir)
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    inputs = processor(text=PROMPTS, images=list(images), padding=padding, truncation=True,
                       max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image.diagonal().numpy(), out.image_embeds


def test_pickscore_and_clipscore_match_clip_forward(clip_dir, images):
    logits, _ = reference_logits(clip_dir, images, padding=True)
    padded_logits, _ = reference_logits(clip_dir, images, padding="max_length")
    pick = registry.build("pickscore", model=str(clip_dir))(images, PROMPTS, [{}] * 3)["score"]
    clip = registry.build("clipscore", model=str(clip_dir))(images, PROMPTS, [{}] * 3)["score"]
    np.testing.assert_allclose(pick, logits / 26, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(clip, padded_logits / 30, rtol=1e-5, atol=1e-6)
    assert np.ptp(pick) > 1e-4  # the scores do depend on image and prompt


def test_aesthetic_matches_torch_mlp_on_clip_embeddings(clip_dir, mlp_file, images):
    path, mlp = mlp_file
    _, image_embeds = reference_logits(clip_dir, images, padding=True)  # L2-normalised
    with torch.no_grad():
        expected = mlp(image_embeds)[:, 0].numpy()
    got = registry.build("aesthetic", mlp=str(path), model=str(clip_dir))(images, PROMPTS, [{}] * 3)["score"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_missing_models_get_errors_that_say_where_to_point(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWGRPO_AESTHETIC_MLP", raising=False)
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="pickscore.*no_such_model.*FLOWGRPO_PICKSCORE_MODEL"):
        registry.build("pickscore", model=missing)
    with pytest.raises(FileNotFoundError, match="aesthetic.mlp=.*FLOWGRPO_AESTHETIC_MLP"):
        registry.build("aesthetic")
    with pytest.raises(FileNotFoundError, match="MLP weights .* do not exist"):
        registry.build("aesthetic", mlp=missing)


def test_clip_rewards_through_a_server_process(clip_dir, mlp_file, images, monkeypatch):
    monkeypatch.setenv("FLOWGRPO_CLIPSCORE_MODEL", str(clip_dir))  # the env-var route
    options = {"pickscore": {"model": clip_dir}, "aesthetic": {"mlp": mlp_file[0], "model": clip_dir}}
    with RewardClient("pickscore:1.0,clipscore:0.5,aesthetic:0.1", options=options) as client:
        result = client.score(images, PROMPTS)
    pick = registry.build("pickscore", model=str(clip_dir))(images, PROMPTS, [{}] * 3)["score"]
    np.testing.assert_allclose(result.components["pickscore"], pick, rtol=1e-5)
    expected_total = sum(w * result.components[n] for n, w in
                         {"pickscore": 1.0, "clipscore": 0.5, "aesthetic": 0.1}.items())
    np.testing.assert_allclose(result.total, expected_total, rtol=1e-12)
