"""The follower MAD filter and like-ratio labels against hand-computed examples."""

import datetime as dt

import pytest

from core.config import Followers
from sparkml.likability.filter_followers import label_posts

T0 = dt.datetime(2017, 6, 1)
SCHEMA = "post_id string, user_id string, likes long, followers long, posted_at timestamp"


def run(spark, rows, **options):
    labels, rejects, stats = label_posts(spark, spark.createDataFrame(rows, SCHEMA), Followers(**options))
    got = {r.post_id: (r.label, r.bucket) for r in labels.collect()}
    return got, {r.post_id: r.reason for r in rejects.collect()}, stats


# Five users: followers 10, 12, 14, 16, 1000. Median 14; |x - 14| = 4, 2, 0, 2, 986 -> MAD 2.
# k = 3 keeps |x - 14| <= 6: 10..16; 1000 is out. Ratios of the kept: .1, .1667, .2143, .25;
# median ratio (percentile_approx takes an element: the 2nd of 4 = .1667; exact interpolates .1905).
HAND = [("p1", "u1", 1, 10, T0), ("p2", "u2", 2, 12, T0), ("p3", "u3", 3, 14, T0), ("p4", "u4", 4, 16, T0),
        ("p5", "u5", 5, 1000, T0)]


@pytest.mark.parametrize("exact", [False, True])
def test_mad_filter_matches_hand_computation(spark, exact):
    got, rejects, stats = run(spark, HAND, exact=exact)
    assert (stats["median"], stats["spread"], stats["spread_kind"]) == (14.0, 2.0, "mad")
    assert rejects == {"p5": "follower_outlier"}
    assert {p: lab for p, (lab, _) in got.items()} == {"p1": 0, "p2": 0, "p3": 1, "p4": 1}
    expected = 1 / 6 if not exact else (2 / 12 + 3 / 14) / 2
    assert stats["median_ratio"]["0"] == pytest.approx(expected)
    assert stats["users"] == 5 and stats["users_kept"] == 4


def test_k_is_respected(spark):
    _, rejects, _ = run(spark, HAND, k=1.0)  # |x - 14| <= 2 keeps 12, 14, 16
    assert rejects == {"p1": "follower_outlier", "p5": "follower_outlier"}


def test_stats_are_per_user_not_per_image(spark):
    # u1 posts 7 times: per image the median would be 10; per user it stays 14.
    rows = HAND + [(f"q{i}", "u1", 1, 10, T0) for i in range(7)]
    _, rejects, stats = run(spark, rows)
    assert stats["median"] == 14.0 and stats["users"] == 5 and set(rejects) == {"p5"}


def test_mad_zero_uses_mean_absolute_deviation(spark):
    # followers 5, 5, 5, 7, 100: median 5, deviations 0, 0, 0, 2, 95 -> MAD 0; mean abs dev 97 / 5 = 19.4.
    rows = [(f"p{i}", f"u{i}", 1, f, T0) for i, f in enumerate([5, 5, 5, 7, 100])]
    got, rejects, stats = run(spark, rows)
    assert stats["spread_kind"].startswith("mean_abs_dev") and stats["spread"] == pytest.approx(19.4)
    assert rejects == {"p4": "follower_outlier"} and set(got) == {"p0", "p1", "p2", "p3"}


def test_everyone_equal_keeps_everyone_and_ties_are_bad(spark):
    rows = [(f"p{i}", f"u{i}", 3, 50, T0) for i in range(4)]
    got, rejects, stats = run(spark, rows)
    assert stats["spread"] == 0 and not rejects
    assert {lab for lab, _ in got.values()} == {0}  # all tie at the median: none is above it


def test_bad_counts_are_rejected_not_divided(spark):
    rows = HAND[:4] + [("z0", "u9", 1, 0, T0), ("z1", "u9", 1, -3, T0), ("z2", "u9", 1, None, T0),
                       ("z3", None, 1, 12, T0), ("z4", "u1", None, 10, T0), ("z5", "u1", -1, 10, T0)]
    got, rejects, _ = run(spark, rows)
    assert rejects == {"z0": "followers_zero", "z1": "followers_negative", "z2": "followers_missing",
                       "z3": "user_missing", "z4": "likes_invalid", "z5": "likes_invalid"}
    assert set(got) == {"p1", "p2", "p3", "p4"}


def test_log_scale(spark):
    # followers 10, 100, 1000, 10000, 100000. Linear: median 1000, deviations 990, 900, 0, 9000,
    # 99000 -> MAD 990, k = 3 keeps <= 2970: drops 10000 and 100000. Log: ln values 2.3 apart,
    # median ln 1000, MAD 2.3, k = 3 keeps everyone.
    rows = [(f"p{i}", f"u{i}", 1, 10 ** (i + 1), T0) for i in range(5)]
    _, lin, _ = run(spark, rows)
    _, log, stats = run(spark, rows, log_scale=True)
    assert lin == {"p3": "follower_outlier", "p4": "follower_outlier"}
    assert log == {} and stats["median"] == pytest.approx(6.9078, abs=1e-3)


def test_min_age_drops_recent_posts(spark):
    rows = HAND[:4] + [("new", "u1", 1, 10, T0 + dt.timedelta(days=30))]
    _, rejects, stats = run(spark, rows, min_age_days=1)
    assert rejects == {"new": "too_recent"}  # as_of defaults to the newest posted_at
    _, rejects, _ = run(spark, rows, min_age_days=1, as_of=T0 + dt.timedelta(days=31, hours=1))
    assert rejects == {}
    _, rejects, _ = run(spark, rows, min_age_days=40)  # everything is younger: nothing to label, no crash
    assert set(rejects.values()) == {"too_recent"} and len(rejects) == 5


def test_buckets_label_within_follower_quantiles(spark):
    # Small accounts (50 followers) with ratios .10 .12 .14 .16, big ones (60) with .167 .183 .2 .217.
    # Over everything the median is .163: every big account is good, no small one. In two
    # follower buckets (edge: median followers 55) each gets its own top half.
    rows = [(f"s{i}", f"s{i}", 5 + i, 50, T0) for i in range(4)] + [(f"b{i}", f"b{i}", 10 + i, 60, T0) for i in range(4)]
    got, _, _ = run(spark, rows, exact=True)
    assert {p for p, (lab, _) in got.items() if lab} == {"b0", "b1", "b2", "b3"}
    got, _, stats = run(spark, rows, exact=True, label_by="buckets", buckets=2)
    assert {p for p, (lab, _) in got.items() if lab} == {"s2", "s3", "b2", "b3"}
    assert {p: b for p, (_, b) in got.items()} == {**{f"s{i}": 0 for i in range(4)}, **{f"b{i}": 1 for i in range(4)}}
    assert stats["bucket_edges"] == [55.0]
