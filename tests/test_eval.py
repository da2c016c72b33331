"""`python -m anchordiff_eval`, end to end on tiny datasets written here in the real formats
(ImageNet-Segmentation's MATLAB v7.3 .mat, a PascalVOC 2012 tree, the folder format) and the tiny
SD3 fixture loaded by ComfyUI from files, as a user's model would be."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

h5py = pytest.importorskip("h5py")

from anchordiff_core.masks import soft_map  # noqa: E402
from anchordiff_core.metrics import BinarySegmentationMeter, MultiConceptMeter  # noqa: E402
from anchordiff_eval import datasets as ds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLIP_FROM = "toyworld.comfy_clip:make_fixture_clip"


# ----------------------------------------------------------------------------- tiny datasets, real formats
def scene(h, w, seed, shapes):
    """An image [h, w, 3] uint8 with coloured rectangles on a textured background, and their masks."""
    g = np.random.default_rng(seed)
    image = (g.random((h, w, 3)) * 60 + 40).astype(np.uint8)
    masks = []
    for (y0, y1, x0, x1, color) in shapes:
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = True
        image[m] = color
        masks.append(m)
    return image, masks


def write_mat(path, images, gts, ids):
    """gtsegs_ijcv.mat's layout as MATLAB v7.3 writes it: /value/{img,gt,id} are N x 1 cells of
    references; images [3, W, H] uint8 (MATLAB's column-major order), gt a 1 x 1 cell holding [W, H],
    id UTF-16 characters."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        value = f.create_group("value")
        img_refs, gt_refs, id_refs = [], [], []
        for i, (image, gt, ident) in enumerate(zip(images, gts, ids)):
            img_refs.append(refs.create_dataset(f"img{i}", data=image.transpose(2, 1, 0)).ref)
            inner = refs.create_dataset(f"gtm{i}", data=gt.astype(np.uint8).T).ref
            cell = refs.create_dataset(f"gtc{i}", shape=(1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = inner
            gt_refs.append(cell.ref)
            id_refs.append(refs.create_dataset(f"id{i}", data=np.array([[ord(c)] for c in ident], np.uint16)).ref)
        for name, items in (("img", img_refs), ("gt", gt_refs), ("id", id_refs)):
            d = value.create_dataset(name, shape=(len(items), 1), dtype=h5py.ref_dtype)
            for i, r in enumerate(items):
                d[i, 0] = r


def voc_palette_png(path, labels):
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette = [0, 0, 0] + [(37 * i) % 256 for i in range(3, 768)]
    img.putpalette(palette)
    img.save(path)


def write_voc(root):
    """VOC2012/{ImageSets/Segmentation/val.txt, JPEGImages, SegmentationClass}: two single-class images
    (with void outlines) and one with two classes, which the selection must skip."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("ImageSets/Segmentation", "JPEGImages", "SegmentationClass"):
        (voc / sub).mkdir(parents=True)
    specs = {
        "2007_000032": [(10, 50, 8, 40, (200, 40, 40), 12)],  # dog
        "2007_000033": [(20, 60, 30, 70, (40, 200, 40), 8)],  # cat
        "2008_000001": [(5, 30, 5, 30, (40, 40, 200), 7), (40, 70, 40, 80, (200, 200, 40), 15)],  # car + person
    }
    truth = {}
    for n, (ident, shapes) in enumerate(specs.items()):
        image, masks = scene(72, 88, n, [s[:5] for s in shapes])
        labels = np.zeros((72, 88), np.uint8)
        for m, s in zip(masks, shapes):
            labels[m] = s[5]
            outline = m & ~np.pad(m, 1)[2:, 1:-1] | m & ~np.pad(m, 1)[1:-1, 2:]
            labels[outline] = 255  # VOC's void band
        Image.fromarray(image).save(voc / "JPEGImages" / f"{ident}.jpg", quality=95)
        voc_palette_png(voc / "SegmentationClass" / f"{ident}.png", labels)
        truth[ident] = labels
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(specs) + "\n")
    return root / "VOCdevkit", truth


def write_folder(root):
    """The folder format: two images, two look-alike concepts each."""
    for n in range(2):
        item = root / f"scene{n}"
        item.mkdir(parents=True)
        image, masks = scene(80, 64, 10 + n, [(8, 40, 6, 30, (210, 60, 30)), (44, 76, 30, 60, (230, 90, 20))])
        Image.fromarray(image).save(item / "image.png")
        (item / "concepts.txt").write_text("red box\norange box\n")
        for k, m in enumerate(masks, start=1):
            Image.fromarray(m.astype(np.uint8) * 255).save(item / f"mask_{k}.png")
        if n == 1:
            (item / "prompt.txt").write_text("a red box and an orange box")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory, comfy, comfy_models_dir):
    from fixtures.tiny_vae import build_taesd3
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("evaldata")
    images, gts = [], []
    for i, shape in enumerate([(12, 50, 10, 44), (30, 70, 20, 60)]):
        image, masks = scene(76, 92, 20 + i, [shape + ((220, 180, 30),)])
        images.append(image)
        gts.append(masks[0])
    write_mat(d / "gtsegs_ijcv.mat", images, gts, ["n02084071_1234", "n02121808_77"])
    (d / "names.json").write_text(json.dumps({"n02084071": "dog", "n02121808": "cat"}))
    voc, voc_truth = write_voc(d / "voc")
    folder = write_folder(d / "confusion")
    # SD3's VAE as one file (here the tiny TAESD; ComfyUI's VAE loader detects it by its keys)
    vae = {k: v.contiguous() for k, v in build_taesd3().state_dict().items()}
    vae["vae_scale"], vae["vae_shift"] = torch.tensor(1.5305), torch.tensor(0.0609)
    save_file(vae, str(d / "vae.safetensors"))
    unet = comfy_models_dir / "diffusion_models" / "tiny_sd3.safetensors"
    # a full checkpoint as Load Checkpoint reads it: the same MMDiT and VAE under their prefixes
    from safetensors.torch import load_file
    ckpt = {f"model.diffusion_model.{k}": v for k, v in load_file(str(unet)).items()}
    ckpt.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    save_file(ckpt, str(d / "tiny_checkpoint.safetensors"))
    return {"dir": d, "mat": d / "gtsegs_ijcv.mat", "names": d / "names.json", "voc": voc, "voc_truth": voc_truth,
            "folder": folder, "vae": d / "vae.safetensors", "unet": unet, "ckpt": d / "tiny_checkpoint.safetensors",
            "images": images, "gts": gts}


def base_args(data, out, *extra):
    from toyworld.comfy_env import comfyui_dir

    return ["--comfyui", str(comfyui_dir()), "--unet", str(data["unet"]), "--vae", str(data["vae"]),
            "--clip-from", CLIP_FROM, "--size", "64", "--steps", "20", "--out", str(out), *extra]


def all_datasets(data):
    return ["--imagenet-seg", str(data["mat"]), "--imagenet-names", str(data["names"]), "--voc", str(data["voc"]),
            "--folder", str(data["folder"])]


# ----------------------------------------------------------------------------- readers alone
def test_readers_see_what_was_written(data):
    samples = list(ds.imagenet_segmentation(data["mat"], ds.read_name_map(data["names"]), background=("background",)))
    assert [s.id for s in samples] == ["00000_n02084071_1234", "00001_n02121808_77"]
    assert [s.concepts for s in samples] == [("dog", "background"), ("cat", "background")]
    for s, image, gt in zip(samples, data["images"], data["gts"]):
        assert np.array_equal(s.image, image) and np.array_equal(s.masks[0], gt) and s.valid is None
    voc = list(ds.voc_single_class(data["voc"], background=()))
    assert [(s.id, s.concepts) for s in voc] == [("2007_000032", ("dog",)), ("2007_000033", ("cat",))]
    labels = data["voc_truth"]["2007_000032"]
    assert np.array_equal(voc[0].masks[0], labels == 12) and np.array_equal(voc[0].valid, labels != 255)
    assert voc[0].valid.sum() < voc[0].valid.size  # the void band is there and is not scored
    folder = list(ds.folder_dataset(data["folder"]))
    assert [s.concepts for s in folder] == [("red box", "orange box")] * 2
    assert folder[0].prompt is None and folder[1].prompt == "a red box and an orange box"
    assert folder[0].masks.shape == (2, 80, 64) and not (folder[0].masks[0] & folder[0].masks[1]).any()


def test_voc_selection_follows_conceptattention_224_nearest_rule(tmp_path):
    """A second class too small to survive the 224 x 224 nearest-neighbour resize does not count
    (ConceptAttention's split); a class that survives it does."""
    voc = tmp_path / "VOC2012"
    for sub in ("ImageSets/Segmentation", "JPEGImages", "SegmentationClass"):
        (voc / sub).mkdir(parents=True)
    labels = np.zeros((448, 448), np.uint8)
    labels[100:300, 100:300] = 8
    labels[400, 400] = 15  # even row and column: PIL's nearest 2x downsampling samples odd ones
    voc_palette_png(voc / "SegmentationClass" / "a.png", labels)
    labels[401:404, 401:404] = 15  # now some odd pixels too
    voc_palette_png(voc / "SegmentationClass" / "b.png", labels)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    assert ds.voc_single_class_ids(tmp_path) == [("a", 8)]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nothing.mat", "does not exist"),
    (lambda d: (d / "x.mat").write_text("not hdf5") and d / "x.mat", "not a MATLAB v7.3"),
])
def test_imagenet_reader_errors(tmp_path, make, message):
    with pytest.raises(ds.DatasetError, match=message):
        list(ds.imagenet_segmentation(make(tmp_path), {}))


def test_folder_and_voc_reader_errors(tmp_path, data):
    with pytest.raises(ds.DatasetError, match="not a PascalVOC 2012 folder"):
        ds.voc_single_class_ids(tmp_path)
    item = tmp_path / "f" / "one"
    item.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(item / "image.png")
    (item / "concepts.txt").write_text("cat\ndog\n")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(item / "mask_1.png")
    with pytest.raises(ds.DatasetError, match="no mask_2.png for concept 2 \\('dog'\\)"):
        list(ds.folder_dataset(tmp_path / "f"))
    with pytest.raises(ds.DatasetError, match="no entry for image 1 \\(n02121808_77\\)"):
        list(ds.imagenet_segmentation(data["mat"], {"n02084071": "dog"}))


# ----------------------------------------------------------------------------- the command, end to end
def recompute(out, key, samples, methods, size):
    """The metrics, independently, from the cached token heat and the truth."""
    res = {}
    for method in methods:
        binary, multi = BinarySegmentationMeter(), MultiConceptMeter()
        for s in samples:
            with np.load(out / key / "cache" / f"{s.id}.npz") as f:
                heat, grid = torch.from_numpy(f[f"heat_{method}"]), tuple(f["grid"])
            assert heat.shape == (s.masks.shape[0], (size // 16) ** 2)
            maps = soft_map(heat, grid, s.masks.shape[1:]).numpy()
            for t in range(maps.shape[0]):
                binary.update(maps[t], s.masks[t], s.valid)
            if maps.shape[0] > 1:
                multi.update(maps, s.masks)
        res[method] = (binary.compute(), multi.compute() if multi.n_images else None)
    return res


def test_command_end_to_end_resumable(data, tmp_path, capsys):
    from anchordiff_eval.__main__ import main

    out = tmp_path / "out"
    assert main(base_args(data, out, *all_datasets(data))) == 0
    captured = capsys.readouterr()
    assert "| AnchorDiff |" in captured.out and "mIoU (CA protocol)" in captured.out
    assert "ImageNet-Segmentation: 100%" in captured.err  # the progress bar
    res = json.loads((out / "results.json").read_text())["datasets"]
    assert set(res) == {"imagenet-seg", "voc-val-single", "folder-confusion"}
    methods = ["anchordiff", "cross_attention", "conceptattention", "seg4diff"]
    samples = {
        "imagenet-seg": list(ds.imagenet_segmentation(data["mat"], ds.read_name_map(data["names"]))),
        "voc-val-single": list(ds.voc_single_class(data["voc"])),
        "folder-confusion": list(ds.folder_dataset(data["folder"])),
    }
    for key, r in res.items():
        assert (r["n_images"], r["n_recorded"], r["n_from_cache"]) == (2, 2, 0), key
        assert list(r["methods"]) == methods
        expected = recompute(out, key, samples[key], methods, 64)
        for method in methods:
            binary, multi = expected[method]
            got = r["methods"][method]
            for k in ("acc", "miou", "map", "miou_conceptattention_protocol", "bf"):
                assert got["binary"][k] == pytest.approx(binary[k]), (key, method, k)
            if key == "folder-confusion":
                for k in ("miou_fg", "map_fg", "acc_fg", "nar"):
                    assert got["multi_concept"][k] == pytest.approx(multi[k]), (key, method, k)
            else:
                assert got["multi_concept"] is None
        for s in samples[key]:
            png = np.asarray(Image.open(out / key / "overlays" / f"{s.id}.png"))
            assert png.shape[0] == s.masks.shape[0] * round(s.image.shape[0] * 256 / max(s.image.shape[:2]))
    # the 4 methods give 4 different heat maps
    with np.load(out / "folder-confusion" / "cache" / "scene0.npz") as f:
        heats = [f[f"heat_{m}"] for m in methods]
        assert f["anchors"].shape == (2, 1)
    assert all(not np.allclose(heats[i], heats[j]) for i in range(4) for j in range(i + 1, 4))
    table = (out / "results.md").read_text()
    assert "Multi-concept confusion (AnchorDiff eq. 14), 4 image-concept pairs" in table

    # resume: nothing is recorded again, the same numbers come out
    assert main(base_args(data, out, *all_datasets(data), "--no-progress")) == 0
    again = json.loads((out / "results.json").read_text())["datasets"]
    for key in res:
        assert (again[key]["n_recorded"], again[key]["n_from_cache"]) == (0, 2)
        assert again[key]["methods"] == res[key]["methods"]
    capsys.readouterr()
    # other settings into the same folder: refused, unless --restart
    assert main(base_args(data, out, "--folder", str(data["folder"]), "--gate-percentile", "90")) == 2
    assert "other settings (record differ)" in capsys.readouterr().err
    assert main(base_args(data, out, "--folder", str(data["folder"]), "--gate-percentile", "90", "--restart", "--no-progress")) == 0
    assert json.loads((out / "results.json").read_text())["datasets"]["folder-confusion"]["n_recorded"] == 2


@pytest.mark.parametrize("anchor_from, regions", [("paper", False), ("consensus", False), ("consensus-smoothed", False),
                                                  ("consensus-smoothed", True)])
def test_cached_heat_is_what_the_nodes_give(data, tmp_path, anchor_from, regions):
    """The heat the command scores is the nodes' own: the same image through Concepts, CLIP Text
    Encode, VAE Encode, Look At Image, Anchor Select, Build Gated Graph and Propagate (with
    --anchor-from consensus: Look At Image's anchor_maps and Anchor Select's consensus option; with
    --anchor-regions: Anchor Select's multi-anchor defaults and Propagate's default keep)."""
    from anchordiff_eval.__main__ import main
    from anchordiff_eval.run import resize_square
    from toyworld.comfy_clip import make_fixture_clip
    import comfy.sd
    import comfy.utils
    import nodes

    out = tmp_path / "out"
    size = 128 if regions else 64  # 8 x 8 tokens: the random model's masks have regions without an anchor to cut
    assert main(base_args(data, out, "--folder", str(data["folder"]), "--no-progress", "--no-overlays", "--methods", "anchordiff",
                          "--anchor-from", anchor_from, "--size", str(size), *(["--anchor-regions"] if regions else []))) == 0
    sample = list(ds.folder_dataset(data["folder"]))[1]
    N = nodes.NODE_CLASS_MAPPINGS
    clip = make_fixture_clip()
    model = comfy.sd.load_diffusion_model(str(data["unet"]))
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(data["vae"])))
    pixels = torch.from_numpy(np.array(resize_square(sample.image, size), dtype=np.float32)).div(255)[None]
    latent = N["VAEEncode"]().encode(vae, pixels)[0]
    concepts = N["AnchorDiffConcepts"].execute(clip, "red box, orange box").args[0]
    positive = N["CLIPTextEncode"]().encode(clip, "a red box and an orange box")[0]
    if anchor_from == "paper":  # the paper's maps and argmax anchor, one click from the defaults
        maps = N["AnchorDiffLookAtImage"].execute(model, concepts, positive, latent, 0, 0.5, "", -1, "concept→image (paper)").args[0]
        anchors = N["AnchorDiffAnchorSelect"].execute(maps, 1, 8.0, 0.5, "", False, None, "concept→image (paper)").args[0]
        assert maps.ic is None
    else:
        maps = N["AnchorDiffLookAtImage"].execute(model, concepts, positive, latent, 0, 0.5, "", -1,
                                                  "all blocks, both directions (consensus)").args[0]
        choice = {"consensus": "consensus (blocks agree, both directions)", "consensus-smoothed": "consensus, smoothed (region peak)"}
        multi = (3, -1.0, 0.7) if regions else (1, 8.0, 0.5)  # the node's defaults with --anchor-regions
        anchors = N["AnchorDiffAnchorSelect"].execute(maps, *multi, "", False, None, choice[anchor_from]).args[0]
        assert maps.ic is not None
    graph = N["AnchorDiffBuildGatedGraph"].execute(maps, 98.0, "", True, "custom").args[0]
    keep = "regions holding an anchor" if regions else "everywhere (paper)"
    heat = N["AnchorDiffPropagate"].execute(graph, anchors, 20, "custom", keep).args[0]
    with np.load(out / "folder-confusion" / "cache" / f"{sample.id}.npz") as f:
        np.testing.assert_allclose(f["heat_anchordiff"], heat.values[0].numpy(), atol=1e-6)
    if regions:  # the regions cut something here, so the comparison above can tell the two settings apart
        everywhere = N["AnchorDiffPropagate"].execute(graph, anchors, 20, "custom", "everywhere (paper)").args[0]
        assert (everywhere.values[0] - heat.values[0]).abs().max() > 0.01


def test_checkpoint_route_and_edges(data, tmp_path):
    """A full checkpoint (Load Checkpoint's loader) holding the same weights gives the same numbers
    as diffusion model + VAE files; --refine-edges adds a row per method."""
    from anchordiff_eval.__main__ import main

    common = ["--imagenet-seg", str(data["mat"]), "--imagenet-names", str(data["names"]), "--no-progress",
              "--methods", "anchordiff,cross_attention", "--refine-edges"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(base_args(data, a, *common)) == 0
    args = base_args(data, b, *common)
    i = args.index("--unet")
    args[i: i + 4] = ["--checkpoint", str(data["ckpt"])]  # replaces --unet X --vae Y
    assert main(args) == 0
    ra = json.loads((a / "results.json").read_text())["datasets"]["imagenet-seg"]
    rb = json.loads((b / "results.json").read_text())["datasets"]["imagenet-seg"]
    assert list(ra["methods"]) == ["anchordiff", "anchordiff+edges", "cross_attention", "cross_attention+edges"]
    assert ra["methods"] == rb["methods"]
    assert ra["methods"]["anchordiff"] != ra["methods"]["anchordiff+edges"]
    assert "| AnchorDiff + edges |" in (a / "results.md").read_text()


@pytest.mark.parametrize("change, message", [
    (lambda a: a + ["--imagenet-seg", "x.mat"], "give --imagenet-names"),
    (lambda a: a, "no dataset given"),
    (lambda a: a + ["--voc", "/nonexistent"], "not a PascalVOC 2012 folder"),
    (lambda a: a[:1] + ["/tmp"] + a[2:] + ["--folder", "FOLDER"], "is not a ComfyUI folder"),
    (lambda a: [x for x in a if x != "--clip-from" and x != CLIP_FROM] + ["--folder", "FOLDER"], "has no text encoders"),
    (lambda a: a + ["--folder", "FOLDER", "--size", "72"], "multiple of 16"),
    (lambda a: a + ["--folder", "FOLDER", "--methods", "anchordiff,daam"], "unknown \\['daam'\\]"),
    (lambda a: [x.replace("tiny_sd3.safetensors", "tiny_wan21.safetensors") for x in a] + ["--folder", "FOLDER"],
     "needs a model of a supported family, but the connected MODEL is WAN21"),
])
def test_command_errors(data, tmp_path, capsys, change, message):
    from anchordiff_eval.__main__ import main

    args = [str(data["folder"]) if x == "FOLDER" else x for x in change(base_args(data, tmp_path / "out"))]
    assert main(args) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_gate_and_steps_default_to_the_paper_and_take_auto():
    from anchordiff_core import auto
    from anchordiff_eval.__main__ import build_parser

    base = ["--comfyui", "x", "--out", "y"]
    args = build_parser().parse_args(base)
    assert (args.gate_percentile, args.steps) == (auto.PAPER_GATE_PERCENTILE, auto.PAPER_STEPS)
    args = build_parser().parse_args(base + ["--gate-percentile", "auto", "--steps", "Paper"])
    assert (args.gate_percentile, args.steps) == ("auto", "paper")
    args = build_parser().parse_args(base + ["--gate-percentile", "95.5", "--steps", "40"])
    assert (args.gate_percentile, args.steps) == (95.5, 40)
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--steps", "4.5"])


def test_method_registry_is_what_the_command_and_the_pipeline_use():
    from anchordiff_core import methods, pipeline
    from anchordiff_eval.comfy import NodeRecorder
    from anchordiff_eval.run import METHOD_TITLES

    assert NodeRecorder.METHODS == tuple(methods.METHODS) == tuple(METHOD_TITLES)
    assert methods.BASELINES == ("cross_attention", "conceptattention", "seg4diff")
    with pytest.raises(ValueError, match="unknown baseline 'anchordiff'"):
        pipeline.baseline_heat(None, "anchordiff")
