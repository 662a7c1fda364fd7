"""The data contracts, each defined once: the table registry (every table's Spark schema, the
Arrow schema derived from it, the stage that writes it), reject reasons, split and layout
names. Writers and readers import these.

    TABLES["images"].schema   # Spark StructType
    TABLES["images"].arrow    # the same as a pyarrow schema (derived, never typed twice)
    TABLES["images"].written_by  # 'prepare_images': run jobs/prepare_images.py to make it
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import pyarrow as pa
from pyspark.sql import types as T


class Reason(str, Enum):
    """Why a record did not make it into a stage's output (the `reason` column of `rejected`)."""

    # ingest
    IMAGE_MISSING = "image_missing"          # the post names an image that does not exist
    EMPTY_IMAGE = "empty_image"              # the image file has zero bytes
    DUPLICATE_POST = "duplicate_post"        # the same post_id was already ingested
    BAD_MANIFEST_ROW = "bad_manifest_row"    # a manifest row without post_id/image, or unparsable
    UNRECOGNIZED_FILE = "unrecognized_file"  # a file in the image tree that is not <id>.<image ext>
    VIDEO = "video"                          # an Instagram export's video (the studies use still images)
    PATH_OUTSIDE_ARCHIVE = "path_outside_archive"  # an archive's media path or symlink leads out of its folder
    # ingest of http(s) image URLs (sparkml.ingest.fetch)
    HTTP_STATUS = "http_status"              # the server answered with an error status (the code is in the detail)
    TIMEOUT = "timeout"                      # no answer within ingest.http's connect / read / total timeouts
    TOO_LARGE = "too_large"                  # the body is larger than ingest.http.max_bytes
    TOO_MANY_REDIRECTS = "too_many_redirects"  # more than ingest.http.max_redirects hops
    CONNECTION_ERROR = "connection_error"    # refused, reset, DNS failure: after ingest.http.retries retries
    PRIVATE_ADDRESS = "private_address"      # the host is a loopback / private / link-local address (refused)
    # extract_features, train_svm
    NON_FINITE_FEATURES = "non_finite_features"  # the network gave NaN or infinite values for the image
    # prepare_images
    NOT_AN_IMAGE = "not_an_image"            # the bytes are no image format we read (an HTML error page, ...)
    DECOMPRESSION_BOMB = "decompression_bomb"  # the header claims more pixels than prepare.max_pixels
    TRUNCATED_IMAGE = "truncated_image"      # the file ends before the image data does
    CORRUPT_IMAGE = "corrupt_image"          # the decoder failed for another reason
    TOO_SMALL = "too_small"                  # smaller than prepare.min_side (icons, tracking pixels)
    # filter_followers
    USER_MISSING = "user_missing"            # no user_id: the follower statistics are per user
    FOLLOWERS_MISSING = "followers_missing"  # no follower count
    FOLLOWERS_ZERO = "followers_zero"        # zero followers: likes / followers is undefined
    FOLLOWERS_NEGATIVE = "followers_negative"
    LIKES_INVALID = "likes_invalid"          # likes missing or negative
    TOO_RECENT = "too_recent"                # younger than followers.min_age_days: likes still coming in
    FOLLOWER_OUTLIER = "follower_outlier"    # the user's followers are outside median +- k * MAD
    # train_lda
    NO_CAPTION_WORDS = "no_caption_words"    # nothing left after preprocessing: no topic vector
    NO_VOCABULARY_WORDS = "no_vocabulary_words"  # only words rarer than lda.min_count
    # build_dataset
    NO_LABEL = "no_label"                    # the dataset's label is missing for this post
    NO_FACE = "no_face"                      # likability: no face at faces.min_confidence


class CaptionStatus(str, Enum):
    """What ingest could make of a post's caption (the `caption_status` column of `posts`)."""

    OK = "ok"
    MISSING = "missing"      # no caption file / field
    EMPTY = "empty"          # present but blank
    NOT_UTF8 = "not_utf8"    # not valid UTF-8: decoded with U+FFFD replacements


SPLITS = ("train", "val", "test")
# An Instagram account export ("Download your information", JSON): the posts files, under the
# export root, in the layouts the app has used; media URIs in them are relative to the root.
INSTAGRAM_POSTS = ("content/posts_*.json", "your_instagram_activity/content/posts_*.json")
VIDEO_EXTENSIONS = ("mp4", "mov", "m4v", "webm", "avi", "3gp")
# InstaCities1M as distributed: <root>/<IMG_DIR>/<city>/<id>.jpg, captions in <root>/<CAP_DIR>/<city>/<id>.txt;
# the split layout: <root>/<SPLIT_IMG>/<split>/<city>/<id>.jpg and <root>/<SPLIT_CAP>/<split>/<city>/<id>.txt.
IMG_DIR, CAP_DIR = "img_resized_1M/cities_instagram", "captions_resized_1M/cities_instagram"
SPLIT_IMG, SPLIT_CAP = "img", "captions"

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp", "bmp", "tif", "tiff")

CITIES = (
    "london", "newyork", "sydney", "losangeles", "chicago",
    "melbourne", "miami", "toronto", "singapore", "sanfrancisco",
)

POSTS = T.StructType([
    T.StructField("post_id", T.StringType(), False),
    T.StructField("city", T.StringType(), True),
    T.StructField("split", T.StringType(), True),          # train/val/test when the source says so
    T.StructField("caption", T.StringType(), True),
    T.StructField("caption_status", T.StringType(), False),
    T.StructField("user_id", T.StringType(), True),
    T.StructField("likes", T.LongType(), True),
    T.StructField("followers", T.LongType(), True),
    T.StructField("posted_at", T.TimestampType(), True),
    T.StructField("image_uri", T.StringType(), False),
    T.StructField("image_bytes", T.BinaryType(), False),   # the original file, untouched
    T.StructField("image_size", T.LongType(), False),
])

REJECTED = T.StructType([
    T.StructField("post_id", T.StringType(), True),  # null when the record had none (bad manifest row)
    T.StructField("reason", T.StringType(), False),
    T.StructField("detail", T.StringType(), True),
])

# A manifest is read with every column as text; ingest casts and validates.
MANIFEST_COLUMNS = ("post_id", "image", "caption", "city", "user_id", "likes", "followers", "posted_at")

IMAGES = T.StructType([
    T.StructField("post_id", T.StringType(), False),
    T.StructField("image", T.BinaryType(), False),       # JPEG, prepare.size square, RGB
    T.StructField("width", T.IntegerType(), False),      # original size as displayed (EXIF applied)
    T.StructField("height", T.IntegerType(), False),
    T.StructField("format", T.StringType(), False),      # jpeg, png, gif, webp, bmp, tiff
    T.StructField("mode", T.StringType(), False),        # original colour mode
    T.StructField("orientation", T.IntegerType(), False),  # EXIF orientation applied
    T.StructField("sha256", T.StringType(), False),      # of the original bytes
    T.StructField("phash", T.LongType(), False),         # 64-bit DCT perceptual hash of the prepared image
    # the same of its centred zooms (sparkml.images.phash.ZOOMS[1:]: 2.5% and 5% cut per side), for cropped re-posts
    T.StructField("zoom_phash", T.ArrayType(T.LongType(), False), False),
    # 256-bit hashes (4 words each) of the whole image and of each zoom: dedup verifies candidates with them
    T.StructField("phash256", T.ArrayType(T.LongType(), False), False),
])

LIKABILITY = T.StructType([
    T.StructField("post_id", T.StringType(), False),
    T.StructField("user_id", T.StringType(), False),
    T.StructField("likes", T.LongType(), False),
    T.StructField("followers", T.LongType(), False),
    T.StructField("ratio", T.DoubleType(), False),       # likes / followers
    T.StructField("bucket", T.IntegerType(), False),     # follower quantile bucket (0 with label_by=median)
    T.StructField("label", T.IntegerType(), False),      # 1 = above the (bucket's) median ratio
])

FACES = T.StructType([
    T.StructField("post_id", T.StringType(), False),
    T.StructField("faces", T.IntegerType(), False),
    # x, y, w, h in the prepared image's pixels, and the detector's score in 0..1
    T.StructField("boxes", T.ArrayType(T.ArrayType(T.FloatType(), False), False), False),
    T.StructField("best_confidence", T.FloatType(), False),  # 0 when no face
    T.StructField("detector", T.StringType(), False),
    T.StructField("params", T.StringType(), False),          # JSON of the detector's parameters
])

DUPLICATES = T.StructType([
    T.StructField("post_id", T.StringType(), False),
    T.StructField("canonical_post_id", T.StringType(), False),
    T.StructField("kind", T.StringType(), False),        # exact (same bytes) | near (pHash within dedup.max_hamming)
    T.StructField("hamming", T.IntegerType(), False),    # pHash bits apart, at the best pairing of zooms
])

BOW = T.StructType([
    T.StructField("post_id", T.StringType(), False),
    T.StructField("ids", T.ArrayType(T.IntegerType(), False), False),     # vocabulary ids, ascending
    T.StructField("counts", T.ArrayType(T.IntegerType(), False), False),  # occurrences of each id
    T.StructField("split", T.StringType(), False),                         # the partition column
])

TOPICS = T.StructType([
    T.StructField("post_id", T.StringType(), False),
    T.StructField("topics", T.ArrayType(T.FloatType(), False), False),  # the full distribution, sums to 1
])

RETRIEVAL = T.StructType([
    T.StructField("query", T.StringType(), False),
    T.StructField("rank", T.IntegerType(), False),      # 1 = best
    T.StructField("post_id", T.StringType(), False),
    T.StructField("score", T.DoubleType(), False),      # retrieval.metric, higher is better
])


FEATURES = T.StructType([
    T.StructField("post_id", T.StringType(), False),
    T.StructField("split", T.StringType(), True),        # the dataset split the image came from
    T.StructField("label", T.IntegerType(), True),       # the dataset's label, carried over
    T.StructField("model", T.StringType(), False),       # torchvision model name
    T.StructField("weights", T.StringType(), False),     # none (random init + seed) | imagenet | checkpoint URI
    T.StructField("layer", T.StringType(), False),       # fc6 | fc7 | prelogit
    T.StructField("mirrored", T.BooleanType(), False),   # of the horizontally mirrored image
    T.StructField("vector", T.ArrayType(T.FloatType(), False), False),
])

IMAGE_TOPICS = T.StructType([
    T.StructField("post_id", T.StringType(), False),
    T.StructField("split", T.StringType(), False),                      # the dataset split (val, test)
    T.StructField("topics", T.ArrayType(T.FloatType(), False), False),  # the regressor's sigmoid outputs
])

# One row per scored image and model (jobs/score.py); the columns of the other models are null.
SCORES = T.StructType([
    T.StructField("post_id", T.StringType(), False),
    T.StructField("model", T.StringType(), False),       # city | topics | likability | likability_svm
    T.StructField("version", T.StringType(), False),     # digest of the model's model.json / _SUMMARY.json
    T.StructField("city", T.StringType(), True),         # city: the most probable city
    T.StructField("city_probs", T.MapType(T.StringType(), T.FloatType(), False), True),  # city: softmax per city
    T.StructField("topics", T.ArrayType(T.FloatType(), False), True),  # topics: the regressor's sigmoid outputs
    # likability: logit(good) - logit(bad); likability_svm: the LinearSVC margin (> 0: good)
    T.StructField("likability_score", T.DoubleType(), True),
    T.StructField("likability_prob", T.DoubleType(), True),  # likability: softmax P(good); null for the SVM
])

CLUSTERS = T.StructType([
    T.StructField("post_id", T.StringType(), False),
    T.StructField("cluster", T.IntegerType(), False),    # K-Means cluster of explore.k, 0..k-1
    T.StructField("distance", T.DoubleType(), False),    # Euclidean distance to its cluster's centre
    T.StructField("x", T.DoubleType(), True),            # t-SNE map position (null outside the map's sample)
    T.StructField("y", T.DoubleType(), True),
    T.StructField("category", T.StringType(), True),     # the top-1 ImageNet class (explore.weights=imagenet)
])


def to_arrow(schema: T.StructType) -> pa.Schema:
    """The Arrow schema of a Spark schema (what mapInArrow batches must carry)."""
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(schema)


def with_reject(schema: T.StructType) -> T.StructType:
    """A stage's per-record result: the table's columns (nullable) + reason/detail (null when kept)."""
    return T.StructType([T.StructField(f.name, f.dataType, True) for f in schema.fields]
                        + [T.StructField("reason", T.StringType()), T.StructField("detail", T.StringType())])


class ResultRows:
    """The rows of one per-record result batch (a table's columns + reason/detail, the schema
    `to_arrow(with_reject(...))` gives), gathered column by column: `fixed` fills the columns a
    row does not name, a reject names its Reason and detail.

        rows = ResultRows(RESULT_ARROW, model=model)
        rows.add(post_id=pid, vector=v)
        rows.reject(Reason.CORRUPT_IMAGE, "the prepared JPEG did not decode", post_id=pid)
        return rows.batch()
    """

    def __init__(self, schema: pa.Schema, **fixed):
        self.schema, self.fixed = schema, fixed
        self.columns: dict[str, list] = {k: [] for k in schema.names}

    def add(self, **values) -> None:
        for k, col in self.columns.items():
            col.append(values[k] if k in values else self.fixed.get(k))

    def reject(self, reason: Reason, detail: str, **values) -> None:
        self.add(**values, reason=reason.value, detail=detail)

    def batch(self) -> pa.RecordBatch:
        return pa.RecordBatch.from_pydict(self.columns, schema=self.schema)


@dataclass(frozen=True)
class Table:
    """One table of the lake: <lake>/tables/<name>, written by jobs/<written_by>.py."""

    name: str
    schema: T.StructType
    written_by: str

    @property
    def arrow(self) -> pa.Schema:
        return to_arrow(self.schema)

    @property
    def columns(self) -> list[str]:
        return self.schema.fieldNames()


TABLES: dict[str, Table] = {t.name: t for t in (
    Table("posts", POSTS, "ingest"),
    Table("images", IMAGES, "prepare_images"),
    Table("duplicates", DUPLICATES, "dedup"),
    Table("faces", FACES, "detect_faces"),
    Table("likability_labels", LIKABILITY, "filter_followers"),
    Table("bow", BOW, "train_lda"),
    Table("topics", TOPICS, "infer_topics"),
    Table("retrieval", RETRIEVAL, "retrieve"),
    Table("features", FEATURES, "extract_features"),
    Table("image_topics", IMAGE_TOPICS, "train_cnn"),
    Table("scores", SCORES, "score"),
    Table("clusters", CLUSTERS, "explore"),
    Table("rejected", REJECTED, "every stage (partition stage=<stage>)"),
)}
