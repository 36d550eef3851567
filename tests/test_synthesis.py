"""FMAS (synthesis/): unit tests and an end-to-end run on tiny local models, CPU, 64x64 images."""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import pywt
import scipy.ndimage
import synthesis_fixtures as sf
from fake_llm import completion, send, serve
from PIL import Image

from configs import fmas_mvtec, fmas_visa
from synthesis import inpainting, masks, pipeline, prompts, selector, subband, worker, writer
from wdam_jax.data.tf_setup import import_tensorflow

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: loading uses local_files_only

PER_CATEGORY = 2


def parse(raw: bytes) -> dict:
    """Decodes one record with plain ``tf.io.parse_single_example`` (schema: docs/design.md): the
    reference reader of what the TF-free writer wrote."""
    tf = import_tensorflow()
    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "mask/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/source": tf.io.FixedLenFeature([], tf.string),
        "image/category": tf.io.FixedLenFeature([], tf.string),
        "fmas/prompt": tf.io.FixedLenFeature([], tf.string),
        "fmas/negative_prompt": tf.io.FixedLenFeature([], tf.string),
        "fmas/prompt_source": tf.io.FixedLenFeature([], tf.string),
        "fmas/seed": tf.io.FixedLenFeature([], tf.int64),
        "fmas/cfg": tf.io.FixedLenFeature([], tf.float32),
        "fmas/strength": tf.io.FixedLenFeature([], tf.float32),
        "fmas/lpips": tf.io.FixedLenFeature([], tf.float32),
        "fmas/tau": tf.io.FixedLenFeature([], tf.float32),
    }
    ex = tf.io.parse_single_example(raw, spec)
    out = {k: v.numpy() for k, v in ex.items()}
    out["image"] = tf.io.decode_png(ex["image/encoded"]).numpy()
    out["mask"] = tf.io.decode_png(ex["mask/encoded"]).numpy()
    for k in ("image/source", "image/category", "fmas/prompt", "fmas/negative_prompt",
              "fmas/prompt_source"):  # fmt: skip
        out[k] = out[k].decode()
    return out


def read_records(output_dir: Path) -> list[dict]:
    tf = import_tensorflow()
    files = [str(p) for p in writer.record_files(output_dir)]
    return [parse(r.numpy()) for r in tf.data.TFRecordDataset(files)] if files else []


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Test images (MVTec layout) and tiny models, built once for the module."""
    tmp = tmp_path_factory.mktemp("fmas")
    data = tmp / "data"
    sources = sf.make_mvtec_images(data, per_category=PER_CATEGORY, size=64, seed=0)
    return {"tmp": tmp, "data": data, "sources": sources, "models": sf.make_models(tmp / "models")}


@pytest.fixture(scope="module")
def e2e(env):
    """One full run; records the candidates' LPIPS distances the pipeline computed."""
    config = sf.make_config(env["tmp"], data_root=env["data"], models=env["models"], output="e2e")
    seen: list[np.ndarray] = []
    real = selector.lpips_distances

    def spy(model, reference, candidates):
        d = real(model, reference, candidates)
        seen.append(d)
        return d

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selector, "lpips_distances", spy)
        manifest = pipeline.run_fmas(config)
    records = read_records(Path(config.output_dir))
    return {"config": config, "manifest": manifest, "records": records, "distances": seen}


def by_source(records: list[dict]) -> dict[str, dict]:
    return {r["image/source"]: r for r in records}


# --- unit tests --------------------------------------------------------------------------------


def test_select_closest_known_distances():
    d = np.array([0.05, 0.2, 0.12, 0.3])
    assert selector.select_closest(d, 0.13) == 2
    assert selector.select_closest(d, 0.0) == 0
    assert selector.select_closest(d, 1.0) == 3
    assert selector.select_closest(d, 0.17) == 1  # |0.2 - 0.17| < |0.12 - 0.17|
    assert selector.select_closest(np.array([0.25, 0.75]), 0.5) == 0  # exact tie: first wins
    with pytest.raises(ValueError):
        selector.select_closest(np.array([]), 0.1)


def test_rect_mask_eq2_area_aspect_and_intersection():
    yy, xx = np.mgrid[:96, :128]
    fg = (yy - 40) ** 2 + (xx - 70) ** 2 < 30**2
    for seed in range(50):
        rng = np.random.default_rng(seed)
        rect = masks.rect_mask(fg, alpha=0.1, aspect_ratio_range=(0.5, 2.0), rng=rng)
        ys, xs = np.nonzero(rect)
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert rect.sum() == h * w  # one axis-aligned rectangle inside the image
        assert abs(h * w - 0.1 * fg.sum()) <= h + w  # eq. 2 up to whole-pixel rounding
        assert 0.5 - 1.0 / h <= w / h <= 2.0 + 2.0 / h
        m = masks.anomaly_mask(
            fg, alpha=0.1, aspect_ratio_range=(0.5, 2.0), rng=np.random.default_rng(seed)
        )
        np.testing.assert_array_equal(m, fg & rect)  # eq. 1, same draws
        assert m.any()


def test_rect_mask_at_image_corner_stays_inside():
    fg = np.zeros((32, 32), bool)
    fg[0, 0] = True
    fg[31, 31] = True
    fg[:, 5] = True
    for seed in range(20):
        m = masks.anomaly_mask(
            fg, alpha=0.5, aspect_ratio_range=(0.2, 5.0), rng=np.random.default_rng(seed)
        )
        assert m.any() and not (m & ~fg).any()


def test_fg_cache_layout(tmp_path):
    path = masks.fg_cache_path(tmp_path, "bottle", "train/good/000.jpg")
    assert path == tmp_path / "bottle" / "train" / "good" / "000.png"
    fg = np.zeros((5, 7), bool)
    fg[1:3, 2:6] = True
    masks.write_mask_atomic(path, fg)
    with Image.open(path) as im:
        assert im.mode == "L" and set(np.unique(np.asarray(im))) == {0, 255}
    np.testing.assert_array_equal(masks.read_mask(path), fg)


def test_parse_llm_answer_forms():
    as_json = 'Sure!\n```json\n{"prompt": "a crack, dent", "negative_prompt": "blurry"}\n```'
    assert prompts.parse_llm_answer(as_json) == ("a crack, dent", "blurry")
    labelled = "Here you go.\n**Prompt:** rust stain, scratch\n**Negative prompt:** clean, cartoon"
    assert prompts.parse_llm_answer(labelled) == ("rust stain, scratch", "clean, cartoon")
    with pytest.raises(ValueError):
        prompts.parse_llm_answer("no idea")


# The test-set defect types: MVTec AD's test/<defect> folder names, and VisA's defect labels
# (image_anno.csv; the 1cls layout folds them into test/bad). No offline prompt of a category
# may name one of its own.
TEST_DEFECTS = {
    "bottle": "broken_large broken_small contamination",
    "cable": "bent_wire cable_swap combined cut_inner_insulation cut_outer_insulation "
    "missing_cable missing_wire poke_insulation",
    "capsule": "crack faulty_imprint poke scratch squeeze",
    "carpet": "color cut hole metal_contamination thread",
    "grid": "bent broken glue metal_contamination thread",
    "hazelnut": "crack cut hole print",
    "leather": "color cut fold glue poke",
    "metal_nut": "bent color flip scratch",
    "pill": "color combined contamination crack faulty_imprint pill_type scratch",
    "screw": "manipulated_front scratch_head scratch_neck thread_side thread_top",
    "tile": "crack glue_strip gray_stroke oil rough",
    "toothbrush": "defective",
    "transistor": "bent_lead cut_lead damaged_case misplaced",
    "wood": "color combined hole liquid scratch",
    "zipper": "broken_teeth combined fabric_border fabric_interior rough split_teeth "
    "squeezed_teeth",
    "candle": "chunk_of_wax_missing foreign_particals_on_candle different_colour_spot "
    "damaged_corner_of_packaging weird_candle_wick other extra_wax_in_candle "
    "wax_melded_out_of_the_candle",
    "capsules": "bubble discolor scratch leak misshape",
    "cashew": "burnt corner_or_edge_breakage different_colour_spot middle_breakage small_holes "
    "same_colour_spot small_scratches stuck_together",
    "chewinggum": "chunk_of_gum_missing scratches small_cracks corner_missing similar_colour_spot",
    "fryum": "burnt similar_colour_spot corner_or_edge_breakage middle_breakage small_scratches "
    "different_colour_spot fryum_stuck_together other",
    "macaroni1": "chip_around_edge_and_corner small_scratches small_cracks different_colour_spot "
    "middle_breakage similar_colour_spot",
    "macaroni2": "breakage_down_the_middle small_scratches color_spot_similar_to_the_object "
    "different_color_spot small_chip_around_edge small_cracks other",
    "pcb1": "bent melt scratch missing",
    "pcb2": "bent melt scratch missing",
    "pcb3": "bent melt scratch missing",
    "pcb4": "burnt scratch dirt damage extra missing wrong_place",
    "pipe_fryum": "burnt corner_and_edge_breakage different_colour_spot middle_breakage "
    "small_scratches small_cracks similar_colour_spot stuck_together",
}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower().replace("colour", "color"))


def _names(prompt: str, defect: str) -> bool:
    """Whether ``prompt`` names ``defect``: its words in a row, each as a word's start (so
    "scratches" names "scratch" and "cracked" names "crack"; plurals of the defect are cut)."""
    stems = [re.sub(r"(?<=..)(es|s)$", "", w) for w in _words(defect.replace("_", " "))]
    words = _words(prompt)
    return any(
        all(words[i + j].startswith(stem) for j, stem in enumerate(stems))
        for i in range(len(words) - len(stems) + 1)
    )


def test_offline_prompts_never_name_the_categorys_test_defects():
    assert set(TEST_DEFECTS) == set(fmas_mvtec.MVTEC_CATEGORIES + fmas_visa.VISA_CATEGORIES)
    assert _names("a deep scratches and cracked rim", "scratch") and _names("x crack", "cracks")
    assert _names("with different colour spots", "different_color_spot")
    assert not _names("a different spot", "different_color_spot")
    for category, defects in TEST_DEFECTS.items():
        pair = prompts.library_prompts(category)
        assert pair.source.startswith("library:") and pair.source != "library:generic", category
        for text in (pair.prompt, pair.negative_prompt):
            named = [d for d in defects.split() if _names(text, d)]
            assert not named, f"{category}: offline prompt {text!r} names test defects {named}"
    pair = prompts.library_prompts("coffee_cup")  # unknown classes: the generic vocabulary
    assert "coffee cup" in pair.prompt and pair.source == "library:generic"


def test_llm_prompts_are_asked_once_cached_and_key_never_logged(tmp_path, monkeypatch, caplog):
    key = "sk-test-SECRET-1234"
    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append((self.path, self.headers.get("Authorization"), body))
            answer = {"prompt": "deep scratch, crack", "negative_prompt": "blurry, clean"}
            payload = {"choices": [{"message": {"content": json.dumps(answer)}}]}
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("FMAS_TEST_KEY", key)
        kwargs = dict(
            llm_base_url=f"http://127.0.0.1:{server.server_port}/v1",
            llm_model="test-model",
            api_key_env="FMAS_TEST_KEY",
            cache_dir=tmp_path,
            timeout_s=10.0,
        )
        with caplog.at_level(logging.DEBUG):
            first = prompts.get_prompts("metal_nut", **kwargs)
            second = prompts.get_prompts("metal_nut", **kwargs)
    finally:
        server.shutdown()
    assert (first.prompt, first.negative_prompt) == ("deep scratch, crack", "blurry, clean")
    assert first.source == "llm" and second.source == "llm-cache"
    assert len(calls) == 1
    path, auth, body = calls[0]
    assert path == "/v1/chat/completions" and auth == f"Bearer {key}"
    assert body["model"] == "test-model"
    assert prompts.PAPER_QUESTION.format(label="metal nut") in body["messages"][0]["content"]
    cached = (tmp_path / "metal_nut.json").read_text()
    assert key not in cached and key not in caplog.text
    monkeypatch.delenv("FMAS_TEST_KEY")
    with pytest.raises(RuntimeError, match="FMAS_TEST_KEY"):
        prompts.get_prompts("screw", **kwargs)


def test_prompts_are_fetched_before_the_models_load(env, tmp_path, monkeypatch):
    loaded = []

    def load(*args, **kwargs):
        loaded.append(args)
        raise AssertionError("a model was loaded before the prompts were fetched")

    monkeypatch.setattr(selector, "load_lpips", load)
    monkeypatch.setattr(inpainting, "load_inpaint_pipeline", load)
    monkeypatch.setenv("FMAS_TEST_KEY", "sk-test-wrong")
    config = sf.make_config(tmp_path, data_root=env["data"], models=env["models"], output="out")
    with serve(lambda h: send(h, 401, b'{"error": "invalid key"}')) as (base_url, seen):
        config.prompts.llm_base_url = base_url
        config.prompts.api_key_env = "FMAS_TEST_KEY"
        with pytest.raises(RuntimeError, match="HTTP 401 after 1 attempt"):
            pipeline.run_fmas(config)
    assert len(seen) == 1 and loaded == []
    assert not writer.record_files(tmp_path / "out")


def test_fmas_run_with_an_llm_writes_the_key_nowhere(env, tmp_path, monkeypatch, caplog, capfd):
    key = "sk-test-SECRET-5a6b7c"
    answer = {"prompt": "deep scratch on tile", "negative_prompt": "blurry, clean tile"}
    monkeypatch.setenv("FMAS_TEST_KEY", key)
    config = sf.make_config(tmp_path, data_root=env["data"], models=env["models"], output="out")
    config.data.categories = (sf.TEXTURE,)  # whole-image foreground: no SAM
    config.data.limit_per_category = 1
    with serve(lambda h: send(h, 200, completion(json.dumps(answer)))) as (base_url, seen):
        config.prompts.llm_base_url = base_url
        config.prompts.api_key_env = "FMAS_TEST_KEY"
        with caplog.at_level(logging.DEBUG):
            manifest = pipeline.run_fmas(config)
    assert [r["authorization"] for r in seen] == [f"Bearer {key}"]  # the key was really used
    assert manifest["prompts"][sf.TEXTURE]["source"] == "llm"
    [record] = read_records(Path(config.output_dir))
    assert record["fmas/prompt"] == answer["prompt"]
    files = [p for p in Path(config.output_dir).rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert f"{sf.TEXTURE}.json" in names and any(n.startswith("manifest-") for n in names)
    for path in files:
        assert key.encode() not in path.read_bytes(), path
    out, err = capfd.readouterr()
    assert key not in caplog.text and key not in out + err
    assert key not in json.dumps(manifest, default=str) and key not in str(config)


def test_missing_model_errors_say_what_to_download(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="save_pretrained") as err:
        inpainting.load_inpaint_pipeline(tmp_path / "sd", device="cpu", half_precision=False)
    assert "inpaint.model_dir" in str(err.value) and str(tmp_path / "sd") in str(err.value)
    with pytest.raises(FileNotFoundError, match=re.escape("sam_vit_h_4b8939.pth")) as err:
        masks.load_sam_predictor(tmp_path / "sam.pth", model_type="vit_h", device="cpu")
    assert "sam.checkpoint" in str(err.value)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError, match=re.escape("alexnet-owt-7be5be79.pth")) as err:
        selector.load_lpips(net="alex", backbone_weights="torch_hub", device="cpu", seed=0)
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in str(err.value)


def test_run_fmas_missing_sd_folder_fails_before_writing(env, tmp_path):
    models = dict(env["models"], sd=tmp_path / "nowhere")
    config = sf.make_config(tmp_path, data_root=env["data"], models=models, output="out")
    with pytest.raises(FileNotFoundError, match="Stable Diffusion inpainting model not found"):
        pipeline.run_fmas(config)
    assert writer.record_files(config.output_dir) == []


def test_lpips_reads_local_backbone_weights(tmp_path):
    import torch

    # torchvision's AlexNet state_dict names (conv layers of `features`); the classifier is
    # present in the real file and ignored by LPIPS.
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3)}
    shapes |= {8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    gen = torch.Generator().manual_seed(1)
    state = {"classifier.1.bias": torch.zeros(3)}
    for i, shape in shapes.items():
        state[f"features.{i}.weight"] = torch.randn(shape, generator=gen)
        state[f"features.{i}.bias"] = torch.randn(shape[0], generator=gen)
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    model = selector.load_lpips(net="alex", backbone_weights=str(path), device="cpu", seed=0)
    own = model.net.state_dict()
    assert len(own) == 10
    torch.testing.assert_close(own["slice1.0.weight"], state["features.0.weight"])
    torch.testing.assert_close(own["slice5.10.bias"], state["features.10.bias"])


def test_long_prompts_are_encoded_in_chunks_not_truncated(env):
    """A prompt past CLIP's 77 tokens (the tiny tokenizer: one token per character) is encoded
    whole, in 77-token chunks; a short one exactly as diffusers encodes it; and words past the
    77th token change the inpainting (truncated, they did not: "missing piece" was dropped)."""
    import torch

    pipe = inpainting.load_inpaint_pipeline(env["models"]["sd"], device="cpu", half_precision=False)
    tok = pipe.tokenizer
    head = "close-up photo of the part with a realistic surface defect, dent, chip, smudge, "
    long_a, long_b = head + "contamination, missing piece", head + "contamination, torn label"
    ids = tok(long_a, add_special_tokens=False).input_ids
    assert len(ids) > 77
    chunks = inpainting.prompt_chunks(tok, long_a)
    assert len(chunks) == 2 and all(len(c) == 77 and c[0] == tok.bos_token_id for c in chunks)
    content = [c[1 : c.index(tok.eos_token_id, 1)] for c in chunks]
    assert content[0] + content[1] == ids  # nothing dropped
    comma = tok.convert_tokens_to_ids(",</w>")
    assert content[0][-1] == comma and len(content[0]) < 75  # ended at a comma, as the WebUI
    truncated = [tok(t, truncation=True, max_length=77).input_ids for t in (long_a, long_b)]
    assert truncated[0] == truncated[1]  # the difference is past the 77th token
    # Short prompts: the same embeddings as diffusers' own encoding.
    ours = inpainting.encode_prompts(pipe, "a dent", "blurry")
    theirs = pipe.encode_prompt("a dent", "cpu", 1, True, "blurry")
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    embeds, negative = inpainting.encode_prompts(pipe, long_a, "blurry")
    assert embeds.shape[1] == negative.shape[1] == 2 * 77
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    outs = [
        inpainting.inpaint_candidates(
            pipe,
            image,
            mask,
            prompt=p,
            negative_prompt="blurry",
            seeds=[0],
            cfg=7.0,
            strength=0.8,
            steps=2,
            resolution=32,
        )
        for p in (long_a, long_b)
    ]
    assert (outs[0][0][mask] != outs[1][0][mask]).any()


def test_composite_keeps_outside_pixels():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (3, 8, 9, 3), dtype=np.uint8)
    mask = rng.random((8, 9)) < 0.3
    out = inpainting.composite(original, generated, mask)
    assert (out[:, ~mask] == original[~mask]).all() and (out[:, mask] == generated[:, mask]).all()
    assert inpainting.processing_size(900, 1200, resolution=512) == (384, 512)


def test_split_work_is_a_disjoint_cover(env):
    items = pipeline.list_work(
        env["data"], categories=(), pattern="train/good/*", limit_per_category=0
    )
    assert [it.source for it in items] == sorted(env["sources"])
    for n in (1, 2, 3, 5):
        parts = [writer.split_work(items, shard_index=i, num_shards=n) for i in range(n)]
        flat = [it for part in parts for it in part]
        assert sorted(flat, key=lambda it: it.source) == items and len(set(flat)) == len(items)
    with pytest.raises(ValueError, match="shard_index"):
        writer.split_work(items, shard_index=2, num_shards=2)


def test_writer_kill_loses_only_unflushed_records(tmp_path):
    rec = sf.tiny_record
    w = writer.ShardedRecordWriter(tmp_path, shard_index=0, num_shards=1, records_per_file=2)
    for s in ("a", "b", "c"):
        w.add(rec(s))
    del w  # "killed": "c" was only buffered
    (tmp_path / "fmas-00000-of-00001-00001.tfrecord.tmp").write_bytes(b"half a file")
    assert sorted(writer.completed_sources(tmp_path)) == ["a", "b"]
    with writer.ShardedRecordWriter(
        tmp_path, shard_index=0, num_shards=1, records_per_file=2
    ) as w2:
        w2.add(rec("c"))
    assert not list(tmp_path.glob("*.tmp"))
    assert sorted(writer.completed_sources(tmp_path)) == ["a", "b", "c"]


def test_subband_change_analytic_and_against_pywt():
    rng = np.random.default_rng(0)
    normal = rng.random((16, 16, 3))
    # A constant offset only moves LL (by 2c for orthonormal Haar): row (1, 0, 0, 0).
    rows, _ = subband.class_table([("flat", normal, normal + 0.1)])
    np.testing.assert_allclose(rows["flat"], [1, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(subband.subband_change(normal, normal + 0.1)[0], 0.2)
    # A checkerboard only moves the diagonal band HH.
    checker = 0.05 * (-1.0) ** np.add.outer(np.arange(16), np.arange(16))[..., None]
    rows, _ = subband.class_table([("checker", normal, normal + checker)])
    np.testing.assert_allclose(rows["checker"], [0, 0, 0, 1], atol=1e-12)
    # A random local change, against pywt directly; two pairs averaged before normalising.
    a = normal.copy()
    a[3:9, 4:12] = rng.random((6, 8, 3))
    b = normal.copy()
    b[10:14, 1:5] = 0.0
    expected = []
    for synth in (a, b):
        cn = pywt.dwt2(normal, "haar", axes=(0, 1))
        cs = pywt.dwt2(synth, "haar", axes=(0, 1))
        bands_n = [cn[0], *cn[1]]
        bands_s = [cs[0], *cs[1]]
        expected.append([np.abs(s - n).mean() for n, s in zip(bands_n, bands_s, strict=True)])
    mean = np.mean(expected, axis=0)
    rows, counts = subband.class_table([("x", normal, a), ("x", normal, b)])
    np.testing.assert_allclose(rows["x"], mean / mean.sum(), rtol=1e-12)
    assert counts == {"x": 2} and abs(rows["x"].sum() - 1) < 1e-12
    assert "| LL |" in subband.markdown_table(rows)


def _objects_image(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Four bright discs near the corners of a dark image (nothing at the centre), and their
    union as bool ``[H, W]``."""
    yy, xx = np.mgrid[:size, :size]
    objects = np.zeros((size, size), bool)
    for cy, cx in ((16, 16), (16, 48), (48, 16), (48, 48)):
        objects |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 7**2
    image = np.where(objects[..., None], 220, 30).astype(np.uint8).repeat(3, axis=-1)
    return image, objects


class _ComponentOracle:
    """A predictor as SAM at its best: a point's mask is the connected region under it."""

    def set_image(self, image):
        self.labels, _ = scipy.ndimage.label(image[..., 0] > 127)
        self.labels[self.labels == 0] = self.labels.max() + 1  # the background is one region

    def predict(self, *, point_coords, point_labels, multimask_output):
        x, y = point_coords[0]
        mask = self.labels == self.labels[int(y), int(x)]
        return mask[None], np.array([0.95]), None


def test_point_grid_segments_every_object_where_a_centre_point_misses():
    image, objects = _objects_image()
    oracle = _ComponentOracle()
    centre, _ = masks.sam_foreground(oracle, image, prompt="center_point", min_fraction=0.01)
    assert not (centre & objects).any()  # the centre point lands between the objects
    grid, fell_back = masks.sam_foreground(oracle, image, prompt="point_grid", min_fraction=0.01)
    assert not fell_back
    np.testing.assert_array_equal(grid, objects)  # every object, the background left out
    sparse = masks.PointGrid(points_per_side=2)  # points at the disc centres only
    np.testing.assert_array_equal(masks.point_grid_union(oracle, image, sparse), objects)
    assert masks.grid_points(64, 64, 2).tolist() == [[16, 16], [48, 16], [16, 48], [48, 48]]


def test_point_grid_with_the_tiny_sam_and_per_category_selection(tmp_path):
    """The real SamPredictor path (tiny random SAM): the grid mask is the union of the kept
    per-point masks, and the provider uses the grid for the configured multi-object classes."""
    import torch
    from segment_anything import SamPredictor

    image, _ = _objects_image()
    torch.manual_seed(0)
    predictor = SamPredictor(masks.build_tiny_sam().eval())
    grid = masks.PointGrid(points_per_side=3, min_score=-1e9, max_fraction=1.0)
    with torch.inference_mode():
        predictor.set_image(image)
        expected = np.zeros(image.shape[:2], bool)
        for x, y in masks.grid_points(64, 64, 3):
            out, scores, _ = predictor.predict(
                point_coords=np.array([[x, y]]), point_labels=np.array([1]), multimask_output=True
            )
            best = out[int(np.argmax(scores))]
            expected |= best if best[int(y), int(x)] else False
    got, _ = masks.sam_foreground(
        predictor, image, prompt="point_grid", min_fraction=0.0, grid=grid
    )
    np.testing.assert_array_equal(got, expected)
    centre, _ = masks.sam_foreground(predictor, image, prompt="center_point", min_fraction=0.0)
    checkpoint = tmp_path / "sam.pth"
    torch.save(predictor.model.state_dict(), checkpoint)
    provider = masks.ForegroundProvider(
        tmp_path / "fg",
        texture_categories=(),
        sam_checkpoint=str(checkpoint),
        sam_model_type="tiny",
        sam_prompt="center_point",
        min_fraction=0.0,
        device="cpu",
        multi_object_categories=("candle",),
        grid=grid,
    )
    np.testing.assert_array_equal(provider(image, category="candle", rel_to_category="a.png"), got)
    np.testing.assert_array_equal(
        provider(image, category="cashew", rel_to_category="a.png"), centre
    )
    with pytest.raises(ValueError, match="point_grid"):
        masks.sam_foreground(predictor, image, prompt="grid", min_fraction=0.0)


def test_visa_config_selects_the_point_grid_for_multi_object_classes():
    multi = set(fmas_visa.get_config().sam.multi_object_categories)
    assert {"candle", "capsules", "macaroni1", "macaroni2", "pcb4"} == multi
    assert multi <= set(fmas_visa.VISA_CATEGORIES)
    assert not fmas_mvtec.get_config().sam.multi_object_categories


def test_configs_build():
    for module in (fmas_mvtec, fmas_visa):
        for arg in (None, "demo"):
            config = module.get_config(arg)
            assert config.inpaint.steps == 20 and config.inpaint.num_candidates == 5
            assert tuple(config.inpaint.cfg_range) == (5.0, 10.0)
            assert tuple(config.inpaint.strength_range) == (0.5, 0.85)
            assert config.masks.alpha == 0.1
    assert fmas_mvtec.get_config("demo").data.root == "workdirs/demo_data/mvtec_demo"
    with pytest.raises(ValueError):
        fmas_mvtec.get_config("nope")


# --- end to end ----------------------------------------------------------------------------------


def test_end_to_end_records(env, e2e):
    config, records = e2e["config"], e2e["records"]
    assert sorted(r["image/source"] for r in records) == sorted(env["sources"])
    counts = e2e["manifest"]["counts"]
    assert counts["written_this_run"] == len(env["sources"]) and counts["already_done"] == 0
    on_disk = json.loads((Path(config.output_dir) / "manifest-00000-of-00001.json").read_text())
    assert on_disk["counts"] == counts and on_disk["models"]["sam"]["used"]
    assert on_disk["models"]["lpips"]["backbone"] == "random"
    fg_root = Path(config.masks.fg_root)
    for r in records:
        source = r["image/source"]
        category, rel = source.split("/", 1)
        assert r["image/category"] == category
        original = np.asarray(Image.open(env["data"] / source).convert("RGB"))
        image, mask = r["image"], r["mask"]
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert mask.shape == (64, 64, 1) and set(np.unique(mask)) <= {0, 255}
        m = mask[..., 0] == 255
        fg = masks.read_mask(fg_root / category / rel)
        assert m.any() and not (m & ~fg).any()  # M inside the foreground (eq. 1)
        if category == sf.TEXTURE:
            assert fg.all()
            assert abs(m.sum() - 0.1 * 64 * 64) <= 64  # eq. 2: area alpha |M_fg|
        assert (image[~m] == original[~m]).all()  # composited: outside M is the original
        assert (image[m] != original[m]).any()
        assert 5.0 <= r["fmas/cfg"] <= 10.0 and 0.5 <= r["fmas/strength"] <= 0.85
        assert r["fmas/tau"] == pytest.approx(config.selector.tau)
        assert r["fmas/prompt"] == prompts.library_prompts(category).prompt
        assert r["fmas/prompt_source"] == prompts.library_prompts(category).source
        assert r["fmas/seed"].dtype == np.int64
    # Foreground cache written for every image (textures too: what CutPaste +FM reads).
    for s in env["sources"]:
        assert (fg_root / Path(s).with_suffix(".png")).is_file()


def test_manifest_summarises_every_candidates_lpips_distance(e2e):
    """The manifest's eq. 3 distances are those the selector saw, all K per image (to set tau)."""
    summary = e2e["manifest"]["lpips"]
    seen = np.concatenate(e2e["distances"])
    assert summary["tau"] == e2e["config"].selector.tau
    got = summary["candidates_this_run"]
    assert got["n"] == len(e2e["records"]) * e2e["config"].inpaint.num_candidates == seen.size
    expected = np.quantile(seen.astype(np.float64), selector.QUANTILES)
    np.testing.assert_allclose(list(got["quantiles"].values()), expected, rtol=1e-6)
    assert got["mean"] == pytest.approx(seen.mean(), rel=1e-6)
    assert got["below_tau"] == pytest.approx(np.mean(seen < e2e["config"].selector.tau))
    kept = np.array([r["fmas/lpips"] for r in e2e["records"]], np.float64)
    chosen = summary["selected_this_run"]
    assert chosen["n"] == len(e2e["records"])
    np.testing.assert_allclose(chosen["mean"], kept.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        list(chosen["quantiles"].values()), np.quantile(kept, selector.QUANTILES), rtol=1e-5
    )
    assert selector.distance_summary([], 0.13) == {"n": 0}


def test_end_to_end_selector_keeps_candidate_closest_to_tau(e2e):
    config, records = e2e["config"], e2e["records"]
    tau = config.selector.tau
    assert len(e2e["distances"]) == len(records)
    # Records are written in processing order (one shard, sorted sources).
    ordered = sorted(records, key=lambda r: r["image/source"])
    lpips_model = selector.load_lpips(
        net="alex", backbone_weights="random", device="cpu", seed=config.seed
    )
    for r, d in zip(ordered, e2e["distances"], strict=True):
        assert d.shape == (config.inpaint.num_candidates,)
        best = d[np.argmin(np.abs(d - tau))]
        assert r["fmas/lpips"] == pytest.approx(best, rel=1e-5)
        original = np.asarray(Image.open(Path(config.data.root) / r["image/source"]))
        again = selector.lpips_distances(lpips_model, original[..., :3], r["image"][None])
        assert again[0] == pytest.approx(r["fmas/lpips"], rel=1e-3, abs=1e-5)


def test_rerun_of_finished_output_writes_nothing(e2e):
    manifest = pipeline.run_fmas(e2e["config"])
    assert manifest["counts"]["written_this_run"] == 0
    assert manifest["counts"]["already_done"] == len(e2e["records"])
    assert len(read_records(Path(e2e["config"].output_dir))) == len(e2e["records"])


def assert_same_record(a: dict, b: dict) -> None:
    """Same source -> same draws; the images agree up to float non-associativity."""
    assert a["image/source"] == b["image/source"] and a["fmas/seed"] == b["fmas/seed"]
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert a["fmas/cfg"] == b["fmas/cfg"] and a["fmas/strength"] == b["fmas/strength"]
    diff = np.abs(a["image"].astype(int) - b["image"].astype(int))
    assert diff.max() <= 2


def test_killed_run_restarted_writes_each_image_exactly_once(env, e2e, monkeypatch):
    config = sf.make_config(env["tmp"], data_root=env["data"], models=env["models"], output="kill")
    real = worker.synthesize_one
    calls = []

    def dies_on_fourth(item, **kwargs):
        calls.append(item.source)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated kill")
        return real(item, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(worker, "synthesize_one", dies_on_fourth)
        # A hard kill never reaches the writer's final flush: buffered records are lost.
        mp.setattr(writer.ShardedRecordWriter, "__exit__", lambda self, *exc: None)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_fmas(config)
    assert len(read_records(Path(config.output_dir))) == 2  # image 3 was lost with the buffer
    manifest = pipeline.run_fmas(config)
    assert manifest["counts"]["already_done"] == 2
    assert manifest["counts"]["written_this_run"] == len(env["sources"]) - 2
    records = read_records(Path(config.output_dir))
    sources = [r["image/source"] for r in records]
    assert sorted(sources) == sorted(env["sources"]) and len(set(sources)) == len(sources)
    reference = by_source(e2e["records"])
    for r in records:
        assert_same_record(r, reference[r["image/source"]])


def test_two_shards_write_disjoint_complete_records(env, e2e):
    config = sf.make_config(env["tmp"], data_root=env["data"], models=env["models"], output="sh")
    config.data.limit_per_category = 1
    written = []
    for i in range(2):
        manifest = pipeline.run_fmas(config, shard_index=i, num_shards=2)
        assert manifest["counts"]["images_in_shard"] == 1
        written.append(manifest["files_written_this_run"])
    assert all(f.startswith(f"fmas-0000{i}-of-00002-") for i in range(2) for f in written[i])
    records = read_records(Path(config.output_dir))
    expected = sorted(s for s in env["sources"] if s.endswith("000.png"))
    assert sorted(r["image/source"] for r in records) == expected
    reference = by_source(e2e["records"])
    for r in records:
        assert_same_record(r, reference[r["image/source"]])


def test_subband_analysis_cli_on_written_records(env, e2e, tmp_path, capsys):
    from absl import flags

    from launch import subband_analysis

    out_csv = tmp_path / "table1.csv"
    argv = [
        "subband_analysis",
        f"--records={Path(e2e['config'].output_dir) / writer.RECORD_GLOB}",
        f"--data_root={env['data']}",
        f"--output_csv={out_csv}",
    ]
    flags.FLAGS(argv)
    try:
        subband_analysis.main(["subband_analysis"])
    finally:
        flags.FLAGS.unparse_flags()
    lines = out_csv.read_text().splitlines()
    assert lines[0] == "category,pairs,LL,LH,HL,HH" and len(lines) == 3
    pairs = []
    for r in e2e["records"]:
        original = np.asarray(Image.open(env["data"] / r["image/source"]).convert("RGB"))
        pairs.append((r["image/category"], original / 255.0, r["image"] / 255.0))
    rows, _ = subband.class_table(pairs)
    for line in lines[1:]:
        category, n, *values = line.split(",")
        assert int(n) == PER_CATEGORY
        np.testing.assert_allclose([float(v) for v in values], rows[category], atol=1e-6)
    assert "| Class |" in capsys.readouterr().out


def test_jax_side_reader_reads_what_fmas_writes(e2e):
    from wdam_jax.data.fmas_records import load_fmas_arrays

    output_dir = Path(e2e["config"].output_dir)
    images, read_masks, sources = load_fmas_arrays(
        str(output_dir / writer.RECORD_GLOB), image_size=64
    )
    ours = by_source(e2e["records"])
    assert sorted(sources) == sorted(ours) and images.shape == (len(ours), 64, 64, 3)
    for image, mask, source in zip(images, read_masks, sources, strict=True):
        np.testing.assert_array_equal(mask, ours[source]["mask"][..., 0] == 255)
        np.testing.assert_allclose(image, ours[source]["image"] / 255.0, atol=1e-6)
