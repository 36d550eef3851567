"""FMAS anomaly synthesis on MVTec AD (Sec. 3.1, Tables 1-2): one record per normal training image.

  python -m launch.synthesize --config=configs/fmas_mvtec.py
  python -m launch.synthesize --config=configs/fmas_mvtec.py --shard_index=0 --num_shards=8
  python -m launch.synthesize --config=configs/fmas_mvtec.py:demo   # tiny models, demo data, CPU
  python -m launch.synthesize --config=configs/fmas_mvtec.py --config.distributed.engine=ray \
      --config.distributed.address=auto --config.distributed.num_workers=8 \
      --config.distributed.gpus_per_worker=1   # a Ray cluster, one GPU per worker

The plain config expects real weights and data at the paths below (see synthesis/README.md);
``:demo`` expects ``python -m synthesis.tiny_models --out_dir=workdirs/tiny_models`` and the demo
data under ``workdirs/demo_data`` (made by the JAX side's demo generator).
"""

import ml_collections

# The arguments --config=<this file>:<arg> accepts ("": none); the launchers check them.
VARIANTS = ("", "demo")

MVTEC_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
# Whole-image foreground: the MVTec AD textures and the demo textures.
TEXTURE_CATEGORIES = ("carpet", "grid", "leather", "tile", "wood", "brick", "grass", "gravel")
DEMO_CATEGORIES = ("brick", "grass", "gravel", "washer")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """FMAS config; ``arg="demo"`` for the demo data and the tiny local models."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.device = "auto"  # "cuda" when visible, else "cpu"
    config.cpu_threads = 0  # torch intra-op threads; 0 = torch's default
    config.output_dir = "workdirs/fmas_mvtec"

    config.data = ml_collections.ConfigDict()
    config.data.root = "data/mvtec_ad"
    config.data.categories = MVTEC_CATEGORIES  # empty: every folder under data.root
    config.data.pattern = "train/good/*"
    config.data.limit_per_category = 0  # 0: all images

    config.masks = ml_collections.ConfigDict()
    # Shared cache with the CutPaste "+FM" option: <fg_root>/<category>/train/good/000.png.
    config.masks.fg_root = "workdirs/foreground_masks/mvtec_ad"
    config.masks.texture_categories = TEXTURE_CATEGORIES
    config.masks.alpha = 0.1  # eq. 2
    # Width / height of M_rect; the paper says "a predefined range" without numbers.
    config.masks.aspect_ratio_range = (0.5, 2.0)
    config.masks.min_foreground_fraction = 0.01  # below: SAM missed, use the whole image

    config.sam = ml_collections.ConfigDict()
    config.sam.checkpoint = "weights/sam/sam_vit_h_4b8939.pth"
    config.sam.model_type = "vit_h"
    config.sam.prompt = "center_point"  # or "full_box"; "point_grid" for several objects
    # Classes with several objects per image: SAM prompted with a grid of points, masks unioned
    # (synthesis/masks.py point_grid_union). None in MVTec AD (one object per image).
    config.sam.multi_object_categories = ()
    config.sam.grid_points_per_side = 8
    config.sam.grid_min_score = 0.8  # SAM's predicted IoU of a point's mask
    config.sam.grid_max_fraction = 0.5  # larger masks are background, not an object

    config.prompts = ml_collections.ConfigDict()
    config.prompts.llm_base_url = ""  # e.g. "https://api.openai.com/v1"; "" = offline library
    config.prompts.llm_model = "gpt-4o"
    config.prompts.api_key_env = "OPENAI_API_KEY"  # the variable's name, never the key
    config.prompts.cache_dir = "workdirs/fmas_prompts"
    config.prompts.timeout_s = 60.0  # the whole exchange with the LLM, retries included

    config.inpaint = ml_collections.ConfigDict()
    config.inpaint.model_dir = "weights/stable-diffusion-inpainting"
    config.inpaint.steps = 20  # DPM++ 2M
    config.inpaint.cfg_range = (5.0, 10.0)
    config.inpaint.strength_range = (0.5, 0.85)
    config.inpaint.num_candidates = 5  # seeds per image-mask pair
    config.inpaint.resolution = 512  # longer side SD runs at
    config.inpaint.half_precision = True  # float16 on CUDA only

    config.selector = ml_collections.ConfigDict()
    # Eq. 3's tau is not given in the paper; 0.13 is the mean LPIPS it reports for FMAS (Table 2).
    config.selector.tau = 0.13
    config.selector.lpips_net = "alex"
    config.selector.backbone_weights = "torch_hub"  # $TORCH_HOME/hub/checkpoints/alexnet-owt-...

    config.output = ml_collections.ConfigDict()
    config.output.records_per_file = 64

    # Who runs the models (synthesis/distributed.py). "local": this process. "ray": a pool of
    # Ray Data actors (pip install -e '.[distributed]'), each loading the models once; the
    # records come back in order to this process's writer, so the output is the same.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.engine = "local"
    config.distributed.num_workers = 2  # actors in the pool ("ray")
    config.distributed.address = ""  # "": start a Ray instance here; "auto" or "ray://h:10001"
    config.distributed.cpus_per_worker = 1.0
    config.distributed.gpus_per_worker = 0.0  # 1.0 on GPU workers: one GPU-resident model each
    config.distributed.actor_start_timeout_s = 600  # waits for every actor's models to load

    if arg == "demo":
        config.output_dir = "workdirs/fmas_demo"
        config.data.root = "workdirs/demo_data/mvtec_demo"
        config.data.categories = DEMO_CATEGORIES
        config.data.limit_per_category = 4
        config.masks.fg_root = "workdirs/demo_data/foreground_masks"
        config.sam.checkpoint = "workdirs/tiny_models/sam_tiny.pth"
        config.sam.model_type = "tiny"
        config.prompts.cache_dir = "workdirs/fmas_demo/prompts"
        config.inpaint.model_dir = "workdirs/tiny_models/sd_inpaint"
        config.inpaint.resolution = 128
        config.selector.backbone_weights = "random"
        config.output.records_per_file = 4
    elif arg:
        raise ValueError(f"Unknown config argument {arg!r}; use nothing or 'demo'.")
    return config
