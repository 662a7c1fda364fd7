"""Generate the sample dataset: an InstaCities1M-layout folder plus a manifest with users,
likes and followers, deterministic from `sample.seed`, with planted mess (duplicates,
near-duplicates, broken files, odd formats, bad captions) recorded in ground_truth.json,
and `sample.me_posts` '#me' posts for the likability study (manifest only): real faces
composited into scenes and face-free quote images, with a planted link between the picture
and the like ratio (close-ups and green outdoor scenes do better, quotes worse).

    python jobs/make_sample.py --config conf/local.yaml --set sample.posts=500
"""

import sys
import time

from core import cli
from sparkml.sample.make_sample import GROUND_TRUTH, generate


def main(argv=None) -> int:
    cfg, _ = cli.parse("make_sample", __doc__, argv)
    t0 = time.perf_counter()
    truth = generate(cfg.sample)
    kinds: dict[str, int] = {}
    for case in truth["planted"]:
        kinds[case["kind"]] = kinds.get(case["kind"], 0) + 1
    print(f"make_sample: {truth['image_files']} image files, {truth['caption_files']} caption files, "
          f"{truth['manifest_rows']} manifest rows ({len(truth['me'])} '#me' posts), planted {sum(kinds.values())} cases "
          f"({', '.join(f'{k}={v}' for k, v in sorted(kinds.items()))}) in {time.perf_counter() - t0:.1f}s "
          f"-> {cfg.sample.out} (ground truth: {GROUND_TRUTH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
