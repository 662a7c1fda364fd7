"""Caption preprocessing against the original's rules, the retrieval metrics against hand
computation, and train_lda -> infer_topics -> retrieve / evaluate_retrieval on the sample."""

import json

import numpy as np
import pytest

from core.lake import read_summary
from sparkml.captions.retrieval import average_precision, order, precision_at_k, scores, top_k_block
from sparkml.captions.text import preprocess, reference_preprocess, stop_words
from tests.conftest import run_job

TRICKY = {
    "Sunset at #Bondi beach!! http://t.co/x": ["sunset", "bondi", "beach", "httptcox"],
    "I ❤️ NYC\nskyline": ["nycskylin"],                       # emoji dropped, the newline glues words
    "@john_doe café niño #foodporn#yummy": ["johndo", "caf", "nio", "foodporn", "yummi"],
    "New pictures of the best home today": ["new", "pictur", "best", "home", "today"],  # 2018 list keeps these
    "RT @x: Gt 3 s": ["x", "3"],                              # custom stop words, before stemming
    "#LosAngeles#SanFrancisco": ["losangel", "sanfrancisco"],
    "Tweet a photo... much blog now, say": [],
    "Running runners ran": ["run", "runner", "ran"],
    "": [], None: [], "   ": [], "😀🔥": [],
}


@pytest.mark.parametrize("caption", list(TRICKY))
def test_preprocess_matches_the_original_rules(caption):
    assert preprocess(caption) == TRICKY[caption]
    assert reference_preprocess(caption) == TRICKY[caption]


def test_stop_word_list_is_the_2018_one():
    words = stop_words()
    assert {"a", "the", "rt", "markars_", "picture"} <= words and "new" not in words and "good" not in words


def test_metrics_against_hand_computation():
    rel = np.array([1, 0, 1, 0, 0, 1], bool)
    # precision at ranks of the hits: 1/1, 2/3, 3/6 -> AP = (1 + 2/3 + 1/2) / 3
    assert average_precision(rel) == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    assert precision_at_k(rel, 3) == pytest.approx(2 / 3) and precision_at_k(rel, 100) == pytest.approx(0.03)
    assert average_precision(np.zeros(4, bool)) == 0 and average_precision(np.ones(3, bool)) == 1
    assert list(order(["b", "a", "c"], np.array([1.0, 1.0, 2.0]))) == [2, 1, 0]  # ties by post_id


def test_block_top_k_equals_full_sort():
    rng = np.random.default_rng(0)
    v, q = rng.random((1000, 8)), rng.random((3, 8))
    ids = [f"p{i:04d}" for i in range(1000)]
    for metric in ("dot", "cosine", "euclidean"):
        blocks = [top_k_block(ids[i:i + 97], v[i:i + 97], q, 5, metric) for i in range(0, 1000, 97)]
        s = scores(q, v, metric)
        for qi in range(3):
            cand = sorted([(p, x) for b in blocks for (j, p, x) in b if j == qi], key=lambda t: -t[1])[:5]
            assert [p for p, _ in cand] == [ids[i] for i in np.argsort(-s[qi])[:5]]


@pytest.fixture(scope="module")
def topics(spark, prepared):
    lake, truth = prepared
    args = ["--set", f"lake={lake.root}", "--set", "lda.num_topics=16", "--set", "lda.min_count=5",
            "--set", "lda.passes=20"]
    assert run_job("train_lda", *args) == 0
    assert run_job("infer_topics", *args) == 0
    return lake, truth, args


def test_every_caption_with_words_gets_a_topic_vector(spark, topics):
    lake, truth, _ = topics
    s = read_summary(spark, lake.model("lda"))
    posts = spark.read.parquet(lake.table("posts")).toPandas()
    assert s["balanced"] and s["input_rows"] == len(posts)
    rejected = spark.read.parquet(lake.rejected("train_lda")).toPandas()
    empty = set(posts.post_id[posts.caption.isna() | (posts.caption.str.strip() == "")])
    assert empty <= set(rejected.post_id[rejected.reason == "no_caption_words"])
    assert s["vocabulary"] > 20 and s["heldout_docs"] > 0
    t = spark.read.parquet(lake.table("topics")).toPandas()
    assert len(t) == s["output_rows"] and not set(t.post_id) & set(rejected.post_id)
    vec = np.stack(t.topics.to_numpy())
    assert vec.shape[1] == 16 and vec.dtype == np.float32 and np.allclose(vec.sum(1), 1, atol=1e-4)
    assert (vec > 0).all()  # the full distribution, minimum_probability 0
    # What was learnt, against the ground truth: posts of other cities that share a planted topic
    # (night, beach, food, ...) are closer in topic space than posts that share none.
    labels = truth["labels"]
    rows = [(v, labels[p]) for p, v in zip(t.post_id, vec) if p in labels]
    shared, disjoint = [], []
    for i, (va, la) in enumerate(rows):
        for vb, lb in rows[i + 1:]:
            if la["city"] != lb["city"]:
                (shared if set(la["topics"]) & set(lb["topics"]) else disjoint).append(float(va @ vb))
    assert len(shared) > 100 and len(disjoint) > 100 and np.mean(shared) > 1.3 * np.mean(disjoint)  # 1 for a model that learnt nothing


def test_retrieval_by_city_name_beats_chance(spark, topics):
    lake, _, args = topics
    assert run_job("evaluate_retrieval", *args) == 0
    report = json.loads(open(lake.report("retrieval_eval")[len("file://"):] + "/metrics.json").read())
    per = report["per_city"]
    assert len(per) >= 8 and report["mean"]["mean_average_precision"] > 2 * np.mean(
        [v["chance_precision"] for v in per.values()])
    for v in per.values():
        assert 0 <= v["precision_at_100"] <= v["max_precision_at_100"]


def test_retrieve_writes_ranking_and_contact_sheet(spark, topics, capsys):
    lake, truth, args = topics
    assert run_job("retrieve", *args, "--query", "beach sunset", "--query", "#Sydney", "--k", "7") == 0
    r = spark.read.parquet(lake.table("retrieval")).toPandas()
    assert sorted(r["query"].unique()) == ["#Sydney", "beach sunset"] and (r.groupby("query").size() == 7).all()
    # The right images come first: the ground truth knows each post's topics and city.
    labels = truth["labels"]
    beach = [labels[p]["topics"] for p in r.post_id[r["query"] == "beach sunset"]]
    sydney = [labels[p]["city"] for p in r.post_id[r["query"] == "#Sydney"]]
    base = np.mean([bool({"beach", "sunset"} & set(v["topics"])) for v in labels.values()])
    assert base < 0.5 and sum(bool({"beach", "sunset"} & set(t)) for t in beach) >= 5
    assert sydney.count("sydney") >= 3  # one post in ten is of Sydney
    assert (r.sort_values(["query", "rank"]).groupby("query").score.apply(lambda s: s.is_monotonic_decreasing)).all()
    png = open(lake.report("retrieval")[len("file://"):] + "/beach-sunset.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_job("retrieve", *args, "--query", "qqqzzz xyzzy") == 2
    assert "vocabulary" in capsys.readouterr().err


def test_cities_dataset_carries_the_topic_target(spark, topics):
    from petastorm import make_reader

    lake, _, args = topics
    assert run_job("build_dataset", *args, "--set", "dataset.name=cities_topics") == 0
    t = spark.read.parquet(lake.table("topics")).toPandas().set_index("post_id")
    n = with_topics = 0
    with make_reader(f"{lake.dataset('cities_topics')}/train", num_epochs=1, workers_count=2) as reader:
        for row in reader:
            n += 1
            if row.post_id in t.index:
                with_topics += 1
                assert row.topics.shape == (16,) and np.allclose(row.topics, t.topics[row.post_id])
            else:
                assert row.topics is None
    assert n > 50 and with_topics > 0.8 * n


def test_corpus_length_comes_from_parquet_footers(spark, topics):
    from sparkml.captions.topics import ParquetCorpus

    lake, _, _ = topics
    uri = f"{lake.table('bow')}/split=train"
    corpus = ParquetCorpus(uri)
    n = spark.read.parquet(uri).count()
    assert len(corpus) == n == sum(1 for _ in corpus) > 50
    assert len(ParquetCorpus(uri, limit=7)) == 7 == len(list(ParquetCorpus(uri, limit=7)))
