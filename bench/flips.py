"""Which judged images a patch changes, and how sure the judge was of each before: the images behind a recipe
table's misses (a built-in toy-world model; the eval prompts, seeds and settings of `erasekit eval`).

    python bench/flips.py --model toy-sdxl --concept circle PATCH [PATCH ...]

For every image of the three attribute tables, it prints the concept's own images that the judge still labels the
concept after the patch (the target rate's misses, with the judge's two likeliest labels after), then those whose
label changes (for the images that name the concept, in the other attributes: erasing "red" may change their
colour, not their shape), with the judge's probability of its two likeliest labels before the patch: a "neighbour
-6.2 pp" that is one image the judge put at 0.51 square against 0.47 star is a coin the smallest drift flips, not a
concept the erase damaged. Then the concept's paraphrases, before -> after. About a minute per patch on one idle
core (n=16).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from erasekit.checkpoints.memory import patches_applied
from erasekit.checkpoints.pipeline import load_pipeline
from erasekit.format.patchfile import load_patch
from erasekit.judging.sampling import render_batch
from erasekit.toyworld import BUILTIN_MODELS, builtin_model_path
from erasekit.toyworld.concepts import ATTRIBUTES, attribute_of, eval_prompts, paraphrases_of
from erasekit.toyworld.judge import judge

SEED = 1000  # erasekit eval's held-out seeds (EvalConfig.seed)


def margins(probs: dict[str, np.ndarray], attr: str, i: int) -> str:
    """``"square 0.51, star 0.47"``: the two likeliest labels of image ``i`` for ``attr``."""
    p = probs[attr][i]
    top = np.argsort(p)[::-1][:2]
    return ", ".join(f"{ATTRIBUTES[attr][k]} {p[k]:.2f}" for k in top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("patches", nargs="+")
    ap.add_argument("--model", default="toy-sd", choices=sorted(BUILTIN_MODELS))
    ap.add_argument("--concept", required=True)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(builtin_model_path(args.model))[0]
    attr = attribute_of(args.concept)
    specs = [s for a in ATTRIBUTES for s in eval_prompts(a, args.n)]
    wordings = [w.replace("{}", args.concept) for w in paraphrases_of(args.concept)]
    prompts = [p for p, _ in specs] + [w for w in wordings for _ in range(args.n)]
    seeds = [SEED + (i % args.n) for i in range(len(prompts))]
    before = render_batch(pipe, prompts, seeds, resolution=32, steps=25, guidance=7.5)
    labels_before, probs_before = judge(before, return_probs=True)
    for path in args.patches:
        with patches_applied(pipe, [load_patch(path)]):
            after = render_batch(pipe, prompts, seeds, resolution=32, steps=25, guidance=7.5)
        labels_after, probs_after = judge(after, return_probs=True)
        print(f"== {path}")
        for i, (prompt, truth) in enumerate(specs):
            if truth.get(attr) == args.concept and labels_after[i][attr] == args.concept:
                print(f"  kept {args.concept}: {prompt!r} seed {seeds[i]} (after: {margins(probs_after, attr, i)})")
        for i, (prompt, truth) in enumerate(specs):
            for a in (a for a in ATTRIBUTES if a != attr or args.concept not in truth.values()):
                b, f = labels_before[i][a], labels_after[i][a]
                if b != f and truth[a] in (b, f):
                    sign = "lost" if b == truth[a] else "gained"
                    print(
                        f"  {sign} {a}: {prompt!r} seed {seeds[i]}: {b} -> {f} (before: {margins(probs_before, a, i)})"
                    )
        for k, w in enumerate(wordings):
            idx = range(len(specs) + k * args.n, len(specs) + (k + 1) * args.n)
            was = sum(labels_before[i][attr] == args.concept for i in idx)
            now = sum(labels_after[i][attr] == args.concept for i in idx)
            print(f"  paraphrase {w!r}: {was}/{args.n} -> {now}/{args.n}")


if __name__ == "__main__":
    main()
